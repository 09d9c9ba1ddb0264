"""The local engine: the native core's continuous batching as a synchronous (`Engine`) and an asyncio
(`AsyncEngine`) API, sampling options, text streaming, early exit and its calibration, and the
pipeline's local backend."""

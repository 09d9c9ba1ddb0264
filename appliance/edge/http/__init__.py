"""The HTTP face: OpenAI-compatible `/v1/...` and Ollama's `/api/...` on the same `Service` and pipeline
as gRPC, with `/health` and `/metrics`; uvicorn serves it inside the service's event loop."""

"""Benchmarks: each prints JSON with our figure, the reference's, measured in the same run, and the ratio."""

"""Builders turn model files shipped in pip packages into the GGUF files the appliance serves.

A builder is a module in this package with ``build(input_dir: Path, out_path: Path) -> None``; the
manifest names it as ``source.builder = "appliance.models.builders.<module>"``. It must be deterministic
(same input files -> byte-identical GGUF), because the manifest pins the output's sha256, and it
must not import torch or reach the network.
"""

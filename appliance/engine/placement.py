"""Where a loaded model runs: the device, and with a GPU how much of it is there ([model] gpu_layers).

`gpu_layers` follows llama.cpp's -ngl: the last N layers (their weights and K/V) go on the GPU; a value
above the model's layer count also moves the embeddings, output norm and head; -1 moves everything;
0 keeps everything on the CPU. Without a GPU (a CPU build, or a GPU build on a machine without one)
everything runs on the CPU whatever the setting.
"""

from __future__ import annotations

from typing import Protocol


class Placed(Protocol):
    @property
    def device(self) -> str: ...
    @property
    def n_layer(self) -> int: ...
    @property
    def gpu_layers(self) -> int: ...
    @property
    def output_on_device(self) -> bool: ...


def placement(model: Placed) -> str:
    """'the CPU', or 'CUDA0: 18/18 layers, embeddings and head' (what is on the GPU)."""
    if model.device == "CPU" or model.gpu_layers == 0:
        return "the CPU"
    rest = ", embeddings and head" if model.output_on_device else "; embeddings and head on the CPU"
    return f"{model.device}: {model.gpu_layers}/{model.n_layer} layers{rest}"


def gpu_layers_plan(gpu_layers: int) -> str:
    """What a [model] gpu_layers setting puts on a GPU, before a model is loaded."""
    if gpu_layers < 0:
        return "every layer, the embeddings and the head"
    if gpu_layers == 0:
        return "nothing (gpu_layers = 0: the CPU only)"
    return f"the last {gpu_layers} layers and their K/V (all of them, with the head, if the model has fewer)"

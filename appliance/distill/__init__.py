"""Distillation: LoRA training on the served GGUF (PyTorch CPU, transformers, peft) and its export as a
llama.cpp LoRA GGUF and as a merged Q4_K_M model.

Modules: `data` (JSONL reading, tokenizing, the train/validation split; no torch), `train` (the model
and the training loop), `export` (GGUF writing and merging; no torch), `run` (one whole run), `cli`
(``appliance distill``). Importing this package imports none of torch, transformers or peft.
"""

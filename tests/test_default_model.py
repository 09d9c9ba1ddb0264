"""The default model (Gemma 3 270M Q4_K_M) against llama.cpp on the same file: greedy continuations
of 20 varied prompts must be identical for 64 tokens in at least 19; a divergence must sit at a
near-tie (reference top-2 logit margin < 1e-3) and is reported."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from greedy import first_divergence, ours_greedy
from reference import ref_greedy, ref_load, ref_logits

from appliance import _native

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "def fibonacci(n):\n    ",
    "To reset your online banking password, you should",
    "The three primary colors are",
    "Water boils at a temperature of",
    "Translate to French: Good morning, how are you?",
    "My card has not arrived yet. What should I do?",
    "In 1969, the first humans landed on",
    "The best way to learn a new programming language is",
    "SELECT name, email FROM users WHERE",
    "Photosynthesis is the process by which",
    "Dear customer, thank you for contacting us about",
    "1, 2, 3, 5, 8, 13,",
    "The weather today is sunny with a chance of",
    "import numpy as np\nx = np.",
    "A haiku about autumn:\n",
    "Q: What is the largest planet in our solar system?\nA:",
    "Les chats sont des animaux",
    "Here is a list of tips for saving money:\n1.",
]
N_TOKENS = 64
NEAR_TIE = 1e-3


def test_greedy_parity_with_llamacpp(default_model: Path, tmp_path: Path) -> None:
    model = _native.Model(str(default_model))
    vocab = _native.Vocab(str(default_model))
    ctx = _native.Context(model, n_ctx=512, n_threads=2)
    llm = ref_load(default_model, n_ctx=512)

    report = []
    identical = 0
    for prompt in PROMPTS:
        toks = list(vocab.tokenize(prompt))
        want = ref_greedy(llm, toks, N_TOKENS)
        got = ours_greedy(ctx, toks, N_TOKENS)
        i = first_divergence(got, want)
        if i is None:
            identical += 1
            continue
        top2 = np.sort(ref_logits(llm, toks + want[:i])[-1])[-2:]
        margin = float(top2[1] - top2[0])
        report.append({"prompt": prompt, "diverges_at": i, "ref_top2_margin": margin})
        print(f"divergence: {prompt!r} at token {i}, reference top-2 margin {margin:.2e}")
        assert margin < NEAR_TIE, f"{prompt!r}: diverged at token {i} with a clear margin {margin:.3g}"
    print(json.dumps({"identical": identical, "of": len(PROMPTS), "divergences": report}))
    assert identical >= 19, f"only {identical}/20 identical: {report}"


def test_default_model_shape(default_model: Path) -> None:
    model = _native.Model(str(default_model))
    assert (model.arch, model.n_layer, model.n_embd, model.n_vocab, model.n_swa) == ("gemma3", 18, 640, 262144, 512)
    assert model.swa_layers == [il % 6 != 5 for il in range(18)]


@pytest.mark.parametrize("first", ["llama_cpp", "appliance"])
def test_one_libggml_in_process(first: str, default_model: Path) -> None:
    """Importing both llama_cpp and our extension maps each ggml library exactly once."""
    import subprocess
    import sys

    code = f"""
import re, sys
order = ["{first}", "llama_cpp" if "{first}" == "appliance" else "appliance"]
for name in order:
    if name == "llama_cpp":
        import llama_cpp
        llama_cpp.llama_backend_init()
    else:
        from appliance import _native
        _native.Model({str(default_model)!r})
libs = {{}}
for line in open("/proc/self/maps"):
    m = re.search(r"(\\S*/(libggml[-a-z]*|libllama)\\.so[.0-9]*)$", line.strip())
    if m:
        libs.setdefault(m.group(2), set()).add(m.group(1))
print(libs)
assert set(libs) >= {{"libggml", "libggml-base", "libggml-cpu", "libllama"}}, libs
assert all(len(paths) == 1 for paths in libs.values()), libs
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_past_the_window_with_the_windowed_pool_matches_llamacpp(default_model: Path) -> None:
    """A prompt longer than Gemma 3's 512-token window, through the batching engine whose windowed pool
    (640 cells) cannot hold the whole sequence: the continuation is llama.cpp's up to near-ties of
    ggml's chunked-versus-whole prefill kernels, and a prefix hit past the window gives the same."""
    from test_batching import KERNEL_NOISE, run_one

    vocab = _native.Vocab(str(default_model))
    tickets = (f"Ticket {k}: the customer asks about card {k % 7}, a transfer of {10 * k} euros." for k in range(40))
    text = " ".join(tickets)
    prompt = list(vocab.tokenize(text))
    assert 700 < len(prompt) < 900
    engine = _native.BatchEngine(_native.Model(str(default_model)), n_blocks=64, n_blocks_swa=40, block_size=16)
    got, cached = run_one(engine, prompt, 24)
    assert cached == 0 and engine.stats()["n_preemptions"] == 0
    llm = ref_load(default_model, n_ctx=1024)
    want = ref_greedy(llm, prompt, 24)
    i = first_divergence(got, want)
    if i is not None:
        top2 = np.sort(ref_logits(llm, prompt + want[:i])[-1])[-2:]
        print(f"past the window: diverges at token {i}, reference top-2 margin {top2[1] - top2[0]:.3f}")
        assert top2[1] - top2[0] < KERNEL_NOISE
    again, cached = run_one(engine, prompt, 24)
    assert cached > 512 and again == got

"""Many adapters, one batch: aggregate decode throughput of 8 concurrent requests on one base model
with no adapter, all under one LoRA adapter, and under 8 different adapters in the same batch; and
llama.cpp serving the same 8 requests the way it can, one context per adapter configuration (it
applies adapters per context, so requests under different adapters never share a batch).

Every request: a 128-token random prompt, 128 greedy tokens; decode throughput counts the tokens
generated after every request has its first token, over that phase's time (as `bench batch`). The
adapters are rank-16 LoRA GGUFs on every linear layer (attention q/k/v/output, FFN gate/up/down) with
seeded random A and B at a trained adapter's scale, written once under build/bench-adapters/ by
the distillation exporter. Rounds alternate between our engine (one child process runs the three
configurations, in a rotating order) and llama.cpp (another child); the figures are medians.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np

from appliance.bench.batch import llamacpp_decode, ours_decode, ours_engine
from appliance.bench.common import random_tokens, run_child

N_REQUESTS = 8
TARGETS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
RANK = 16
ALPHA = 32.0  # `appliance distill train`'s default: 2 x rank
# B's standard deviation: with A ~ N(0, 1/n_in) (PEFT's init scale), a token's LoRA term is about 2% of
# its base projection on the default model (weights ~0.03), what a short fine-tune moves
B_STD = 0.002
ADAPTER_DIR = Path(__file__).resolve().parents[2] / "build" / "bench-adapters"  # the checkout's build/
MODES = ("base", "one_adapter", "distinct_adapters")


def bench_adapters_files(model: str, n: int = N_REQUESTS, out_dir: Path = ADAPTER_DIR) -> list[Path]:
    """n rank-16 adapters of `model` on every linear layer (seeds 0..n-1), written once and reused."""
    import gguf

    from appliance.distill.export import LoraAdapter, write_adapter

    reader = gguf.GGUFReader(model)
    arch = str(reader.fields["general.architecture"].contents())
    shapes = {  # ggml order [n_in, n_out]
        t.name: (int(t.shape[0]), int(t.shape[1]))
        for t in reader.tensors
        if t.name.startswith("blk.") and t.name.split(".")[2] in TARGETS and t.name.endswith(".weight")
    }
    if not shapes:
        raise ValueError(f"{model}: no {', '.join(TARGETS)} weights to adapt")
    paths = []
    for seed in range(n):
        path = out_dir / f"{Path(model).stem}-r{RANK}-seed{seed}.lora.gguf"
        if not path.exists():
            rng = np.random.default_rng(seed)
            weights = {
                name: (
                    (rng.standard_normal((RANK, n_in)) / np.sqrt(n_in)).astype(np.float32),
                    (rng.standard_normal((n_out, RANK)) * B_STD).astype(np.float32),
                )
                for name, (n_in, n_out) in sorted(shapes.items())
            }
            write_adapter(LoraAdapter(arch=arch, alpha=ALPHA, rank=RANK, weights=weights), path, name=f"bench-{seed}")
        paths.append(path)
    return paths


def ours(model: str, threads: int, adapters: list[str], n_prompt: int, n_gen: int, round_: int) -> dict[str, Any]:
    """One engine, the 8 adapters loaded; each configuration once, starting at MODES[round_ % 3]."""
    c = len(adapters)
    engine, n_vocab = ours_engine(model, threads, c, n_prompt, n_gen)
    ids = [engine.load_adapter(p) for p in adapters]
    per_mode = {"base": [0] * c, "one_adapter": [ids[0]] * c, "distinct_adapters": ids}
    res: dict[str, Any] = {"adapter_mb": engine.stats()["adapter_bytes"] / 2**20}
    for j in range(len(MODES)):
        k = (round_ + j) % len(MODES)
        # prompts of their own per configuration and round: no prefix-cache hit between them
        prompts = [random_tokens(n_vocab, n_prompt, 1000 * (3 * round_ + k) + i) for i in range(c)]
        _, t_decode, produced = ours_decode(engine, prompts, n_gen, per_mode[MODES[k]])
        res[f"{MODES[k]}_tps"] = produced / t_decode
    return res


def llamacpp(model: str, threads: int, adapters: list[str], n_prompt: int, n_gen: int, round_: int) -> dict[str, Any]:
    """llama.cpp: the 8 requests under 8 adapters need 8 contexts, one after another; under one
    adapter, one context decodes all 8 in one batch."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=model, n_ctx=64, n_threads=threads, n_gpu_layers=0, verbose=False)
    loras = [llama_cpp.llama_adapter_lora_init(llm.model, p.encode()) for p in adapters]
    if not all(loras):
        raise RuntimeError("llama.cpp refused a bench adapter")
    c = len(adapters)
    prompts = [random_tokens(llm.n_vocab(), n_prompt, 1000 * (3 * round_ + 2) + i) for i in range(c)]
    t_distinct = sum(llamacpp_decode(llm, [p], n_gen, threads, lora)[1] for p, lora in zip(prompts, loras, strict=True))
    _, t_one = llamacpp_decode(llm, prompts, n_gen, threads, loras[0])
    for lora in loras:
        llama_cpp.llama_adapter_lora_free(lora)
    return {"distinct_adapters_tps": c * (n_gen - 1) / t_distinct, "one_adapter_tps": c * (n_gen - 1) / t_one}


CHILDREN = {"ours": ours, "llamacpp": llamacpp}


def bench_adapters(
    model: str, threads: int, reps: int = 3, n_prompt: int = 128, n_gen: int = 128, progress: bool = True
) -> dict[str, Any]:
    paths = bench_adapters_files(model)
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in CHILDREN}
    for r in range(reps):
        for name in CHILDREN:
            spec = {"model": model, "threads": threads, "adapters": [str(p) for p in paths], "round_": r}
            out = run_child(
                "appliance.bench.adapters", [name, json.dumps(spec | {"n_prompt": n_prompt, "n_gen": n_gen})]
            )
            rounds[name].append(out)
            if progress:
                print(f"  round {r + 1}/{reps} {name}: {out}", flush=True, file=sys.stderr)

    def med(name: str, key: str) -> float:
        return round(statistics.median(float(x[key]) for x in rounds[name]), 1)

    res: dict[str, Any] = {
        "model": model,
        "threads": threads,
        "requests": len(paths),
        "prompt_tokens": n_prompt,
        "gen_tokens": n_gen,
        "adapter_rank": RANK,
        "rounds": reps,
        "base_tps": med("ours", "base_tps"),
        "one_adapter_tps": med("ours", "one_adapter_tps"),
        "distinct_adapters_tps": med("ours", "distinct_adapters_tps"),
        "llamacpp_tps": med("llamacpp", "distinct_adapters_tps"),
        "llamacpp_one_adapter_tps": med("llamacpp", "one_adapter_tps"),
        "adapters_mb": round(rounds["ours"][0]["adapter_mb"], 1),
    }
    res["distinct_vs_base"] = round(res["distinct_adapters_tps"] / res["base_tps"], 3)
    res["distinct_vs_llamacpp"] = round(res["distinct_adapters_tps"] / res["llamacpp_tps"], 2)
    res["one_adapter_vs_llamacpp_one_adapter"] = round(res["one_adapter_tps"] / res["llamacpp_one_adapter_tps"], 2)
    res["goals_met"] = res["distinct_vs_base"] >= 0.85 and res["distinct_vs_llamacpp"] >= 3.0
    res["per_round"] = rounds
    return res


def main() -> int:
    """`python -m appliance.bench.adapters CHILD SPEC_JSON`: one child's round, its figures as JSON."""
    name, spec = sys.argv[1], json.loads(sys.argv[2])
    print(json.dumps(CHILDREN[name](**spec)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

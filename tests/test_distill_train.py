"""Distillation end to end on a tiny generated Gemma 3 GGUF (Q8_0, sliding-window layers): it learns a
small classification task in seconds; the exported adapter runs in llama.cpp with the PEFT model's
greedy output; the merged, requantized model gives our core llama.cpp's base+adapter output; the CLI
prints its figures as JSON; the same seed gives the same adapter bytes; bad data trains nothing."""

from __future__ import annotations

import argparse
import io
import json
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from greedy import ours_greedy
from reference import ref_greedy, ref_load
from torch_threads import one_torch_thread  # noqa: F401 (an autouse fixture: torch on one thread here)

pytest.importorskip("torch")
pytest.importorskip("peft")

from appliance import _native
from appliance.cli.distill import register
from appliance.common.config import load_config
from appliance.distill.capture import store_for
from appliance.distill.data import load_examples
from appliance.distill.export import from_hf, merge, read_answers, write_adapter
from appliance.distill.train import TrainConfig, load_model, lora_weights, train

LABELS = {"water": ("hello", "world", "people"), "time": ("number", "day", "first"), "long": ("look", "find", "call")}
FILLER = "the of and to a in is it you that he was for on are with".split()
# a tiny random model needs a far larger learning rate than a real one
CFG = TrainConfig(epochs=6, rank=8, alpha=16.0, lr=1e-2, batch_size=8, threads=1, seed=0, patience=0)


def task_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """'text: <three filler words and one keyword>\\nlabel:' -> ' <the keyword's class>'."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(sorted(LABELS))
        words = rng.sample(FILLER, 3)
        words.insert(rng.randrange(4), rng.choice(LABELS[label]))
        rows.append({"prompt": "text: " + " ".join(words) + "\nlabel:", "completion": " " + label})
    return rows


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def trained(tiny_model: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("distill")
    base = tiny_model("gemma3", "Q8_0")
    data = write_jsonl(tmp / "task.jsonl", task_rows(80))
    examples = load_examples(data, base)
    log = io.StringIO()
    model, result = train(load_model(base), examples, CFG, log=log, progress_every_s=0.0)
    cfg = model.config
    adapter = from_hf(
        "gemma3",
        n_layer=cfg.num_hidden_layers,
        n_head=cfg.num_attention_heads,
        n_head_kv=cfg.num_key_value_heads,
        alpha=CFG.alpha,
        rank=CFG.rank,
        hf_weights=lora_weights(model),
    )
    lora = write_adapter(adapter, tmp / "task.lora.gguf")
    merged = merge(adapter, base, tmp / "task.gguf", quantize=True, threads=1)
    eos = _native.Vocab(str(base)).eos
    probe = examples[:10]  # greedy continuations of the PEFT model (transformers), computed once
    peft_out = [_until_eos(_peft_greedy(model, list(e.prompt), len(e.answer) + 1), eos) for e in probe]
    yield {
        "probe": probe,
        "peft_out": peft_out,
        "eos": eos,
        "base": base,
        "model": model,
        "result": result,
        "log": log.getvalue(),
        "examples": examples,
        "lora": lora,
        "merged": merged,
    }


def _peft_greedy(model: Any, prompt: list[int], n: int) -> list[int]:
    import torch

    toks = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            toks.append(int(model(torch.tensor([toks])).logits[0, -1].argmax()))
    return toks[len(prompt) :]


def _until_eos(tokens: list[int], eos: int) -> list[int]:
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def test_tiny_model_learns_the_task(trained: dict[str, Any]) -> None:
    r = trained["result"]
    assert r.train_examples == 72 and r.val_examples == 8
    assert r.val_loss_before is not None and r.val_loss_after is not None
    assert r.val_loss_after < 0.25 * r.val_loss_before, (r.val_loss_before, r.val_loss_after)
    assert r.tokens_per_s > 0 and r.seconds > 0 and r.steps > 0
    log = trained["log"]
    assert "tokens/s" in log and "ETA" in log and "validation loss before training" in log
    # the trained model answers the training prompts (label then end of sequence)
    right = sum(out == list(e.answer) for e, out in zip(trained["probe"], trained["peft_out"], strict=True))
    assert right >= 9, right


def test_adapter_in_llama_cpp_gives_the_peft_greedy_output(trained: dict[str, Any]) -> None:
    llm = ref_load(trained["base"], n_ctx=128, n_threads=1, lora=trained["lora"])
    try:
        for ex, peft in zip(trained["probe"], trained["peft_out"], strict=True):
            ref = _until_eos(ref_greedy(llm, list(ex.prompt), len(ex.answer) + 1), trained["eos"])
            assert ref == peft, (ex.line, ref, peft)
    finally:
        llm.close()


def test_merged_model_in_our_core_gives_llama_cpp_base_plus_adapter_output(trained: dict[str, Any]) -> None:
    import gguf

    base, merged = trained["base"], trained["merged"]
    # requantized by libllama to the base's own types (Q8_0 here), not left F32
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(merged)).tensors}
    assert types == {t.name: t.tensor_type for t in gguf.GGUFReader(str(base)).tensors}
    vocab = _native.Vocab(str(base))
    ctx = _native.Context(_native.Model(str(merged), use_gpu=False), n_ctx=128, n_threads=1)
    llm = ref_load(base, n_ctx=128, n_threads=1, lora=trained["lora"])
    same = 0
    try:
        for ex in trained["examples"][:12]:
            n = len(ex.answer)
            ref = _until_eos(ref_greedy(llm, list(ex.prompt), n), vocab.eos)
            ours = _until_eos(ours_greedy(ctx, list(ex.prompt), n), vocab.eos)
            same += ref == ours
    finally:
        llm.close()
    assert same >= 11, same  # equal up to near-ties (Q8_0 rounding of the merged weights)


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="appliance")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    rc: int = args.func(args)
    return rc


def test_cli_json_and_same_seed_same_adapter_bytes(
    tiny_model: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = tiny_model("gemma3", "Q8_0")
    data = write_jsonl(tmp_path / "small.jsonl", task_rows(24, seed=1))
    common = ["distill", "train", "--data", str(data), "--base", str(base), "--epochs", "1", "--rank", "4"]
    common += ["--lr", "0.01", "--threads", "1", "--seed", "3", "--batch-size", "4", "--json"]
    assert _cli([*common, "--out", str(tmp_path / "a" / "task"), "--merged"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("train_examples", "seconds", "tokens_per_s", "val_loss_before", "val_loss_after"):
        assert key in out
    assert out["train_examples"] == 22
    first = Path(out["adapter"])
    assert first == tmp_path / "a" / "task.lora.gguf" and first.is_file()
    assert Path(out["merged"]).is_file() and Path(out["report"]).is_file()
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["task.distill.json", "task.gguf", "task.lora.gguf"]

    assert _cli([*common, "--out", str(tmp_path / "b" / "task.gguf")]) == 0  # DIR/NAME.gguf names it too
    second = Path(json.loads(capsys.readouterr().out)["adapter"])
    assert second == tmp_path / "b" / "task.lora.gguf"
    assert first.read_bytes() == second.read_bytes()


def test_cli_bad_data_trains_nothing(
    tiny_model: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "a", "completion": " b"}\n{"prompt": "a", "completion": 1}\n')
    argv = ["distill", "train", "--data", str(data), "--base", str(tiny_model("gemma3", "Q8_0"))]
    assert _cli([*argv, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert f"{data}:2: completion: expected a string" in err and "nothing was trained" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]


def test_cli_trains_on_a_tenants_captured_task(
    tiny_model: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--tenant/--task: the service's captured cloud answers of that task, and only that tenant's."""
    cfg_path = tmp_path / "appliance.toml"
    cfg_path.write_text(f'[storage]\ndir = "{tmp_path / "state"}"\n')
    with store_for(load_config(cfg_path)) as store:
        for r in task_rows(24, seed=2):
            store.add("acme", r["completion"], task="triage", prompt=r["prompt"])
            store.add("globex", " other", task="triage", prompt=r["prompt"])  # another tenant's: never used
        store.add("acme", " x", task="summaries", prompt="text: hello\nlabel:")
    argv = ["distill", "train", "--tenant", "acme", "-c", str(cfg_path), "--base", str(tiny_model("gemma3", "Q8_0"))]
    argv += ["--epochs", "1", "--rank", "4", "--lr", "0.01", "--threads", "1", "--batch-size", "4", "--json"]
    assert _cli([*argv, "--task", "triage", "--out", str(tmp_path / "m" / "triage")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["train_examples"] == 22 and Path(out["adapter"]).is_file()
    assert read_answers(out["adapter"]) is not None  # a classification: its labels are recorded
    assert _cli([*argv, "--task", "nope", "--out", str(tmp_path / "n" / "x")]) == 2
    err = capsys.readouterr().err
    assert "no examples captured for tenant 'acme', task 'nope'" in err and "triage (24)" in err
    assert _cli([*argv[:-1], "--out", str(tmp_path / "n" / "x")]) == 2  # --tenant without --task
    assert "--tenant needs --task" in capsys.readouterr().err
    assert not (tmp_path / "n").exists()


# ---------------------------------------------------------------- LoRA on the top blocks only (--layers)


@pytest.mark.parametrize("arch", ["gemma3", "qwen2", "llama"])
def test_cached_frozen_blocks_give_the_full_loss_and_gradients(tiny_model: Callable[..., Path], arch: str) -> None:
    """With LoRA on the top 2 of 4 blocks, the loss and the LoRA gradients computed from the cached
    output of the bottom 2 equal those of the whole model run; the cached states of a right-padded
    batch equal each example's alone; the model's own layers are back in place afterwards."""
    import torch

    from appliance.distill.data import Example
    from appliance.distill.train import FrozenBottom, answer_loss, attach_lora, frozen_blocks, make_batch

    cfg = TrainConfig(rank=4, alpha=8.0, seed=0, layers=2)
    model = attach_lora(load_model(tiny_model(arch, "F32", n_layer=4)), cfg)
    assert frozen_blocks(model, cfg) == 2
    assert {name.split(".")[2] for name in lora_weights(model)} == {"2", "3"}  # model.layers.<i>.
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # random A and B (the default init leaves B at zero: no gradient for A)
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    examples = [
        Example(tuple(range(10, 30)), (40, 41, 2)),  # longer than gemma3's sliding window (8)
        Example((1, 50, 51), (60, 2)),
        Example((1, 7, 8, 9, 70, 71, 72), (80,)),
    ]
    layers = list(model.get_base_model().get_decoder().layers)
    bottom = FrozenBottom(2)
    bottom.add(model, examples, batch_size=3)  # one right-padded batch
    for e in examples:
        alone = FrozenBottom(2)
        alone.add(model, [e], batch_size=1)
        a, b = alone.states[e.tokens], bottom.states[e.tokens]  # equal up to float rounding (batch shapes)
        assert a.shape == b.shape and float((a - b).abs().max()) < 1e-5 * float(a.abs().max()), (a - b).abs().max()

    def loss_and_grads(batch: Any) -> tuple[float, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        loss = answer_loss(model, batch)
        loss.backward()  # type: ignore[no-untyped-call]
        return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.train()
    full, full_grads = loss_and_grads(make_batch(examples))
    cached, cached_grads = loss_and_grads(make_batch(examples, bottom=bottom))
    assert cached == pytest.approx(full, abs=1e-5)
    assert full_grads.keys() == cached_grads.keys() and len(full_grads) == 2 * 2 * 7  # A and B, 2 blocks, 7 linears
    for n, g in full_grads.items():
        assert float(g.abs().max()) > 0, n
        assert torch.allclose(cached_grads[n], g, rtol=1e-4, atol=1e-6), (n, (cached_grads[n] - g).abs().max())
    assert list(model.get_base_model().get_decoder().layers) == layers


def test_cli_layers_trains_the_top_blocks_only(
    tiny_model: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--layers 2 of 4: the held-out loss falls, the adapter holds tensors of blocks 2 and 3 only, it
    runs in our engine as in llama.cpp (greedy outputs), and the merged model loads in our core."""
    import gguf
    from test_adapters_trained import check_trained

    base = tiny_model("gemma3", "F32", n_layer=4)
    data = write_jsonl(tmp_path / "task.jsonl", task_rows(80))
    argv = ["distill", "train", "--data", str(data), "--base", str(base), "--epochs", "4", "--rank", "8"]
    argv += ["--lr", "0.01", "--threads", "1", "--batch-size", "8", "--patience", "0", "--json"]
    assert _cli([*argv, "--layers", "2", "--merged", "--out", str(tmp_path / "top2")]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert "on gemma3" not in captured.err and "of blocks 2-3" in captured.err
    assert "frozen blocks 0-1: 72/72 examples" in captured.err  # the progress of the cache, training examples
    assert out["val_loss_after"] < 0.5 * out["val_loss_before"], out
    assert 0 < out["frozen_seconds"] < out["seconds"]  # the one-off pass is counted in the training time
    blocks = {t.name.split(".")[1] for t in gguf.GGUFReader(out["adapter"]).tensors}
    assert blocks == {"2", "3"}
    vocab = _native.Vocab(str(base))
    prompts = [list(vocab.tokenize(r["prompt"])) for r in task_rows(6, seed=9)]
    check_trained(base, Path(out["adapter"]), [], prompts, 4, threads=1)
    _native.Model(out["merged"], use_gpu=False)  # merged from an adapter of some blocks: loads in our core

    assert _cli([*argv, "--layers", "0", "--out", str(tmp_path / "none")]) == 2
    assert "layers must be >= 1 (got 0)" in capsys.readouterr().err
    assert not (tmp_path / "none.lora.gguf").exists()

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

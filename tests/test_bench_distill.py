"""`appliance bench distill` end to end on a tiny generated Gemma 3 GGUF (a short smoke; the real run
on the default model sits behind `make bench`): the split, training, the base model's and the task
model's answers (kept to the trained labels), the calibrated margin rule and the saving are all
measured and reported; an adapter trained on another split is refused; a bad CSV names its line."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from test_distill_train import task_rows
from torch_threads import one_torch_thread  # noqa: F401 (an autouse fixture: torch on one thread here)

pytest.importorskip("torch")
pytest.importorskip("peft")

from appliance.bench.distill import bench_distill, write_split
from appliance.common.config import PricingConfig
from appliance.distill.export import read_answers
from appliance.distill.train import TrainConfig

CFG = TrainConfig(epochs=6, rank=8, alpha=16.0, lr=1e-2, batch_size=8, threads=1, seed=0, patience=0)


def write_csv(path: Path, n: int) -> Path:
    lines = ["text,category"]
    for r in task_rows(n, seed=1):
        text = r["prompt"].removeprefix("text: ").removesuffix("\nlabel:")
        lines.append(f"{text},{r['completion'].strip()}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_bench_distill_smoke(tiny_model: Callable[..., Path], tmp_path: Path) -> None:
    base = str(tiny_model("gemma3", "Q8_0"))
    data = write_csv(tmp_path / "intents.csv", 130)
    log = io.StringIO()
    prices = PricingConfig(input_per_mtok=1.0, output_per_mtok=2.0)
    kw = {"n_train": 100, "n_base": 10, "cfg": CFG, "pricing": prices, "concurrency": 4, "log": log}
    res = bench_distill(base, 1, data, tmp_path / "work", **kw)
    assert res["train_examples"] == 90 and res["val_examples"] == 10 and res["test_examples"] == 30
    assert res["labels"] == 3 and read_answers(res["adapter"]) == [" long", " time", " water"]
    assert res["base_n"] == 10 and 0.0 <= res["base_exact_match"] <= 1.0
    assert res["exact_match"] >= 0.8, res  # the tiny model learns its keywords
    assert 0.0 <= res["coverage"] <= 1.0 and res["signal"] == "margin"
    assert res["val_loss_after"] < res["val_loss_before"]
    assert res["train_seconds"] > 0 and res["train_tokens_per_s"] > 0 and res["train_cpu_seconds"] > 0
    # the cascade saves the covered share's cloud cost (local tokens cost nothing here)
    assert res["saving_vs_cloud"] == pytest.approx(res["coverage"], abs=0.05)
    json.dumps(res)  # finite, serialisable
    assert "bench distill: test 30/30" in log.getvalue()

    # the adapter again, on the same split: no training, the same figures
    again = bench_distill(base, 1, data, tmp_path / "work", adapter=Path(res["adapter"]), **kw)
    assert again["exact_match"] == res["exact_match"] and again["train_seconds"] == res["train_seconds"]
    # ... but not on another split
    with pytest.raises(ValueError, match="not trained on this split"):
        bench_distill(base, 1, data, tmp_path / "work", adapter=Path(res["adapter"]), seed=5, **kw)


@pytest.mark.parametrize(
    ("text", "problem"),
    [("", "header"), ("text,category\nhello,\n", "line 2"), ("text,category\na,b\n", "--train 10")],
)
def test_bench_distill_names_what_is_wrong_with_the_csv(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=problem):
        write_split(path, tmp_path / "work", n_train=10, n_test=None, seed=0)

"""`appliance cache tune`: a short tuning run on tiny data writes a GGUF embedder that loads, carries its
own calibration and is evaluated side by side with the plain one; bad CSVs and arguments are refused
with a message naming the problem."""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from test_cache_eval import run_cli

from appliance.cache import CacheConfig, GgufEmbedder, SemanticCache, fingerprint
from appliance.cache.config import embedder_calibration
from appliance.cache.frontier import FRONTIER_THRESHOLDS
from appliance.cache.names import resolve_embedder, stored_calibration, tuned_path

CLINC150 = Path(__file__).resolve().parent / "data" / "clinc150_val.csv"


def _tiny_csv(path: Path, labels: int = 8, per: int = 12) -> Path:
    by: dict[str, list[str]] = defaultdict(list)
    with CLINC150.open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            by[row["category"]].append(row["text"])
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "category"])
        for cat in sorted(by)[:labels]:
            w.writerows([t, cat] for t in by[cat][:per])
    return path


def test_tune_writes_an_embedder_that_loads_with_its_calibration(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _tiny_csv(tmp_path / "tiny.csv")
    out = tmp_path / "tuned.gguf"
    argv = ["cache", "tune", "--csv", str(data), "--out", str(out), "--max-anchors", "16", "--batch-size", "8"]
    rc, stdout, err = run_cli([*argv, "--calibration-fraction", "0.4", "--threads", "1", "--json"], capsys)
    assert rc == 0, err
    res = json.loads(stdout)
    assert res["out"] == str(out) and res["tune"]["steps"] == 2 and res["tune"]["tuning_rows"] == 57
    assert "epoch 1/1" in err and "step 2/2" in err  # progress on stderr
    assert json.loads(stored_calibration(out) or "{}")["threshold"] == res["threshold"]
    with GgufEmbedder(out) as tuned, GgufEmbedder() as plain:
        cal = embedder_calibration(tuned)
        assert cal is not None and cal.threshold == res["threshold"] and tuned.version != plain.version
        assert (cal.decision is None) == (res["decision"] is None)
        q = "what is my checking account balance"
        a, b = tuned.embed(q), plain.embed(q)
        assert tuned.dim == plain.dim == 384 and 0.5 < float(a @ b) < 0.99999  # moved, not replaced
        with SemanticCache.open(tmp_path / "cache", tuned, CacheConfig()) as cache:
            assert cache.decision == cal.decision and cache.threshold == cal.threshold
            fp = fingerprint("m")
            cache.store("t", fp, q, "balance", model="m")
            hit = cache.lookup("t", fp, q)
            assert hit is not None and hit.response == "balance"
    # the frontier of the tuned embedder next to the plain one's
    rc, stdout, err = run_cli(["cache", "eval", "--csv", str(data), "--embedding-model", str(out), "--json"], capsys)
    assert rc == 0, err
    res = json.loads(stdout)
    assert res["embedder"].startswith("tuned.gguf:") and res["compare"]["embedder"].startswith("all-MiniLM-L6-v2")
    for f in (res["frontier"], res["compare"]):
        assert 0.0 <= f["threshold"]["auc"] <= 1.0 and "hit_rate_at_0.97" in f["threshold"]
        assert len(f["threshold_curve"]) == len(FRONTIER_THRESHOLDS)
    assert "decision" not in res["compare"]  # the plain embedder carries no decision
    rc, stdout, _ = run_cli(["cache", "eval", "--csv", str(data), "--embedding-model", str(out)], capsys)
    assert rc == 0 and "threshold rule" in stdout and "all-minilm-l6-v2 (plain)" in stdout


def test_tuned_names_resolve_under_the_appliance_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APPLIANCE_HOME", str(tmp_path))
    assert tuned_path("bank-v1") == tmp_path / "embedders" / "bank-v1.gguf"
    assert tuned_path("/x/y.gguf") == Path("/x/y.gguf")
    with pytest.raises(ValueError, match="embedder name 'Bad Name!'"):
        tuned_path("Bad Name!")
    with pytest.raises(LookupError):
        resolve_embedder("bank-v1")  # not tuned yet, and not a manifest name
    (tmp_path / "embedders").mkdir()
    (tmp_path / "embedders" / "bank-v1.gguf").write_bytes(b"GGUF")
    assert resolve_embedder("bank-v1") == tmp_path / "embedders" / "bank-v1.gguf"


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_tune_refuses_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = _tiny_csv(tmp_path / "good.csv")
    out = str(tmp_path / "o.gguf")
    one_answer = _write(tmp_path / "one.csv", "text,category\n" + "".join(f"question {i},same\n" for i in range(40)))
    cases = [
        (["--csv", str(tmp_path / "missing.csv")], "cannot read"),
        (["--csv", str(_write(tmp_path / "h.csv", "question,answer\nhi,there\n"))], "expected a header"),
        (["--csv", str(_write(tmp_path / "e.csv", "text,category\n"))], "has no rows"),
        (["--csv", str(one_answer)], "1 distinct answers"),
        (["--csv", str(good), "--epochs", "0"], "--epochs must be at least 1"),
        (["--csv", str(good), "--calibration-fraction", "1.5"], "--calibration-fraction must be between 0 and 1"),
        (["--csv", str(good), "--batch-size", "1"], "--batch-size must be at least 2"),
        (["--csv", str(good), "--mix", "0"], "--mix must be in (0, 1]"),
        (["--csv", str(good), "--limit", "0"], "--limit must be at least 1"),
        (["--csv", str(good), "--limit", "10"], "10 questions"),
        (["--tenant", "acme", "--dir", str(tmp_path)], "no cache database at"),
    ]
    for extra, message in cases:
        rc, _, err = run_cli(["cache", "tune", "--out", out, *extra], capsys)
        assert rc == 2 and message in err, (extra, err)
    (tmp_path / "bad.csv").write_bytes(b"text,category\n\xff\xfe,x\n")
    rc, _, err = run_cli(["cache", "tune", "--csv", str(tmp_path / "bad.csv"), "--out", out], capsys)
    assert rc == 2 and "is not UTF-8" in err
    rc, _, err = run_cli(["cache", "tune", "--csv", str(good), "--out", "Bad Name!"], capsys)
    assert rc == 2 and "embedder name 'Bad Name!'" in err
    with pytest.raises(SystemExit):  # --csv and --tenant exclude each other; one is required
        run_cli(["cache", "tune", "--csv", str(good), "--tenant", "acme", "--out", out], capsys)
    with pytest.raises(SystemExit):
        run_cli(["cache", "tune", "--out", out], capsys)
    assert not Path(out).exists()
    rc, _, err = run_cli(["cache", "eval", "--csv", str(good), "--embedding-model", "no-such-embedder"], capsys)
    assert rc == 2 and "no-such-embedder" in err


def test_tune_on_a_tenant_reads_only_its_entries(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fp = fingerprint("m")
    rng = np.random.default_rng(0)
    with GgufEmbedder() as emb, SemanticCache.open(tmp_path, emb, CacheConfig()) as cache:
        for ns, n in (("acme", 5), ("acme/alice", 3), ("other", 30)):
            vecs = rng.normal(size=(n, emb.dim)).astype(np.float32)
            vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
            cache.store_vectors(
                ns, fp, [(f"{ns} question {i}", vecs[i], f"answer {i % 2}") for i in range(n)], model="m"
            )
    rc, _, err = run_cli(["cache", "tune", "--tenant", "acme", "--dir", str(tmp_path), "--out", "t1"], capsys)
    assert rc == 2 and "tenant acme: 8 questions with 2 distinct answers" in err


def test_the_layers_that_do_not_learn_run_once_with_the_same_vectors() -> None:
    from appliance.cache.tune import Encoder, base_checkpoint

    texts = ["how do i top up my card", "my card has not arrived yet, what should i do about it", "hi"]
    enc = Encoder(base_checkpoint(), 32)
    whole = enc.encode(texts)
    for frozen in (0, 3, 6):
        states = enc.frozen_states(texts, frozen)
        assert [len(s) for s in states] == [9, 15, 3]  # one row per token, [CLS] and [SEP] included
        np.testing.assert_allclose(enc.encode_from(states, frozen), whole, atol=1e-5)


def test_mix_keeps_that_share_of_the_weight_change(tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    from appliance.cache.replay import read_csv
    from appliance.cache.tune import Progress, TuneConfig, base_checkpoint, train

    rows = read_csv(_tiny_csv(tmp_path / "tiny.csv"))
    weights = {}
    for mix in (1.0, 0.5):
        cfg = TuneConfig(max_anchors=16, batch_size=8, threads=1, mix=mix)
        train(rows, cfg, tmp_path / f"mix{mix}", Progress(None))
        weights[mix] = load_file(str(tmp_path / f"mix{mix}" / "model.safetensors"))
    plain = {k.removeprefix("bert."): v for k, v in load_file(str(base_checkpoint() / "model.safetensors")).items()}
    top = "encoder.layer.5.output.dense.weight"  # learns
    low = "encoder.layer.0.output.dense.weight"  # stays
    assert not np.allclose(weights[1.0][top], plain[top])
    np.testing.assert_allclose(weights[0.5][top], (plain[top] + weights[1.0][top]) / 2, atol=1e-6)
    np.testing.assert_array_equal(weights[0.5][low], plain[low])

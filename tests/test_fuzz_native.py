"""The native fuzzers' regression corpora (native/fuzz/corpus/HARNESS: every input a past finding),
replayed through the Python bindings in a child process, so a crash fails the test instead of
killing pytest; plus the leak they found, measured as resident memory. Where `make fuzz` has built the
sanitizer harnesses (build/fuzz/bin), the corpora are replayed under ASan+UBSan as well.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "native" / "fuzz" / "corpus"
BIN = ROOT / "build" / "fuzz" / "bin"
WORK = ROOT / "build" / "fuzz" / "work"

sys.path.insert(0, str(ROOT / "native" / "fuzz"))
import seeds  # noqa: E402

# Replays every corpus file in a child: loaders may refuse (ValueError subclasses), nothing else
REPLAY = r"""
import sys
from pathlib import Path
from appliance import _native

base, corpus = Path(sys.argv[1]), Path(sys.argv[2])
model = _native.Model(str(base))
vocab = _native.Vocab(str(base))
engine = _native.BatchEngine(model, n_blocks=32, block_size=seeds_block, model_key="fuzz")
n = 0
for p in sorted((corpus / "gguf").glob("*")):
    try:
        _native.Model(str(p))
    except ValueError:
        pass
    n += 1
for p in sorted((corpus / "lora").glob("*")):
    try:
        engine.unload_adapter(engine.load_adapter(str(p), scale=1.0))
    except ValueError:
        pass
    n += 1
for p in sorted((corpus / "prefix").glob("*")):
    try:
        engine.load_prefix(str(p))
    except ValueError:
        pass
    assert engine.check_invariants() == "", engine.check_invariants()
    n += 1
for p in sorted((corpus / "vocab").glob("*")):
    data = p.read_bytes()
    toks = vocab.tokenize(data[1:].decode("utf-8", "replace"))
    vocab.detokenize(toks)
    n += 1
print("replayed", n)
"""


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tinymodels import make_tiny_model

    d = tmp_path_factory.mktemp("fuzz-base")
    return make_tiny_model(d / "base.gguf", "llama", "F32", n_layer=1, tied=False, **seeds.TINY)


def test_regression_corpora_replay_cleanly(base: Path) -> None:
    code = REPLAY.replace("seeds_block", str(seeds.BLOCK_SIZE))
    r = subprocess.run(
        [sys.executable, "-c", code, str(base), str(CORPUS)], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, f"replay crashed (status {r.returncode}):\n{r.stderr[-3000:]}"
    n = sum(1 for _ in CORPUS.glob("*/*"))
    assert f"replayed {n}" in r.stdout


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_refused_model_files_do_not_leak() -> None:
    """The first finding: every GGUF refused after its header was read (a tensor past the end of the
    file) leaked the whole key/value and tensor table (about 13 KB a refusal of this 12 KB file; megabytes for a
    real model's vocabulary). 3000 refusals must not grow the process by more than a few MB."""
    from appliance import _native

    path = str(CORPUS / "gguf" / "leak-truncated-tensor")

    def refuse(n: int) -> None:
        for _ in range(n):
            with pytest.raises(ValueError, match="extends past the end of the file"):
                _native.Model(path)

    refuse(300)  # allocator warm-up
    before = _rss_kib()
    refuse(3000)
    grown = _rss_kib() - before
    assert grown < 8 * 1024, f"RSS grew by {grown} KiB over 3000 refused loads"


@pytest.mark.parametrize("harness", ["gguf", "lora", "vocab", "prefix"])
def test_sanitizer_replay(harness: str) -> None:
    exe = BIN / f"fuzz_{harness}"
    if not exe.exists() or not (WORK / "base.gguf").exists():
        pytest.skip("sanitizer harnesses not built (make fuzz builds them)")
    files = [str(p) for p in sorted((CORPUS / harness).glob("*"))]
    if not files:
        pytest.skip(f"no regression inputs for {harness} yet")
    env = {**os.environ, "APPLIANCE_FUZZ_DIR": str(WORK)}
    r = subprocess.run([str(exe), *files], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]

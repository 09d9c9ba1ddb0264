"""Build flavours: the CPU level the host really executes (tools/probe_cpu.py and the Makefile's wheel
key), the CUDA flavour's Makefile logic, [model] gpu_layers through to the native core, and what
`appliance doctor` says about kernels and the GPU. The GPU test skips where ggml sees no GPU."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import numpy as np
import pytest

from appliance import _native
from appliance.cli.doctor_checks import Level, check_gpu, ggml_kernels
from appliance.common.config import ConfigError, parse_config
from appliance.engine.placement import placement

ROOT = Path(__file__).resolve().parents[1]
PORTABLE = (
    "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON "
    "-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF"
)


def _probe_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("probe_cpu", ROOT / "tools" / "probe_cpu.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["probe_cpu"] = mod  # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


probe = _probe_module()


# ---------------------------------------------------------------- the level chosen from the probes


def test_an_avx2_only_host_gets_the_portable_build() -> None:
    c = probe.select({"avx2"})
    assert (c.name, c.cmake_args, c.notes) == ("avx2", [], ())


def test_avx512_levels_stack_and_need_their_base() -> None:
    c = probe.select({"avx2", "avx512", "avx512_vnni", "avx512_bf16"})
    assert c.name == "avx512-vnni-bf16"
    assert c.cmake_args == ["-DGGML_AVX512=ON", "-DGGML_AVX512_VNNI=ON", "-DGGML_AVX512_BF16=ON"]
    # VNNI's probe passing without the AVX-512 one (or AVX-512 without AVX2) adds nothing
    assert probe.select({"avx2", "avx512_vnni"}).name == "avx2"
    assert probe.select({"avx512", "avx512_vnni"}).name == "avx2"
    assert probe.select({"avx2", "avx512", "avx512_vbmi"}).cmake_args == ["-DGGML_AVX512=ON", "-DGGML_AVX512_VBMI=ON"]


def test_avx_vnni_only_without_avx512_vnni() -> None:
    assert probe.select({"avx2", "avx_vnni"}).cmake_args == ["-DGGML_AVX_VNNI=ON"]
    assert probe.select({"avx2", "avx_vnni", "avx512", "avx512_vnni"}).name == "avx512-vnni"


def test_amx_needs_its_probe_its_base_and_the_opt_in() -> None:
    everything = {"avx2", "avx512", "avx512_vnni", "amx"}
    c = probe.select(everything)
    assert "-DGGML_AMX_TILE=ON" not in c.cmake_args and any("AMX" in n for n in c.notes)
    assert probe.select(everything, amx_opt_in=True).cmake_args[-2:] == ["-DGGML_AMX_TILE=ON", "-DGGML_AMX_INT8=ON"]
    assert "amx" not in probe.select({"avx2", "avx512", "amx"}, amx_opt_in=True).features  # no VNNI


def test_a_failed_avx2_probe_still_builds_avx2_and_says_so() -> None:
    c = probe.select(set())
    assert c.name == "avx2" and "avx2 probe failed" in c.notes[0]


def test_bad_names_are_refused() -> None:
    with pytest.raises(probe.ProbeError, match="unknown probe"):
        probe.select({"avx2", "avx1024"})
    with pytest.raises(probe.ProbeError, match="starts with avx2 or avx512"):
        probe.level_features("sse4")
    with pytest.raises(probe.ProbeError, match="unknown part"):
        probe.level_features("avx512-vnnx")


@pytest.mark.parametrize("passed", [{"avx2"}, {"avx2", "avx512", "avx512_vbmi", "avx512_vnni", "avx512_bf16"}])
def test_a_level_name_reads_back_as_the_same_build(passed: set[str]) -> None:
    c = probe.select(passed)
    assert probe.select(probe.level_features(c.name)).cmake_args == c.cmake_args


def _run_probe_script(env: dict[str, str], *args: str) -> str:
    out = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "probe_cpu.py"), *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        check=True,
    )
    return out.stdout.strip()


def test_the_fake_probe_and_the_level_override_drive_the_script() -> None:
    fake = {"APPLIANCE_CPU_PROBE_FAKE": "avx2,avx512,avx512_bf16"}
    assert _run_probe_script(fake, "--cmake-args") == "-DGGML_AVX512=ON -DGGML_AVX512_BF16=ON"
    assert _run_probe_script(fake, "--name") == "avx512-bf16"
    assert _run_probe_script({"APPLIANCE_CPU_LEVEL": "avx2"}, "--cmake-args") == ""


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler to build the probes")
def test_the_real_probes_agree_with_the_kernels_flags(tmp_path: Path) -> None:
    """Each probe compiled and run here: one passes only if the kernel lists what it executes, and on
    this kind of host (x86-64 with AVX2) the avx2 probe passes."""
    from appliance.models.ggml_cpu import cpu_flags

    flags = cpu_flags()
    passed, failed = probe.probe_all("cc", cache=tmp_path / "probe.json")
    assert passed | set(failed) == set(probe.PROBES_BY_NAME)
    needs = {"avx2": {"avx2", "fma", "f16c", "bmi2"}, "avx512": {"avx512f", "avx512bw", "avx512vl"}}
    needs |= {"avx512_vnni": {"avx512_vnni"}, "avx512_bf16": {"avx512_bf16"}, "amx": {"amx_tile"}}
    for name, want in needs.items():
        if name in passed:
            assert want <= flags, f"the {name} probe ran but the kernel does not list {want - flags}"
        elif flags and not want <= flags:
            assert failed.get(name)
    if {"avx2", "fma", "f16c", "bmi2"} <= flags:
        assert "avx2" in passed, failed.get("avx2")
    # the answer is cached per fingerprint and read back
    assert probe.probe_all("cc", cache=tmp_path / "probe.json") == (passed, failed)


# ---------------------------------------------------------------- the Makefile: wheel key, CUDA flavour


def _make(*args: str, env: dict[str, str] | None = None) -> str:
    out = subprocess.run(
        ["make", "-s", "--no-print-directory", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def _info(*args: str, env: dict[str, str] | None = None) -> dict[str, str]:
    lines = _make("build-info", *args, env=env).splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="no make")


@needs_make
def test_the_portable_key_is_the_wheel_built_before_the_probe() -> None:
    """An AVX2-only host resolves to the same key as the portable flags always had: its existing wheel
    (build/wheels/avx2-78003537) is reused, nothing is rebuilt."""
    info = _info(env={"APPLIANCE_CPU_PROBE_FAKE": "avx2"})
    assert info["cmake"] == PORTABLE
    assert info["key"] == "avx2-78003537"
    assert _info("CPU_LEVEL=avx2", env={"APPLIANCE_CPU_PROBE_FAKE": "avx2,avx512"})["key"] == "avx2-78003537"


@needs_make
def test_other_flags_get_their_own_wheel_folder() -> None:
    wide = _info(env={"APPLIANCE_CPU_PROBE_FAKE": "avx2,avx512,avx512_vnni,avx512_bf16"})
    assert wide["cmake"] == PORTABLE + " -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON"
    assert wide["key"].startswith("avx512-vnni-bf16-") and wide["wheels"] == "build/wheels/" + wide["key"]
    cuda = _info("GPU=cuda", "CUDA_ARCH=90", env={"APPLIANCE_CPU_PROBE_FAKE": "avx2"})
    assert cuda["key"].startswith("cuda90-avx2-")
    assert " -DGGML_CUDA=ON -DGGML_CUDA_NO_VMM=ON -DCMAKE_CUDA_ARCHITECTURES=90 " in cuda["cmake"]
    assert len({wide["key"], cuda["key"], "avx2-78003537"}) == 3


@needs_make
def test_make_n_gpu_cuda_assembles_the_pinned_toolkit_and_builds_the_cuda_wheel() -> None:
    plan = _make("-n", "GPU=cuda", "CUDA_ARCH=90", "build", env={"APPLIANCE_CPU_PROBE_FAKE": "avx2"})
    assert "nvidia-cuda-nvcc==13.0.88" in plan and "nvidia-cublas==13.0.2.14" in plan
    assert "-w build/wheels/cuda90-avx2-" in plan and "-DGGML_CUDA=ON" in plan
    assert "--force-reinstall --no-deps build/wheels/cuda90-avx2-" in plan  # replaces the CPU wheel
    bundle = _make("-n", "GPU=cuda", "CUDA_ARCH=90", "bundle", env={"APPLIANCE_CPU_PROBE_FAKE": "avx2"})
    assert "-w build/wheels-dl-cuda90 " in bundle and "-DGGML_BACKEND_DL=ON" in bundle


@needs_make
def test_an_unknown_gpu_flavour_stops_make() -> None:
    out = subprocess.run(["make", "-n", "GPU=rocm", "build"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode != 0 and "GPU=rocm: the GPU flavour is GPU=cuda" in out.stderr


# ---------------------------------------------------------------- gpu_layers and where the model runs


def test_gpu_layers_config() -> None:
    assert parse_config("").model.gpu_layers == -1
    assert parse_config("[model]\ngpu_layers = 12\n").model.gpu_layers == 12
    with pytest.raises(ConfigError, match="gpu_layers"):
        parse_config("[model]\ngpu_layers = -2\n")


def test_placement_says_what_is_on_the_gpu() -> None:
    def m(device: str, n: int, out: bool) -> Any:
        return SimpleNamespace(device=device, n_layer=18, gpu_layers=n, output_on_device=out)

    assert placement(m("CPU", 0, True)) == "the CPU"
    assert placement(m("CUDA0", 18, True)) == "CUDA0: 18/18 layers, embeddings and head"
    assert placement(m("CUDA0", 6, False)) == "CUDA0: 6/18 layers; embeddings and head on the CPU"


def _has_gpu() -> bool:
    return bool(_native.system_info().get("gpus"))


def test_gpu_layers_on_a_machine_without_gpu_is_the_cpu(tiny_model: Callable[..., Path]) -> None:
    if _has_gpu():
        pytest.skip("this machine has a GPU: test_partial_offload_matches_the_cpu covers it")
    path = str(tiny_model("llama"))
    for n in (-1, 0, 1):
        m = _native.Model(path, gpu_layers=n)
        assert (m.device, m.gpu_layers) == ("CPU", 0)


@pytest.mark.skipif(not _has_gpu(), reason="no GPU: ggml sees no GPU device (a CPU build, or no GPU here)")
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_partial_offload_matches_the_cpu(arch: str, tiny_model: Callable[..., Path]) -> None:
    path = str(tiny_model(arch))
    prompt = list(range(5, 45))
    out = {}
    for n in (0, 1, -1):
        m = _native.Model(path, gpu_layers=n)
        want = 0 if n == 0 else m.n_layer if n < 0 else n
        assert m.gpu_layers == want and m.output_on_device == (n <= 0)
        ctx = _native.Context(m, n_ctx=128, n_threads=2)
        ctx.decode(prompt, all_logits=True)
        out[n] = ctx.all_logits()
    scale = max(1.0, float(np.abs(out[0]).max()))
    for n in (1, -1):
        assert float(np.abs(out[n] - out[0]).max()) / scale < 2e-2, f"gpu_layers={n}"


# ---------------------------------------------------------------- doctor: kernels and GPU


def test_doctor_names_the_kernels() -> None:
    c = ggml_kernels({"cpu_features": ["SSE3=1", "AVX=1", "AVX2=1", "AVX512=1", "AVX512_VNNI=1", "REPACK=1"]})
    assert c.level is Level.OK and c.detail.startswith("AVX512_VNNI (")
    assert ggml_kernels({"cpu_features": ["AVX=1", "AVX2=1", "AVX512=0"]}).detail == "AVX2 (AVX AVX2)"
    assert ggml_kernels({}).level is Level.WARN
    here = ggml_kernels(_native.system_info())
    assert here.level is Level.OK


def test_doctor_gpu_cases(tmp_path: Path) -> None:
    cfg = parse_config("[model]\ngpu_layers = 10\n")
    smi = [{"name": "NVIDIA RTX 4090", "memory.total": "24564 MiB", "driver_version": "580.1"}]
    cpu_build = {"backends": ["CPU"], "gpus": []}
    assert check_gpu(cfg, cpu_build, [], dev=tmp_path).detail == "no GPU: CPU"
    w = check_gpu(cfg, cpu_build, smi, dev=tmp_path)
    assert w.level is Level.WARN and "CPU build" in w.detail and "GPU=cuda" in w.fix
    cuda_no_dev = {"backends": ["CPU", "CUDA"], "gpus": []}
    c = check_gpu(cfg, cuda_no_dev, [], dev=tmp_path)
    assert c.level is Level.OK and c.detail.startswith("no GPU: CPU (this build has ggml's CUDA backend")
    assert check_gpu(cfg, cuda_no_dev, smi, dev=tmp_path).level is Level.WARN  # a card it cannot use
    gpu = {"name": "CUDA0", "description": "NVIDIA RTX 4090", "memory_total": 24 * 1024**3, "memory_free": 20 * 1024**3}
    ok = check_gpu(cfg, {"backends": ["CPU", "CUDA"], "gpus": [gpu]}, smi, dev=tmp_path)
    assert ok.level is Level.OK
    assert "CUDA0 NVIDIA RTX 4090, 24.0 GiB (20.0 free), driver 580.1" in ok.detail
    assert "the last 10 layers" in ok.detail

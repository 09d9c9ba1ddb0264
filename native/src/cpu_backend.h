// The CPU backend reached through ggml's backend registry only, never by linking libggml-cpu: in a
// GGML_BACKEND_DL build the CPU backend is one of several variant modules (haswell, skylakex, ...)
// that the Python side picks for this CPU and loads at import (appliance/models/ggml_cpu.py). The same
// calls work in a build that links one CPU backend.
#pragma once

#include "ggml-backend.h"

#include <cstddef>
#include <string>
#include <vector>

namespace appliance {

// the registered CPU device; throws RuntimeFailure when no CPU backend is loaded
ggml_backend_dev_t cpu_device();

// ggml_backend_cpu_set_n_threads, looked up in the backend's registry entry (no-op if it has none)
void cpu_set_n_threads(ggml_backend_t backend, int n_threads);

// ggml_backend_cpu_buffer_from_ptr: a CPU buffer over memory we own (the model's mmap)
ggml_backend_buffer_t cpu_buffer_from_ptr(void * ptr, size_t size);

// what the loaded CPU backend was built to use, as ggml names it ("AVX2", "AVX512", "AMX_INT8", ...)
std::vector<std::string> cpu_features();

}  // namespace appliance

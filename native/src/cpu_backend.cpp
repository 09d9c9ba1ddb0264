#include "cpu_backend.h"

#include "error.h"

namespace appliance {

ggml_backend_dev_t cpu_device() {
    ggml_backend_dev_t dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
    if (dev == nullptr) {
        throw RuntimeFailure("no ggml CPU backend is loaded: `import appliance` loads the variant for this CPU "
                             "from llama_cpp/lib (see `appliance doctor`)");
    }
    return dev;
}

void cpu_set_n_threads(ggml_backend_t backend, int n_threads) {
    ggml_backend_reg_t reg = ggml_backend_dev_backend_reg(ggml_backend_get_device(backend));
    auto fn = reinterpret_cast<ggml_backend_set_n_threads_t>(
        ggml_backend_reg_get_proc_address(reg, "ggml_backend_set_n_threads"));
    if (fn != nullptr) {
        fn(backend, n_threads);
    }
}

ggml_backend_buffer_t cpu_buffer_from_ptr(void * ptr, size_t size) {
    ggml_backend_buffer_t buf = ggml_backend_dev_buffer_from_host_ptr(cpu_device(), ptr, size, size);
    if (buf == nullptr) {
        throw RuntimeFailure("the CPU backend cannot wrap the model's memory map in a buffer");
    }
    return buf;
}

std::vector<std::string> cpu_features() {
    std::vector<std::string> out;
    ggml_backend_reg_t reg = ggml_backend_dev_backend_reg(cpu_device());
    auto fn = reinterpret_cast<ggml_backend_get_features_t>(ggml_backend_reg_get_proc_address(reg, "ggml_backend_get_features"));
    if (fn == nullptr) {
        return out;
    }
    for (ggml_backend_feature * f = fn(reg); f->name != nullptr; ++f) {
        out.push_back(std::string(f->name) + "=" + f->value);
    }
    return out;
}

}  // namespace appliance

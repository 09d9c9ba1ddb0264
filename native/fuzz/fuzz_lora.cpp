// LoRA adapter loading as the engine does it (BatchEngine::load_adapter: LoraAdapter::load checks the
// file against the base model, LoraBank::add uploads it into the stacks), then unloading it. The base
// is APPLIANCE_FUZZ_DIR/base.gguf; seeds are adapters for it. Only ModelFormatError /
// InvalidArgument may come out, and the bank must be empty again afterwards.
#include "fuzz_common.h"
#include "gguf_mutator.h"

#include "batch_engine.h"
#include "model.h"

#include <memory>

namespace {

fuzz::InputFile *                        g_in = nullptr;
std::unique_ptr<appliance::Model>        g_model;
std::unique_ptr<appliance::BatchEngine>  g_engine;

}  // namespace

extern "C" int LLVMFuzzerInitialize(int *, char ***) {
    fuzz::quiet_logs();
    g_in = new fuzz::InputFile();
    appliance::ModelParams mp;
    mp.use_gpu = false;
    g_model    = appliance::Model::load(fuzz::fuzz_file("base.gguf"), mp);
    appliance::BatchEngineParams p;
    p.n_blocks  = 8;
    p.n_threads = 1;
    g_engine    = std::make_unique<appliance::BatchEngine>(*g_model, p);
    return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t * data, size_t size) {
    const std::string & path  = g_in->write(data, size);
    const float         scale = size > 0 ? static_cast<float>(data[size - 1]) / 64.0f - 1.0f : 1.0f;
    fuzz::expect_clean_errors([&] {
        const int64_t id = g_engine->load_adapter(path, scale);
        if (!g_engine->unload_adapter(id)) {
            std::fprintf(stderr, "an adapter no request uses was not freed at once\n");
            std::abort();
        }
    });
    const auto s = g_engine->stats();
    if (s.n_adapters != 0 || s.adapter_bytes != 0) {
        std::fprintf(stderr, "adapter bank not empty after unload: %u adapters, %zu bytes\n", s.n_adapters, s.adapter_bytes);
        std::abort();
    }
    return 0;
}

extern "C" size_t LLVMFuzzerCustomMutator(uint8_t * data, size_t size, size_t max_size, unsigned int seed) {
    return fuzz::mutate_gguf_input(data, size, max_size, seed);
}

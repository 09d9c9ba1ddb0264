// The hot-prefix file reader (BatchEngine::load_prefix, batch_engine.cpp), on two engines: a model
// with only global attention (APPLIANCE_FUZZ_DIR/base.gguf) and one with sliding-window layers
// (base-swa.gguf), so both the global and the windowed K/V sections are read. Only ModelFormatError
// may come out, and the block pools' invariants must hold after every file.
#include "fuzz_common.h"

#include "batch_engine.h"
#include "model.h"

#include <cstring>
#include <memory>
#include <random>

extern "C" size_t LLVMFuzzerMutate(uint8_t * data, size_t size, size_t max_size);

namespace {

fuzz::InputFile *                                   g_in = nullptr;
std::vector<std::unique_ptr<appliance::Model>>      g_models;
std::vector<std::unique_ptr<appliance::BatchEngine>> g_engines;

// the seeds' engines (native/fuzz/seeds.py): block size 4, model key "fuzz"
constexpr uint32_t kBlockSize = 4;

}  // namespace

extern "C" int LLVMFuzzerInitialize(int *, char ***) {
    fuzz::quiet_logs();
    g_in = new fuzz::InputFile();
    for (const char * name : {"base.gguf", "base-swa.gguf"}) {
        appliance::ModelParams mp;
        mp.use_gpu = false;
        g_models.push_back(appliance::Model::load(fuzz::fuzz_file(name), mp));
        appliance::BatchEngineParams p;
        p.n_blocks   = 32;
        p.block_size = kBlockSize;
        p.n_threads  = 1;
        p.model_key  = "fuzz";
        g_engines.push_back(std::make_unique<appliance::BatchEngine>(*g_models.back(), p));
    }
    return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t * data, size_t size) {
    const std::string & path = g_in->write(data, size);
    for (auto & e : g_engines) {
        fuzz::expect_clean_errors([&] { (void)e->load_prefix(path); });
        const std::string err = e->check_invariants();
        if (!err.empty()) {
            std::fprintf(stderr, "block-pool invariants broken after load_prefix: %s\n", err.c_str());
            std::abort();
        }
    }
    return 0;
}

// header-aware: the counts (n_blocks, n_swa_blocks) and the token ids are what a damaged file gets wrong
extern "C" size_t LLVMFuzzerCustomMutator(uint8_t * data, size_t size, size_t max_size, unsigned int seed) {
    std::mt19937 rng(seed);
    constexpr size_t kHeader = 48;  // PrefixHeader: magic, model, salt, 6 x u32
    if (size >= kHeader && rng() % 4 != 0) {
        const size_t field = 24 + 4 * (rng() % 6);  // block_size, n_layer, n_embd_k, n_embd_v, n_blocks, n_swa_blocks
        const uint32_t vals[] = {0, 1, 2, 3, 7, 8, 31, 32, 33, 64, 0x7fffffffu, 0xffffffffu};
        uint32_t v;
        std::memcpy(&v, data + field, 4);
        switch (rng() % 3) {
            case 0: v = vals[rng() % 12]; break;
            case 1: v += (rng() % 2) ? 1 : -1; break;
            default: {  // a token id
                const size_t at = kHeader + 4 * (rng() % 64);
                if (at + 4 <= size) {
                    const int32_t t = static_cast<int32_t>(rng());
                    std::memcpy(data + at, &t, 4);
                }
                return size;
            }
        }
        std::memcpy(data + field, &v, 4);
        if (rng() % 4 == 0) return std::min(size, static_cast<size_t>(rng() % (size + 1)));  // and truncated
        return size;
    }
    return LLVMFuzzerMutate(data, size, max_size);
}

// GGUF parsing and model loading: GgufFile (ggml's gguf reader plus our bounds checks), every
// metadata getter the loaders use, the hyper-parameters and Model::load (architecture, tensor shapes
// and types, placement of the weights). Only ModelFormatError / InvalidArgument may come out.
#include "fuzz_common.h"
#include "gguf_mutator.h"

#include "gguf_file.h"
#include "model.h"

#include "ggml-backend.h"

namespace {

fuzz::InputFile * g_in = nullptr;

void read_metadata(const appliance::GgufFile & f) {
    static const char * keys[] = {"general.architecture", "general.type", "general.alignment", "llama.block_count",
                                  "llama.context_length", "llama.rope.freq_base", "tokenizer.ggml.tokens",
                                  "gemma3.attention.sliding_window_pattern", "llama.attention.head_count"};
    for (const char * k : keys) {
        fuzz::expect_clean_errors([&] { (void)f.get_str(k); });
        fuzz::expect_clean_errors([&] { (void)f.get_u32(k); });
        fuzz::expect_clean_errors([&] { (void)f.get_f32(k); });
        fuzz::expect_clean_errors([&] { (void)f.get_bool(k); });
        fuzz::expect_clean_errors([&] { (void)f.get_int_arr(k); });
    }
    for (int64_t i = 0; i < f.n_tensors(); ++i) {
        (void)f.tensor_data(f.tensor_at(i));
    }
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int *, char ***) {
    fuzz::quiet_logs();
    g_in = new fuzz::InputFile();
    return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t * data, size_t size) {
    const std::string & path = g_in->write(data, size);
    fuzz::expect_clean_errors([&] {
        appliance::GgufFile f(path);
        read_metadata(f);
    });
    fuzz::expect_clean_errors([&] {
        appliance::ModelParams p;
        p.use_gpu = false;
        auto m    = appliance::Model::load(path, p);
    });
    return 0;
}

extern "C" size_t LLVMFuzzerCustomMutator(uint8_t * data, size_t size, size_t max_size, unsigned int seed) {
    return fuzz::mutate_gguf_input(data, size, max_size, seed);
}

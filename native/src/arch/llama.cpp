// Llama 2/3, Mistral, SmolLM, TinyLlama: pre-norm decoder, RoPE (normal mode), GQA, SwiGLU FFN.
#include "arch/arch.h"
#include "gguf_file.h"
#include "model.h"

#include "ggml.h"

namespace appliance {

namespace {

void load_hparams(HParams & hp, const GgufFile &) {
    hp.rope_mode = 0;  // GGML_ROPE_TYPE_NORM: rotate adjacent pairs
}

void load_tensors(Model & m, TensorLoader & tl) {
    load_common_tensors(m, tl);
    // Llama 3.1+ long-context rope scaling ships per-frequency factors
    m.rope_freqs = tl.get("rope_freqs.weight", {m.hp.n_rot / 2}, TensorLoader::Use::Elementwise, /*required=*/false);
}

}  // namespace

const ArchSpec kArchLlama = {"llama", load_hparams, load_tensors, build_prenorm_layer};

}  // namespace appliance

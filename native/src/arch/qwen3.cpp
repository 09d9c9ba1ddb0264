// Qwen3: Llama layout with per-head RMS norms on q and k before RoPE (NeoX-style), no biases.
#include "arch/arch.h"
#include "gguf_file.h"
#include "model.h"

#include "ggml.h"

namespace appliance {

namespace {

void load_hparams(HParams & hp, const GgufFile &) {
    hp.rope_mode = GGML_ROPE_TYPE_NEOX;
}

void load_tensors(Model & m, TensorLoader & tl) {
    load_common_tensors(m, tl);
    load_qk_norms(m, tl);
}

}  // namespace

const ArchSpec kArchQwen3 = {"qwen3", load_hparams, load_tensors, build_prenorm_layer};

}  // namespace appliance

// Qwen2 / Qwen2.5: Llama layout with biases on q, k and v, and NeoX-style RoPE.
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
    using Use = TensorLoader::Use;
    load_common_tensors(m, tl);
    const HParams & hp = m.hp;
    for (uint32_t il = 0; il < hp.n_layer; ++il) {
        LayerWeights & L = m.layers[il];
        L.bq = tl.get_layer(il, "attn_q.bias", {hp.n_embd_q()}, Use::Elementwise);
        L.bk = tl.get_layer(il, "attn_k.bias", {hp.n_embd_k_gqa()}, Use::Elementwise);
        L.bv = tl.get_layer(il, "attn_v.bias", {hp.n_embd_v_gqa()}, Use::Elementwise);
    }
}

}  // namespace

const ArchSpec kArchQwen2 = {"qwen2", load_hparams, load_tensors, build_prenorm_layer};

}  // namespace appliance

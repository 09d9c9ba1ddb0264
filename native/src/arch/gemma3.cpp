// Gemma 3: interleaved sliding-window (local) and global attention layers with their own RoPE
// bases, QK-norm, norms both before and after attention and FFN, embeddings scaled by
// sqrt(n_embd), GeGLU FFN and an output head tied to the embeddings.
#include "arch/arch.h"
#include "error.h"
#include "graph.h"
#include "gguf_file.h"
#include "model.h"

#include "ggml.h"

#include <cmath>

namespace appliance {

namespace {

void load_hparams(HParams & hp, const GgufFile & f) {
    hp.rope_mode = GGML_ROPE_TYPE_NEOX;
    hp.n_swa     = f.get_u32("gemma3.attention.sliding_window").value_or(0);
    if (hp.n_swa > 0) {
        read_swa_pattern(hp, f, /*default_period=*/6);  // five local layers, then one global
        hp.rope_freq_base_swa  = f.get_f32("gemma3.rope.freq_base_swa").value_or(10000.0f);
        hp.rope_freq_scale_swa = 1.0f;
    }
    hp.final_logit_softcap = f.get_f32("gemma3.final_logit_softcapping").value_or(0.0f);
    hp.embd_scale          = std::sqrt(static_cast<float>(hp.n_embd));
    // query_pre_attn_scalar: head_dim for every size but 27B, where it is n_embd / n_head
    hp.attn_scale = hp.n_layer == 62 ? 1.0f / std::sqrt(static_cast<float>(hp.n_embd / hp.n_head))
                                     : 1.0f / std::sqrt(static_cast<float>(hp.head_dim_k));
}

void load_tensors(Model & m, TensorLoader & tl) {
    using Use = TensorLoader::Use;
    load_common_tensors(m, tl);
    load_qk_norms(m, tl);
    const HParams & hp = m.hp;
    for (uint32_t il = 0; il < hp.n_layer; ++il) {
        LayerWeights & L = m.layers[il];
        L.attn_post_norm = tl.get_layer(il, "post_attention_norm.weight", {hp.n_embd}, Use::Elementwise);
        L.ffn_post_norm = tl.get_layer(il, "post_ffw_norm.weight", {hp.n_embd}, Use::Elementwise);
    }
}

ggml_tensor * build_layer(GraphBuilder & g, uint32_t il, ggml_tensor * x) {
    const HParams &      hp = g.hp;
    const LayerWeights & L  = g.model.layers[il];

    ggml_tensor * h = g.rms_norm(x, L.attn_norm);  // [n_embd, n_tokens]
    ggml_tensor *q, *k, *v;
    g.qkv(L, h, &q, &k, &v);
    q = g.rope(g.rms_norm(q, L.q_norm), il);
    k = g.rope(g.rms_norm(k, L.k_norm), il);
    q = ggml_scale(g.ctx, q, hp.attn_scale);  // scale q up front, as the reference does
    h = g.attention(il, q, k, v, 1.0f);       // [n_embd, n_tokens]

    if (il == hp.n_layer - 1) {
        h = g.select_outputs(h);
        x = g.select_outputs(x);
    }
    h = g.rms_norm(h, L.attn_post_norm);
    ggml_tensor * sa_out = ggml_add(g.ctx, h, x);

    h = g.rms_norm(sa_out, L.ffn_norm);
    h = g.ffn(L, h, FfnAct::Gelu);
    h = g.rms_norm(h, L.ffn_post_norm);
    return ggml_add(g.ctx, h, sa_out);
}

}  // namespace

const ArchSpec kArchGemma3 = {"gemma3", load_hparams, load_tensors, build_layer};

}  // namespace appliance

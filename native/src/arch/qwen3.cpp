// Qwen3: Llama layout with per-head RMS norms on q and k before RoPE (NeoX-style), no biases.
#include "arch/arch.h"
#include "graph.h"
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
        L.q_norm = tl.get_layer(il, "attn_q_norm.weight", {hp.head_dim_k}, Use::Elementwise);
        L.k_norm = tl.get_layer(il, "attn_k_norm.weight", {hp.head_dim_k}, Use::Elementwise);
    }
}

ggml_tensor * build_graph(GraphBuilder & g) {
    const HParams & hp = g.hp;
    ggml_tensor * x = g.embed_tokens();  // [n_embd, n_tokens]

    for (uint32_t il = 0; il < hp.n_layer; ++il) {
        const LayerWeights & L = g.model.layers[il];
        ggml_tensor * residual = x;

        ggml_tensor * h = g.rms_norm(x, L.attn_norm);
        ggml_tensor *q, *k, *v;
        g.qkv(L, h, &q, &k, &v);
        q = g.rope(g.rms_norm(q, L.q_norm), il);  // norm over head_dim, per head
        k = g.rope(g.rms_norm(k, L.k_norm), il);
        h = g.attention(il, q, k, v, hp.attn_scale);

        if (il == hp.n_layer - 1) {
            h        = g.select_outputs(h);
            residual = g.select_outputs(residual);
        }
        ggml_tensor * ffn_in = ggml_add(g.ctx, h, residual);
        h = g.rms_norm(ffn_in, L.ffn_norm);
        h = g.ffn(L, h, FfnAct::Silu);
        x = ggml_add(g.ctx, h, ffn_in);
    }
    return g.lm_head(x);  // [n_vocab, n_outputs]
}

}  // namespace

const ArchSpec kArchQwen3 = {"qwen3", load_hparams, load_tensors, build_graph};

}  // namespace appliance

// Llama 2/3, Mistral, SmolLM, TinyLlama: pre-norm decoder, RoPE (normal mode), GQA, SwiGLU FFN.
#include "arch/arch.h"
#include "graph.h"
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

ggml_tensor * build_graph(GraphBuilder & g) {
    const HParams & hp = g.hp;
    ggml_tensor * x = g.embed_tokens();  // [n_embd, n_tokens]

    for (uint32_t il = 0; il < hp.n_layer; ++il) {
        const LayerWeights & L = g.model.layers[il];
        ggml_tensor * residual = x;

        ggml_tensor * h = g.rms_norm(x, L.attn_norm);
        ggml_tensor *q, *k, *v;
        g.qkv(L, h, &q, &k, &v);
        q = g.rope(q, il);
        k = g.rope(k, il);
        h = g.attention(il, q, k, v, hp.attn_scale);  // [n_embd, n_tokens]

        if (il == hp.n_layer - 1) {  // only the output tokens go on
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

const ArchSpec kArchLlama = {"llama", load_hparams, load_tensors, build_graph};

}  // namespace appliance

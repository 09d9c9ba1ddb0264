#include "arch/arch.h"

#include "graph.h"
#include "model.h"

#include "ggml.h"

namespace appliance {

namespace {
const ArchSpec * const kAll[] = {&kArchLlama, &kArchQwen2, &kArchQwen3, &kArchGemma3};
}

const ArchSpec * find_arch(const std::string & name) {
    for (const ArchSpec * a : kAll) {
        if (name == a->name) {
            return a;
        }
    }
    return nullptr;
}

std::string supported_archs() {
    std::string out;
    for (const ArchSpec * a : kAll) {
        out += out.empty() ? "" : ", ";
        out += a->name;
    }
    return out;
}

void load_common_tensors(Model & m, TensorLoader & tl) {
    using Use = TensorLoader::Use;
    const HParams & hp = m.hp;
    const int64_t n_embd = hp.n_embd, n_vocab = hp.n_vocab, n_ff = hp.n_ff;

    m.tok_embd    = tl.get("token_embd.weight", {n_embd, n_vocab}, Use::GetRows);
    m.output_norm = tl.get("output_norm.weight", {n_embd}, Use::Elementwise);
    m.output      = tl.get("output.weight", {n_embd, n_vocab}, Use::MatMul, /*required=*/false);
    if (m.output == nullptr) {
        // tied head: the embedding matrix is also read by a mat-mul
        m.output = tl.get("token_embd.weight", {n_embd, n_vocab}, Use::MatMul);
    }

    m.layers.resize(hp.n_layer);
    for (uint32_t il = 0; il < hp.n_layer; ++il) {
        LayerWeights & L = m.layers[il];
        L.attn_norm = tl.get_layer(il, "attn_norm.weight", {n_embd}, Use::Elementwise);
        L.wq        = tl.get_layer(il, "attn_q.weight", {n_embd, hp.n_embd_q()}, Use::MatMul);
        L.wk        = tl.get_layer(il, "attn_k.weight", {n_embd, hp.n_embd_k_gqa()}, Use::MatMul);
        L.wv        = tl.get_layer(il, "attn_v.weight", {n_embd, hp.n_embd_v_gqa()}, Use::MatMul);
        L.wo        = tl.get_layer(il, "attn_output.weight", {hp.n_embd_q(), n_embd}, Use::MatMul);
        L.ffn_norm  = tl.get_layer(il, "ffn_norm.weight", {n_embd}, Use::Elementwise);
        L.ffn_gate  = tl.get_layer(il, "ffn_gate.weight", {n_embd, n_ff}, Use::MatMul);
        L.ffn_up    = tl.get_layer(il, "ffn_up.weight", {n_embd, n_ff}, Use::MatMul);
        L.ffn_down  = tl.get_layer(il, "ffn_down.weight", {n_ff, n_embd}, Use::MatMul);
    }
}

void load_qk_norms(Model & m, TensorLoader & tl) {
    for (uint32_t il = 0; il < m.hp.n_layer; ++il) {
        LayerWeights & L = m.layers[il];
        L.q_norm = tl.get_layer(il, "attn_q_norm.weight", {m.hp.head_dim_k}, TensorLoader::Use::Elementwise);
        L.k_norm = tl.get_layer(il, "attn_k_norm.weight", {m.hp.head_dim_k}, TensorLoader::Use::Elementwise);
    }
}

ggml_tensor * build_prenorm_layer(GraphBuilder & g, uint32_t il, ggml_tensor * x) {
    const HParams &      hp       = g.hp;
    const LayerWeights & L        = g.model.layers[il];
    ggml_tensor *        residual = x;  // [n_embd, n_tokens]

    ggml_tensor * h = g.rms_norm(x, L.attn_norm);
    ggml_tensor *q, *k, *v;
    g.qkv(L, h, &q, &k, &v);  // biases added inside when present
    if (L.q_norm) q = g.rms_norm(q, L.q_norm);  // per head, over head_dim
    if (L.k_norm) k = g.rms_norm(k, L.k_norm);
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
    return ggml_add(g.ctx, h, ffn_in);
}

}  // namespace appliance

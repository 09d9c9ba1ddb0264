// Builds one forward pass as a ggml graph. The pieces every architecture shares live here
// (embedding, RMS norm, RoPE, attention over the KV cache, gated FFN, output head); each
// architecture file strings them together in its own order.
#pragma once

#include "ggml.h"

#include <cstdint>

namespace appliance {

class KvStorage;
struct HParams;
struct LayerWeights;
struct Model;

// The shape of one micro-batch: what the graph's topology depends on.
struct UBatchShape {
    uint32_t n_tokens  = 0;
    uint32_t n_outputs = 0;  // tokens whose logits are computed (n_tokens when all are)
    uint32_t n_kv      = 0;  // attention reads cells [0, n_kv)

    bool operator==(const UBatchShape & o) const {
        return n_tokens == o.n_tokens && n_outputs == o.n_outputs && n_kv == o.n_kv;
    }
};

enum class FfnAct { Silu, Gelu };

class GraphBuilder {
public:
    GraphBuilder(ggml_context * ctx, ggml_cgraph * gf, const Model & m, const KvStorage & kv, const UBatchShape & ub);

    const Model &       model;
    const HParams &     hp;
    ggml_context *      ctx;
    ggml_cgraph *       gf;
    const KvStorage &   kv;
    const UBatchShape   ub;

    // graph inputs, filled by the runner once the graph is allocated
    ggml_tensor * inp_tokens   = nullptr;  // I32 [n_tokens]
    ggml_tensor * inp_pos      = nullptr;  // I32 [n_tokens]
    ggml_tensor * inp_kv_idx   = nullptr;  // I64 [n_tokens]   cell that receives each token's K and V
    ggml_tensor * inp_mask     = nullptr;  // F16 [n_kv, n_tokens]  0 or -inf
    ggml_tensor * inp_mask_swa = nullptr;  // F16 [n_kv, n_tokens]  for sliding-window layers (nullptr if none)
    ggml_tensor * inp_out_ids  = nullptr;  // I32 [n_outputs]  (nullptr when every token is an output)

    // token embeddings scaled by hp.embd_scale: [n_embd, n_tokens]
    ggml_tensor * embed_tokens();
    // x * rsqrt(mean(x^2) + eps) * w, along dim 0
    ggml_tensor * rms_norm(ggml_tensor * x, ggml_tensor * w);
    // x: [head_dim, n_heads, n_tokens]; rotates with the layer's base (sliding-window layers differ)
    ggml_tensor * rope(ggml_tensor * x, uint32_t il);
    // projections: returns q [head_dim, n_head, n_tokens], k and v [head_dim, n_head_kv, n_tokens]
    void qkv(const LayerWeights & L, ggml_tensor * x, ggml_tensor ** q, ggml_tensor ** k, ggml_tensor ** v);
    // stores k, v in the cache, attends over cells [0, n_kv) and applies the output projection
    // q [head_dim, n_head, n_tokens], k/v [head_dim, n_head_kv, n_tokens] -> [n_embd, n_tokens]
    ggml_tensor * attention(uint32_t il, ggml_tensor * q, ggml_tensor * k, ggml_tensor * v, float kq_scale);
    // down(act(gate(x)) * up(x)): [n_embd, n] -> [n_embd, n]
    ggml_tensor * ffn(const LayerWeights & L, ggml_tensor * x, FfnAct act);
    // keeps only the output tokens' rows (call at the last layer, before the per-token tail)
    ggml_tensor * select_outputs(ggml_tensor * x);
    // final norm, output head, optional soft-capping: [n_embd, n_outputs] -> [n_vocab, n_outputs]
    ggml_tensor * lm_head(ggml_tensor * x);
};

}  // namespace appliance

// Builds one forward pass as a ggml graph. The pieces every architecture shares live here
// (embedding, RMS norm, RoPE, attention over the KV cache, gated FFN, output head); each
// architecture file strings them together in its own order.
#pragma once

#include "ggml.h"

#include <cstdint>

namespace appliance {

class KvStorage;
class LoraBank;
struct HParams;
struct LayerWeights;
struct Model;

// The shape of one micro-batch: what the graph's topology depends on.
struct UBatchShape {
    uint32_t n_tokens  = 0;
    uint32_t n_outputs = 0;  // tokens whose logits are computed (n_tokens when all are)
    uint32_t n_kv      = 0;  // attention reads cells [0, n_kv)
    uint32_t n_kv_swa  = 0;  // sliding-window layers read cells [0, n_kv_swa) of their pool (0: no such layers)
    // gather: attention reads n_kv rows gathered from the pool (inp_kv_rows) instead of cells [0, n_kv)
    bool     gather     = false;
    bool     gather_swa = false;
    // lora: some row has an adapter, so the adapted mat-muls add their LoRA term (inp_lora_ids)
    bool     lora       = false;

    bool operator==(const UBatchShape & o) const {
        return n_tokens == o.n_tokens && n_outputs == o.n_outputs && n_kv == o.n_kv && n_kv_swa == o.n_kv_swa &&
               gather == o.gather && gather_swa == o.gather_swa && lora == o.lora;
    }
};

enum class FfnAct { Silu, Gelu };

enum class Head { None, Full, Shortlist };

// Which part of the network one forward pass runs: the whole of it by default. Early exit runs a
// pass over layers [0, E) with a cheap head, and may finish the rest in a later pass from the
// hidden states the first one kept.
// Precondition for any pass other than the default: every token is an output.
struct PassSpec {
    uint32_t l_begin     = 0;           // > 0: starts from hidden states an earlier pass kept
    uint32_t l_end       = UINT32_MAX;  // one past the last layer run (clamped to n_layer)
    Head     head        = Head::Full;  // logits over the whole vocabulary, or the shortlist
    bool     keep_hidden = false;       // keep every token's layer-l_end hidden state (its hidden row)
    bool     fill_kv     = false;       // write K/V of layers [l_end, n_layer) from that state (CALM)

    bool operator==(const PassSpec & o) const {
        return l_begin == o.l_begin && l_end == o.l_end && head == o.head && keep_hidden == o.keep_hidden &&
               fill_kv == o.fill_kv;
    }
    bool is_full() const { return *this == PassSpec{}; }
};

class GraphBuilder {
public:
    // hidden: [n_embd, n_rows] F32 store of hidden states between passes (needed when the pass
    // keeps or reads them); shortlist: [n_embd, n_short] output rows of the shortlisted tokens;
    // lora: the adapters (needed when ub.lora)
    GraphBuilder(ggml_context * ctx, ggml_cgraph * gf, const Model & m, const KvStorage & kv, const UBatchShape & ub,
                 const PassSpec & pass = PassSpec{}, ggml_tensor * hidden = nullptr, ggml_tensor * shortlist = nullptr,
                 const LoraBank * lora = nullptr);

    const Model &       model;
    const HParams &     hp;
    ggml_context *      ctx;
    ggml_cgraph *       gf;
    const KvStorage &   kv;
    const UBatchShape   ub;
    const PassSpec      pass;
    const uint32_t      l_end;  // pass.l_end clamped to n_layer
    ggml_tensor * const hidden;
    ggml_tensor * const shortlist;
    const LoraBank *    lora;

    // graph inputs, filled by the runner once the graph is allocated
    ggml_tensor * inp_tokens   = nullptr;  // I32 [n_tokens]
    ggml_tensor * inp_pos      = nullptr;  // I32 [n_tokens]
    ggml_tensor * inp_kv_idx   = nullptr;  // I64 [n_tokens]   cell that receives each token's K and V
    ggml_tensor * inp_kv_idx_swa = nullptr;  // I64 [n_tokens]   the same in the sliding-window pool (nullptr if none)
    ggml_tensor * inp_kv_rows  = nullptr;  // I32 [n_kv]  the cells attention reads, when gathering
    ggml_tensor * inp_kv_rows_swa = nullptr;  // I32 [n_kv_swa]  the same in the sliding-window pool
    ggml_tensor * inp_mask     = nullptr;  // F16 [n_kv, n_tokens]  0 or -inf
    ggml_tensor * inp_mask_swa = nullptr;  // F16 [n_kv_swa, n_tokens]  for sliding-window layers (nullptr if none)
    ggml_tensor * inp_out_ids  = nullptr;  // I32 [n_outputs]  (nullptr when every token is an output)
    ggml_tensor * inp_rows_get = nullptr;  // I32 [n_tokens]   each token's row of `hidden` (read)
    ggml_tensor * inp_rows_set = nullptr;  // I64 [n_tokens]   the same rows (written)
    ggml_tensor * inp_lora_ids = nullptr;  // I32 [1, n_tokens]  each token's adapter slot (0: none), when ub.lora
    ggml_tensor * inp_lora_ids_out = nullptr;  // I32 [1, n_outputs]  the same for the output tokens (n_outputs < n_tokens)
    ggml_tensor * inp_lora_scale = nullptr;      // F32 [1, n_tokens]  each token's adapter scale (0: none)
    ggml_tensor * inp_lora_scale_out = nullptr;  // F32 [1, n_outputs] the same for the output tokens

    // a graph input [ne0] (ne1 == 1) or [ne0, ne1], filled by the runner
    ggml_tensor * new_input(ggml_type type, int64_t ne0, int64_t ne1, const char * name);

    // w x for a weight matrix w [n_in, n_out] and x [n_in, n] (all tokens, or the output tokens
    // after select_outputs), plus each row's adapter term scale * B[slot] (A[slot] x) when w is adapted
    // -> [n_out, n]
    ggml_tensor * mm(ggml_tensor * w, ggml_tensor * x);
    // token embeddings scaled by hp.embd_scale: [n_embd, n_tokens]
    ggml_tensor * embed_tokens();
    // x * rsqrt(mean(x^2) + eps) * w, along dim 0
    ggml_tensor * rms_norm(ggml_tensor * x, ggml_tensor * w);
    // x: [head_dim, n_heads, n_tokens]; rotates with the layer's base (sliding-window layers differ)
    ggml_tensor * rope(ggml_tensor * x, uint32_t il);
    // projections: returns q [head_dim, n_head, n_tokens], k and v [head_dim, n_head_kv, n_tokens]
    void qkv(const LayerWeights & L, ggml_tensor * x, ggml_tensor ** q, ggml_tensor ** k, ggml_tensor ** v);
    // stores k, v in the cache, attends over cells [0, n_kv) (or the gathered rows) and applies the
    // output projection
    // q [head_dim, n_head, n_tokens], k/v [head_dim, n_head_kv, n_tokens] -> [n_embd, n_tokens]
    ggml_tensor * attention(uint32_t il, ggml_tensor * q, ggml_tensor * k, ggml_tensor * v, float kq_scale);
    // writes k [head_dim, n_head_kv, n_tokens] and v into layer il's cache at the tokens' cells
    void store_kv(uint32_t il, ggml_tensor * k, ggml_tensor * v);
    // down(act(gate(x)) * up(x)): [n_embd, n] -> [n_embd, n]
    ggml_tensor * ffn(const LayerWeights & L, ggml_tensor * x, FfnAct act);
    // keeps only the output tokens' rows (call at the last layer, before the per-token tail)
    ggml_tensor * select_outputs(ggml_tensor * x);
    // final norm, output head, optional soft-capping: [n_embd, n_outputs] -> [n_vocab, n_outputs]
    // (with the shortlist's rows instead: -> [n_short, n_outputs])
    ggml_tensor * lm_head(ggml_tensor * x, ggml_tensor * head_w);
    // K and V of layer il computed from hidden state x, stored in the tokens' cells without attending
    // (early exit: later tokens then attend to a skipped layer as if it had run). x: [n_embd, n_tokens]
    void fill_kv(uint32_t il, ggml_tensor * x);
};

// The pass `g.pass` describes, for any architecture: its input (token embeddings, or kept hidden
// states), its layers, kept hidden states, filled K/V and head. Returns the logits
// [n_vocab or n_short, n_outputs], or the last hidden state [n_embd, n_tokens] when the head is None.
ggml_tensor * build_pass(GraphBuilder & g);

}  // namespace appliance

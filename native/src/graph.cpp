#include "graph.h"

#include "arch/arch.h"
#include "kv_cache.h"
#include "lora_bank.h"
#include "model.h"

#include <algorithm>
#include <cmath>

namespace appliance {

GraphBuilder::GraphBuilder(ggml_context * ctx_, ggml_cgraph * gf_, const Model & m, const KvStorage & kv_,
                           const UBatchShape & ub_, const PassSpec & pass_, ggml_tensor * hidden_,
                           ggml_tensor * shortlist_, const LoraBank * lora_)
    : model(m),
      hp(m.hp),
      ctx(ctx_),
      gf(gf_),
      kv(kv_),
      ub(ub_),
      pass(pass_),
      l_end(std::min(pass_.l_end, m.hp.n_layer)),
      hidden(hidden_),
      shortlist(shortlist_),
      lora(lora_) {
    GGML_ASSERT(ub.n_tokens > 0 && ub.n_outputs > 0 && ub.n_outputs <= ub.n_tokens);
    GGML_ASSERT(ub.n_kv > 0 && (ub.gather || ub.n_kv <= kv.n_cells()));
    GGML_ASSERT(hp.has_swa() ? ub.n_kv_swa > 0 && (ub.gather_swa || ub.n_kv_swa <= kv.n_cells_swa())
                             : ub.n_kv_swa == 0 && !ub.gather_swa);
    GGML_ASSERT(pass.l_begin < l_end || (pass.l_begin == l_end && pass.l_begin > 0 && pass.head != Head::None));
    GGML_ASSERT(pass.is_full() || ub.n_outputs == ub.n_tokens);  // partial passes output every token
    GGML_ASSERT((pass.l_begin == 0 && !pass.keep_hidden) || (hidden && hidden->ne[0] == hp.n_embd));
    GGML_ASSERT(pass.head != Head::Shortlist || (shortlist && shortlist->ne[0] == hp.n_embd));
    GGML_ASSERT(!ub.lora || (lora != nullptr && !lora->empty()));

    const int64_t n = ub.n_tokens;
    inp_tokens      = new_input(GGML_TYPE_I32, n, 1, "inp_tokens");
    inp_pos         = new_input(GGML_TYPE_I32, n, 1, "inp_pos");
    inp_kv_idx      = new_input(GGML_TYPE_I64, n, 1, "inp_kv_idx");
    inp_mask        = new_input(GGML_TYPE_F16, ub.n_kv, n, "inp_mask");
    if (ub.gather) inp_kv_rows = new_input(GGML_TYPE_I32, ub.n_kv, 1, "inp_kv_rows");
    if (hp.has_swa()) {
        inp_kv_idx_swa = new_input(GGML_TYPE_I64, n, 1, "inp_kv_idx_swa");
        inp_mask_swa   = new_input(GGML_TYPE_F16, ub.n_kv_swa, n, "inp_mask_swa");
        if (ub.gather_swa) inp_kv_rows_swa = new_input(GGML_TYPE_I32, ub.n_kv_swa, 1, "inp_kv_rows_swa");
    }
    if (ub.n_outputs < ub.n_tokens) inp_out_ids = new_input(GGML_TYPE_I32, ub.n_outputs, 1, "inp_out_ids");
    if (pass.l_begin > 0) inp_rows_get = new_input(GGML_TYPE_I32, n, 1, "inp_rows_get");
    if (pass.keep_hidden) inp_rows_set = new_input(GGML_TYPE_I64, n, 1, "inp_rows_set");
    if (ub.lora) {
        inp_lora_ids   = new_input(GGML_TYPE_I32, 1, n, "inp_lora_ids");
        inp_lora_scale = new_input(GGML_TYPE_F32, 1, n, "inp_lora_scale");
        if (ub.n_outputs < ub.n_tokens) {
            inp_lora_ids_out   = new_input(GGML_TYPE_I32, 1, ub.n_outputs, "inp_lora_ids_out");
            inp_lora_scale_out = new_input(GGML_TYPE_F32, 1, ub.n_outputs, "inp_lora_scale_out");
        }
    }
}

ggml_tensor * GraphBuilder::mm(ggml_tensor * w, ggml_tensor * x) {
    ggml_tensor *             res = ggml_mul_mat(ctx, w, x);  // [n_out, n]
    const LoraBank::Stack *   st  = ub.lora ? lora->stack_for(w) : nullptr;
    if (st == nullptr) {
        return res;
    }
    const int64_t n     = x->ne[1];
    const bool    all   = n == ub.n_tokens;
    ggml_tensor * ids   = all ? inp_lora_ids : inp_lora_ids_out;      // [1, n]
    ggml_tensor * scale = all ? inp_lora_scale : inp_lora_scale_out;  // [1, n]
    GGML_ASSERT(ids != nullptr && ids->ne[1] == n && scale != nullptr && x->ne[0] == w->ne[0]);
    if (!ggml_is_contiguous(x)) x = ggml_cont(ctx, x);
    ggml_tensor * x3 = ggml_reshape_3d(ctx, x, x->ne[0], 1, n);  // [n_in, 1, n]
    ggml_tensor * t  = ggml_mul_mat_id(ctx, st->a, x3, ids);      // [rank, 1, n]
    ggml_tensor * d  = ggml_mul_mat_id(ctx, st->b, t, ids);       // [n_out, 1, n]
    d = ggml_mul(ctx, ggml_reshape_2d(ctx, d, d->ne[0], n), scale);  // [n_out, n], each row by its scale
    return ggml_add(ctx, res, d);                                   // [n_out, n]
}

ggml_tensor * GraphBuilder::new_input(ggml_type type, int64_t ne0, int64_t ne1, const char * name) {
    const int64_t ne[2] = {ne0, ne1};
    ggml_tensor * t     = ggml_new_tensor(ctx, type, ne1 == 1 ? 1 : 2, ne);
    ggml_set_name(t, name);
    ggml_set_input(t);
    return t;
}

ggml_tensor * GraphBuilder::embed_tokens() {
    ggml_tensor * x = ggml_get_rows(ctx, model.tok_embd, inp_tokens);  // [n_embd, n_tokens]
    if (hp.embd_scale != 1.0f) {
        x = ggml_scale(ctx, x, hp.embd_scale);
    }
    return x;
}

ggml_tensor * GraphBuilder::rms_norm(ggml_tensor * x, ggml_tensor * w) {
    x = ggml_rms_norm(ctx, x, hp.rms_eps);
    return ggml_mul(ctx, x, w);
}

ggml_tensor * GraphBuilder::rope(ggml_tensor * x, uint32_t il) {
    const bool  swa   = hp.is_swa(il);
    const float base  = swa ? hp.rope_freq_base_swa : hp.rope_freq_base;
    const float scale = swa ? hp.rope_freq_scale_swa : hp.rope_freq_scale;
    return ggml_rope_ext(ctx, x, inp_pos, model.rope_freqs, hp.n_rot, hp.rope_mode, hp.n_ctx_orig, base, scale,
                         /*ext_factor=*/0.0f, /*attn_factor=*/1.0f, /*beta_fast=*/32.0f, /*beta_slow=*/1.0f);
}

void GraphBuilder::qkv(const LayerWeights & L, ggml_tensor * x, ggml_tensor ** q, ggml_tensor ** k, ggml_tensor ** v) {
    const int64_t n = ub.n_tokens;
    ggml_tensor * Q = mm(L.wq, x);  // [n_embd_q, n]
    if (L.bq) Q = ggml_add(ctx, Q, L.bq);
    ggml_tensor * K = mm(L.wk, x);  // [n_embd_k_gqa, n]
    if (L.bk) K = ggml_add(ctx, K, L.bk);
    ggml_tensor * V = mm(L.wv, x);  // [n_embd_v_gqa, n]
    if (L.bv) V = ggml_add(ctx, V, L.bv);
    *q = ggml_reshape_3d(ctx, Q, hp.head_dim_k, hp.n_head, n);     // [head_dim, n_head, n]
    *k = ggml_reshape_3d(ctx, K, hp.head_dim_k, hp.n_head_kv, n);  // [head_dim, n_head_kv, n]
    *v = ggml_reshape_3d(ctx, V, hp.head_dim_v, hp.n_head_kv, n);  // [head_dim, n_head_kv, n]
}

void GraphBuilder::store_kv(uint32_t il, ggml_tensor * k, ggml_tensor * v) {
    const int64_t n = ub.n_tokens;
    GGML_ASSERT(k->nb[1] == ggml_row_size(k->type, hp.head_dim_k) && v->nb[1] == ggml_row_size(v->type, hp.head_dim_v));
    ggml_tensor * k_rows = ggml_view_2d(ctx, k, hp.n_embd_k_gqa(), n, k->nb[2], 0);  // [n_embd_k_gqa, n]
    ggml_tensor * v_rows = ggml_view_2d(ctx, v, hp.n_embd_v_gqa(), n, v->nb[2], 0);  // [n_embd_v_gqa, n]
    ggml_tensor * idx    = hp.is_swa(il) ? inp_kv_idx_swa : inp_kv_idx;             // [n]
    ggml_build_forward_expand(gf, ggml_set_rows(ctx, kv.k(il), k_rows, idx));
    ggml_build_forward_expand(gf, ggml_set_rows(ctx, kv.v(il), v_rows, idx));
}

void GraphBuilder::fill_kv(uint32_t il, ggml_tensor * x) {
    const LayerWeights & L = model.layers[il];
    const int64_t        n = ub.n_tokens;
    ggml_tensor *        h = rms_norm(x, L.attn_norm);  // [n_embd, n]
    ggml_tensor *        K = mm(L.wk, h);  // [n_embd_k_gqa, n]
    if (L.bk) K = ggml_add(ctx, K, L.bk);
    ggml_tensor * V = mm(L.wv, h);  // [n_embd_v_gqa, n]
    if (L.bv) V = ggml_add(ctx, V, L.bv);
    K = ggml_reshape_3d(ctx, K, hp.head_dim_k, hp.n_head_kv, n);  // [head_dim, n_head_kv, n]
    V = ggml_reshape_3d(ctx, V, hp.head_dim_v, hp.n_head_kv, n);  // [head_dim, n_head_kv, n]
    if (L.k_norm) K = rms_norm(K, L.k_norm);
    K = rope(K, il);
    store_kv(il, K, V);
}

ggml_tensor * GraphBuilder::attention(uint32_t il, ggml_tensor * q, ggml_tensor * k, ggml_tensor * v, float kq_scale) {
    const int64_t n       = ub.n_tokens;
    const bool    swa     = hp.is_swa(il);
    const int64_t n_kv    = swa ? ub.n_kv_swa : ub.n_kv;
    const int64_t d       = hp.head_dim_k;
    ggml_tensor * k_cache = kv.k(il);  // [n_embd_k_gqa, n_cells]
    ggml_tensor * v_cache = kv.v(il);  // [n_embd_v_gqa, n_cells]

    store_kv(il, k, v);  // expanded first so the reads below see this batch's K and V

    ggml_tensor * rows = swa ? inp_kv_rows_swa : inp_kv_rows;
    ggml_tensor * K;
    ggml_tensor * V;
    if (rows != nullptr) {
        // the cells this pass attends to, gathered: [n_embd_gqa, n_kv] F32 -> [head_dim, n_head_kv, n_kv]
        K = ggml_reshape_3d(ctx, ggml_get_rows(ctx, k_cache, rows), d, hp.n_head_kv, n_kv);
        V = ggml_reshape_3d(ctx, ggml_get_rows(ctx, v_cache, rows), hp.head_dim_v, hp.n_head_kv, n_kv);
    } else {
        // [head_dim, n_head_kv, n_kv] views of the cache's first n_kv cells
        K = ggml_view_3d(ctx, k_cache, d, hp.n_head_kv, n_kv, ggml_row_size(k_cache->type, d),
                         ggml_row_size(k_cache->type, hp.n_embd_k_gqa()), 0);
        V = ggml_view_3d(ctx, v_cache, hp.head_dim_v, hp.n_head_kv, n_kv, ggml_row_size(v_cache->type, hp.head_dim_v),
                         ggml_row_size(v_cache->type, hp.n_embd_v_gqa()), 0);
    }
    K = ggml_permute(ctx, K, 0, 2, 1, 3);  // [head_dim, n_kv, n_head_kv]
    V = ggml_permute(ctx, V, 0, 2, 1, 3);  // [head_dim, n_kv, n_head_kv]
    ggml_tensor * Q = ggml_permute(ctx, q, 0, 2, 1, 3);  // [head_dim, n, n_head]

    ggml_tensor * mask = swa ? inp_mask_swa : inp_mask;  // [n_kv, n]
    ggml_tensor * out  = ggml_flash_attn_ext(ctx, Q, K, V, mask, kq_scale, 0.0f, 0.0f);  // [head_dim, n_head, n]
    ggml_prec_set_acc(out, GGML_PREC_F32);
    out = ggml_reshape_2d(ctx, out, d * hp.n_head, n);  // [n_embd_q, n]
    return mm(model.layers[il].wo, out);  // [n_embd, n]
}

ggml_tensor * GraphBuilder::ffn(const LayerWeights & L, ggml_tensor * x, FfnAct act) {
    ggml_tensor * up   = mm(L.ffn_up, x);    // [n_ff, n]
    ggml_tensor * gate = mm(L.ffn_gate, x);  // [n_ff, n]
    ggml_tensor * h    = act == FfnAct::Silu ? ggml_swiglu_split(ctx, gate, up) : ggml_geglu_split(ctx, gate, up);
    return mm(L.ffn_down, h);  // [n_embd, n]
}

ggml_tensor * GraphBuilder::select_outputs(ggml_tensor * x) {
    return inp_out_ids ? ggml_get_rows(ctx, x, inp_out_ids) : x;
}

ggml_tensor * GraphBuilder::lm_head(ggml_tensor * x, ggml_tensor * head_w) {
    x = rms_norm(x, model.output_norm);
    // the shortlist's rows are not adapted: a draft's head; the full head (and verification) is
    ggml_tensor * logits = mm(head_w, x);  // [n_vocab or n_short, n_outputs]
    if (hp.final_logit_softcap > 0.0f) {
        logits = ggml_scale(ctx, logits, 1.0f / hp.final_logit_softcap);
        logits = ggml_tanh(ctx, logits);
        logits = ggml_scale(ctx, logits, hp.final_logit_softcap);
    }
    return logits;
}

ggml_tensor * build_pass(GraphBuilder & g) {
    const PassSpec & pass = g.pass;
    ggml_tensor *    x    = pass.l_begin == 0 ? g.embed_tokens()                              // [n_embd, n_tokens]
                                              : ggml_get_rows(g.ctx, g.hidden, g.inp_rows_get);  // [n_embd, n_tokens]
    for (uint32_t il = pass.l_begin; il < g.l_end; ++il) {
        x = g.model.spec->build_layer(g, il, x);
    }
    if (pass.keep_hidden) {
        ggml_build_forward_expand(g.gf, ggml_set_rows(g.ctx, g.hidden, x, g.inp_rows_set));
    }
    if (pass.fill_kv) {
        for (uint32_t il = g.l_end; il < g.hp.n_layer; ++il) {
            g.fill_kv(il, x);
        }
    }
    switch (pass.head) {
        case Head::Full:      return g.lm_head(x, g.model.output);  // [n_vocab, n_outputs]
        case Head::Shortlist: return g.lm_head(x, g.shortlist);     // [n_short, n_outputs]
        case Head::None:      break;
    }
    return x;
}

}  // namespace appliance

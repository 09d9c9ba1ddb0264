// Hyper-parameters of a decoder-only transformer, read from GGUF metadata.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace appliance {

class GgufFile;

struct HParams {
    std::string arch;          // general.architecture, e.g. "gemma3"

    uint32_t n_vocab     = 0;
    uint32_t n_ctx_train = 0;
    uint32_t n_embd      = 0;
    uint32_t n_layer     = 0;
    uint32_t n_head      = 0;
    uint32_t n_head_kv   = 0;
    uint32_t n_ff        = 0;
    uint32_t head_dim_k  = 0;  // n_embd_head_k
    uint32_t head_dim_v  = 0;  // n_embd_head_v
    uint32_t n_rot       = 0;

    float rms_eps = 1e-5f;

    // rotary embeddings (global layers; sliding-window layers have their own base/scale)
    int      rope_mode       = 0;  // GGML_ROPE_TYPE_NORM (0) or GGML_ROPE_TYPE_NEOX (2)
    float    rope_freq_base  = 10000.0f;
    float    rope_freq_scale = 1.0f;
    uint32_t n_ctx_orig      = 0;
    float    rope_freq_base_swa  = 10000.0f;
    float    rope_freq_scale_swa = 1.0f;

    // sliding-window attention: n_swa == 0 means none; swa_layers[il] marks windowed layers
    uint32_t          n_swa = 0;
    std::vector<bool> swa_layers;

    float attn_scale          = 0.0f;  // scale of q.k; set by each architecture
    float embd_scale          = 1.0f;  // input embeddings are multiplied by this (gemma: sqrt(n_embd))
    float final_logit_softcap = 0.0f;  // 0 = off

    uint32_t n_embd_k_gqa() const { return head_dim_k * n_head_kv; }
    uint32_t n_embd_v_gqa() const { return head_dim_v * n_head_kv; }
    uint32_t n_embd_q()     const { return head_dim_k * n_head; }
    bool     is_swa(uint32_t il) const { return n_swa > 0 && il < swa_layers.size() && swa_layers[il]; }
    bool     has_swa() const;
};

// Reads what every supported architecture shares ("{arch}.block_count", ...). Throws
// ModelFormatError naming the missing or invalid key.
HParams read_common_hparams(const GgufFile & f, const std::string & arch);

// Sets swa_layers from "{arch}.attention.sliding_window_pattern" (a per-layer array or a period),
// falling back to `default_period` (every period-th layer global, as Gemma 3 does).
void read_swa_pattern(HParams & hp, const GgufFile & f, uint32_t default_period);

}  // namespace appliance

#include "hparams.h"

#include "error.h"
#include "gguf_file.h"

#include <cmath>

namespace appliance {

bool HParams::has_swa() const {
    for (uint32_t il = 0; il < n_layer; ++il) {
        if (is_swa(il)) {
            return true;
        }
    }
    return false;
}

namespace {

uint32_t require_u32(const GgufFile & f, const std::string & key) {
    auto v = f.get_u32(key);
    if (!v) {
        throw ModelFormatError("model file '" + f.path() + "': missing metadata key '" + key + "'");
    }
    return *v;
}

// a per-layer value stored either as a scalar or as an array whose entries must all agree
uint32_t uniform_u32(const GgufFile & f, const std::string & key, uint32_t n_layer, std::optional<uint32_t> fallback) {
    std::vector<int64_t> arr = f.get_int_arr(key);
    if (!arr.empty()) {
        for (int64_t v : arr) {
            if (v != arr[0]) {
                throw ModelFormatError("model file '" + f.path() + "': per-layer values of '" + key +
                                       "' differ; models with layer-varying head counts are not supported");
            }
        }
        if (arr.size() != n_layer) {
            throw ModelFormatError("model file '" + f.path() + "': '" + key + "' has " + std::to_string(arr.size()) +
                                   " entries for " + std::to_string(n_layer) + " layers");
        }
        return static_cast<uint32_t>(arr[0]);
    }
    if (auto v = f.get_u32(key)) {
        return *v;
    }
    if (fallback) {
        return *fallback;
    }
    throw ModelFormatError("model file '" + f.path() + "': missing metadata key '" + key + "'");
}

}  // namespace

HParams read_common_hparams(const GgufFile & f, const std::string & arch) {
    HParams hp;
    hp.arch = arch;
    const std::string p = arch + ".";

    hp.n_ctx_train = require_u32(f, p + "context_length");
    hp.n_embd      = require_u32(f, p + "embedding_length");
    hp.n_layer     = require_u32(f, p + "block_count");
    hp.n_ff        = uniform_u32(f, p + "feed_forward_length", hp.n_layer, std::nullopt);
    hp.n_head      = uniform_u32(f, p + "attention.head_count", hp.n_layer, std::nullopt);
    hp.n_head_kv   = uniform_u32(f, p + "attention.head_count_kv", hp.n_layer, hp.n_head);

    const std::string where = "model file '" + f.path() + "': ";
    APPL_REQUIRE(hp.n_layer > 0 && hp.n_layer <= 512, ModelFormatError, where + "block_count out of range");
    APPL_REQUIRE(hp.n_embd > 0 && hp.n_embd <= (1u << 16), ModelFormatError, where + "embedding_length out of range");
    APPL_REQUIRE(hp.n_head > 0 && hp.n_head_kv > 0 && hp.n_head % hp.n_head_kv == 0, ModelFormatError,
                 where + "head_count must be a positive multiple of head_count_kv");
    APPL_REQUIRE(hp.n_ff > 0, ModelFormatError, where + "feed_forward_length must be positive");
    APPL_REQUIRE(hp.n_ctx_train > 0, ModelFormatError, where + "context_length must be positive");

    hp.head_dim_k = f.get_u32(p + "attention.key_length").value_or(hp.n_embd / hp.n_head);
    hp.head_dim_v = f.get_u32(p + "attention.value_length").value_or(hp.n_embd / hp.n_head);
    hp.n_rot      = f.get_u32(p + "rope.dimension_count").value_or(hp.head_dim_k);
    APPL_REQUIRE(hp.head_dim_k > 0 && hp.head_dim_v > 0 && hp.head_dim_k == hp.head_dim_v, ModelFormatError,
                 where + "key_length and value_length must be equal and positive");
    APPL_REQUIRE(hp.n_rot > 0 && hp.n_rot <= hp.head_dim_k && hp.n_rot % 2 == 0, ModelFormatError,
                 where + "rope.dimension_count must be even and at most the head size");

    hp.rms_eps = f.get_f32(p + "attention.layer_norm_rms_epsilon").value_or(1e-5f);
    APPL_REQUIRE(hp.rms_eps > 0.0f && hp.rms_eps < 1.0f, ModelFormatError, where + "layer_norm_rms_epsilon out of range");

    hp.rope_freq_base = f.get_f32(p + "rope.freq_base").value_or(10000.0f);
    const std::string scaling = f.get_str(p + "rope.scaling.type").value_or("linear");
    if (scaling != "linear" && scaling != "none") {
        throw ModelFormatError(where + "rope scaling type '" + scaling + "' is not supported (only none and linear)");
    }
    float factor = f.get_f32(p + "rope.scaling.factor").value_or(0.0f);
    if (factor == 0.0f) {
        factor = f.get_f32(p + "rope.scale_linear").value_or(0.0f);
    }
    APPL_REQUIRE(factor >= 0.0f && std::isfinite(factor), ModelFormatError, where + "rope.scaling.factor out of range");
    hp.rope_freq_scale = factor == 0.0f ? 1.0f : 1.0f / factor;
    hp.n_ctx_orig      = f.get_u32(p + "rope.scaling.original_context_length").value_or(hp.n_ctx_train);
    hp.rope_freq_base_swa  = hp.rope_freq_base;
    hp.rope_freq_scale_swa = hp.rope_freq_scale;

    hp.attn_scale = 1.0f / std::sqrt(static_cast<float>(hp.head_dim_k));
    hp.swa_layers.assign(hp.n_layer, false);
    return hp;
}

void read_swa_pattern(HParams & hp, const GgufFile & f, uint32_t default_period) {
    const std::string key = hp.arch + ".attention.sliding_window_pattern";
    std::vector<int64_t> arr = f.get_int_arr(key);
    if (!arr.empty()) {
        APPL_REQUIRE(arr.size() == hp.n_layer, ModelFormatError,
                     "model file '" + f.path() + "': '" + key + "' must have one entry per layer");
        for (uint32_t il = 0; il < hp.n_layer; ++il) {
            hp.swa_layers[il] = arr[il] != 0;
        }
        return;
    }
    const uint32_t period = f.get_u32(key).value_or(default_period);
    for (uint32_t il = 0; il < hp.n_layer; ++il) {
        hp.swa_layers[il] = period == 0 || (il % period < period - 1);
    }
}

}  // namespace appliance

// A LoRA adapter in llama.cpp's GGUF format, read and checked against a loaded base model.
//
// The file: general.type = "adapter", adapter.type = "lora", general.architecture = the base's,
// adapter.lora.alpha (absent or 0: no alpha scaling), and per adapted weight W (ggml shape
// [n_in, n_out]) a pair of tensors named as llama.cpp names them:
//     <W's name>.lora_a   [n_in, rank]   (e.g. blk.3.attn_q.weight.lora_a)
//     <W's name>.lora_b   [rank, n_out]
// The adapted projection is W x + scale * B (A x), scale = user_scale * alpha / rank (user_scale
// when alpha is 0), exactly llama.cpp's llama_adapter_lora_weight::get_scale. Tensors ending in
// "_norm.weight" are skipped, as llama.cpp skips them; any other tensor is refused.
//
// Adapted weights are the base's mat-mul weights: attention q/k/v/output, FFN gate/up/down and an
// untied output head. The token embedding (and a head tied to it) is not adaptable here.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

struct ggml_tensor;

namespace appliance {

struct Model;

// One adapted weight: the base tensor and the adapter's factors, as F32 on the host.
struct LoraWeight {
    const ggml_tensor * target = nullptr;  // the base weight W, [n_in, n_out]
    uint32_t            rank   = 0;
    float               scale  = 1.0f;  // user_scale * alpha / rank (or user_scale when alpha is 0)
    bool                f16    = false; // both factors are F16 in the file (an F16 stack holds them exactly)
    std::vector<float>  a;              // [n_in, rank]  row-major as ggml: a[r * n_in + i]
    std::vector<float>  b;              // [rank, n_out] row-major as ggml: b[o * rank + r]
};

class LoraAdapter {
public:
    // Reads `path` and checks it against `base`. Throws ModelFormatError naming the file and the
    // offending key or tensor (wrong general.type or adapter.type, another architecture, a tensor
    // the base does not have or of the wrong shape, an unpaired or unexpected tensor).
    // Precondition: user_scale is finite.
    static std::unique_ptr<LoraAdapter> load(const Model & base, const std::string & path, float user_scale);

    const std::string &             path() const { return path_; }
    float                           user_scale() const { return user_scale_; }
    float                           alpha() const { return alpha_; }
    uint32_t                        max_rank() const;
    const std::vector<LoraWeight> & weights() const { return weights_; }
    // identity of what this adapter computes: a hash of the file's bytes and the user scale
    // (never 0, so it can salt the prefix cache next to "no adapter")
    uint64_t                        identity() const { return identity_; }
    uint64_t                        content_hash() const { return content_hash_; }
    size_t                          file_bytes() const { return file_bytes_; }

    // frees the host copies of the factors (after they were uploaded)
    void release_host_data();

private:
    std::string             path_;
    float                   user_scale_   = 1.0f;
    float                   alpha_        = 0.0f;
    uint64_t                content_hash_ = 0;
    uint64_t                identity_     = 0;
    size_t                  file_bytes_   = 0;
    std::vector<LoraWeight> weights_;
};

// The weights of `m` an adapter may target (its mat-mul weights, the tied head excluded).
std::vector<const ggml_tensor *> lora_targets(const Model & m);

}  // namespace appliance

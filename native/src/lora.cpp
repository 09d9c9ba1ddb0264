#include "lora.h"

#include "error.h"
#include "gguf_file.h"
#include "hash.h"
#include "model.h"

#include "ggml.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <map>

namespace appliance {

namespace {

bool ends_with(const std::string & s, const std::string & suffix) {
    return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

std::string shape_str(const ggml_tensor * t) {
    std::string s = "[";
    for (int i = 0; i < ggml_n_dims(t); ++i) {
        s += (i ? ", " : "") + std::to_string(t->ne[i]);
    }
    return s + "]";
}

// a 64-bit hash of a byte range (8 bytes at a time, the tail and the length folded in)
uint64_t hash_bytes(const uint8_t * p, size_t n) {
    uint64_t h = 0x6c6f7261ull;  // "lora"
    size_t   i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t w;
        std::memcpy(&w, p + i, 8);
        h = mix64(h, w);
    }
    uint64_t tail = 0;
    std::memcpy(&tail, p + i, n - i);
    return mix64(mix64(h, tail), n);
}

// the tensor's elements as F32 (any type ggml can convert to float)
std::vector<float> to_f32(const GgufFile & f, const ggml_tensor * t) {
    const int64_t      n = ggml_nelements(t);
    std::vector<float> out(static_cast<size_t>(n));
    const uint8_t *    src = f.tensor_data(t);
    if (t->type == GGML_TYPE_F32) {
        std::memcpy(out.data(), src, n * sizeof(float));
    } else {
        ggml_get_type_traits(t->type)->to_float(src, out.data(), n);
    }
    return out;
}

}  // namespace

std::vector<const ggml_tensor *> lora_targets(const Model & m) {
    std::vector<const ggml_tensor *> out;
    for (const LayerWeights & L : m.layers) {
        for (const ggml_tensor * t : {L.wq, L.wk, L.wv, L.wo, L.ffn_gate, L.ffn_up, L.ffn_down}) {
            if (t != nullptr) out.push_back(t);
        }
    }
    if (m.output != nullptr && m.output != m.tok_embd) out.push_back(m.output);
    return out;
}

uint32_t LoraAdapter::max_rank() const {
    uint32_t r = 0;
    for (const LoraWeight & w : weights_) r = std::max(r, w.rank);
    return r;
}

void LoraAdapter::release_host_data() {
    for (LoraWeight & w : weights_) {
        w.a = {};
        w.b = {};
    }
}

std::unique_ptr<LoraAdapter> LoraAdapter::load(const Model & base, const std::string & path, float user_scale) {
    GGML_ASSERT(std::isfinite(user_scale));
    auto             ad = std::make_unique<LoraAdapter>();
    const GgufFile   f(path);  // ModelFormatError for anything that is not a sound GGUF file
    const std::string where = "adapter file '" + path + "'";
    ad->path_       = path;
    ad->user_scale_ = user_scale;
    ad->file_bytes_ = f.file_size();

    const auto type = f.get_str("general.type");
    if (type.value_or("") != "adapter") {
        throw ModelFormatError(where + ": general.type is '" + type.value_or("") + "', expected 'adapter' (a LoRA GGUF)");
    }
    const auto adapter_type = f.get_str("adapter.type");
    if (adapter_type.value_or("") != "lora") {
        throw ModelFormatError(where + ": adapter.type is '" + adapter_type.value_or("") + "', expected 'lora'");
    }
    const auto arch = f.get_str("general.architecture");
    if (arch.value_or("") != base.hp.arch) {
        throw ModelFormatError(where + ": architecture '" + arch.value_or("") + "' does not match the model's '" +
                               base.hp.arch + "'");
    }
    ad->alpha_ = f.get_f32("adapter.lora.alpha").value_or(0.0f);
    if (!std::isfinite(ad->alpha_)) {
        throw ModelFormatError(where + ": adapter.lora.alpha is not finite");
    }

    // pair .lora_a with .lora_b by the name of the weight they adapt
    struct Pair {
        const ggml_tensor * a = nullptr;
        const ggml_tensor * b = nullptr;
    };
    std::map<std::string, Pair> pairs;
    for (int64_t i = 0; i < f.n_tensors(); ++i) {
        const ggml_tensor * t = f.tensor_at(i);
        std::string         name(ggml_get_name(t));
        if (ends_with(name, ".lora_a")) {
            pairs[name.substr(0, name.size() - 7)].a = t;
        } else if (ends_with(name, ".lora_b")) {
            pairs[name.substr(0, name.size() - 7)].b = t;
        } else if (ends_with(name, "_norm.weight")) {
            continue;  // llama.cpp ignores norm vectors in adapters; so do we, to compute what it does
        } else {
            throw ModelFormatError(where + ": unexpected tensor '" + name +
                                   "' (LoRA tensors are named <weight>.lora_a and <weight>.lora_b)");
        }
    }
    if (pairs.empty()) {
        throw ModelFormatError(where + ": no LoRA tensors (<weight>.lora_a / .lora_b)");
    }

    std::map<std::string, const ggml_tensor *> targets;
    for (const ggml_tensor * t : lora_targets(base)) targets[ggml_get_name(t)] = t;

    for (const auto & [name, p] : pairs) {
        if (p.a == nullptr || p.b == nullptr) {
            throw ModelFormatError(where + ": tensor '" + name + (p.a ? ".lora_a" : ".lora_b") + "' has no matching '" +
                                   name + (p.a ? ".lora_b" : ".lora_a") + "'");
        }
        auto it = targets.find(name);
        if (it == targets.end()) {
            const bool embd = name == "token_embd.weight";
            throw ModelFormatError(where + ": tensor '" + name + ".lora_a' adapts '" + name + "', " +
                                   (embd ? "the token embedding, which adapters here cannot change"
                                         : "which is not a weight matrix of this model"));
        }
        const ggml_tensor * w    = it->second;  // [n_in, n_out]
        const int64_t       rank = p.a->ne[1];
        // A: [n_in, rank], B: [rank, n_out]
        if (ggml_n_dims(p.a) > 2 || p.a->ne[0] != w->ne[0] || rank < 1) {
            throw ModelFormatError(where + ": tensor '" + name + ".lora_a' has shape " + shape_str(p.a) +
                                   ", expected [" + std::to_string(w->ne[0]) + ", rank] for '" + name + "' " +
                                   shape_str(w));
        }
        if (ggml_n_dims(p.b) > 2 || p.b->ne[0] != rank || p.b->ne[1] != w->ne[1]) {
            throw ModelFormatError(where + ": tensor '" + name + ".lora_b' has shape " + shape_str(p.b) +
                                   ", expected [" + std::to_string(rank) + ", " + std::to_string(w->ne[1]) + "] for '" +
                                   name + "' " + shape_str(w) + " and rank " + std::to_string(rank));
        }
        for (const ggml_tensor * t : {p.a, p.b}) {
            if (t->type != GGML_TYPE_F32 && ggml_get_type_traits(t->type)->to_float == nullptr) {
                throw ModelFormatError(where + ": tensor '" + ggml_get_name(t) + "' has type " +
                                       ggml_type_name(t->type) + ", which cannot be read");
            }
        }
        LoraWeight lw;
        lw.target = w;
        lw.rank   = static_cast<uint32_t>(rank);
        lw.scale  = ad->alpha_ != 0.0f ? user_scale * ad->alpha_ / static_cast<float>(rank) : user_scale;
        lw.f16    = p.a->type == GGML_TYPE_F16 && p.b->type == GGML_TYPE_F16;
        lw.a      = to_f32(f, p.a);
        lw.b      = to_f32(f, p.b);
        // a NaN or inf would poison every token generated under the adapter: refuse it here, by name
        for (const auto & [values, t] : {std::pair{&lw.a, p.a}, std::pair{&lw.b, p.b}}) {
            if (!std::all_of(values->begin(), values->end(), [](float v) { return std::isfinite(v); })) {
                throw ModelFormatError(where + ": tensor '" + ggml_get_name(t) + "' holds a NaN or infinite value");
            }
        }
        ad->weights_.push_back(std::move(lw));
    }

    ad->content_hash_ = hash_bytes(f.map_base(), f.map_size());
    uint32_t scale_bits;
    std::memcpy(&scale_bits, &user_scale, sizeof(scale_bits));
    ad->identity_ = mix64(ad->content_hash_, scale_bits);
    if (ad->identity_ == 0) ad->identity_ = 1;
    return ad;
}

}  // namespace appliance

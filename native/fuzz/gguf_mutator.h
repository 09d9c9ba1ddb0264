// Structure-aware mutations of a GGUF file's metadata: the header counts, the key/value section and
// the tensor-info section (names, dimension counts, shapes, types, offsets), plus whole records
// duplicated, dropped or added (a repeated key, a general.alignment). The tensor data is left alone:
// byte-level mutators spend almost all their time there, and the loaders only bound-check it.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

extern "C" size_t LLVMFuzzerMutate(uint8_t * data, size_t size, size_t max_size);

namespace fuzz {

struct GgufField {
    enum Kind { Count, StrLen, StrBytes, KvType, ArrType, ArrLen, Scalar, NDims, Ne, TensorType, Offset } kind;
    size_t off;   // byte offset in the file
    size_t size;  // bytes
};

struct GgufLayout {
    std::vector<GgufField>                 fields;
    std::vector<std::pair<size_t, size_t>> kvs;      // [begin, end) of each key/value record
    std::vector<std::pair<size_t, size_t>> tensors;  // [begin, end) of each tensor-info record
    size_t                                 n_kv_off = 16, n_tensors_off = 8, header_end = 0;
};

namespace detail {

inline bool rd(const uint8_t * d, size_t n, size_t off, size_t bytes, uint64_t & v) {
    if (off > n || bytes > n - off) return false;
    v = 0;
    std::memcpy(&v, d + off, bytes);
    return true;
}

inline size_t scalar_size(uint32_t type) {
    static const size_t sizes[] = {1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8};
    return type < 13 ? sizes[type] : 0;
}

}  // namespace detail

// Parses what it can of a GGUF v2/v3 file's header; false when even the record boundaries are gone.
inline bool parse_gguf(const uint8_t * d, size_t n, GgufLayout & L) {
    using detail::rd;
    uint64_t v = 0, n_tensors = 0, n_kv = 0;
    if (n < 24 || std::memcmp(d, "GGUF", 4) != 0) return false;
    rd(d, n, 8, 8, n_tensors);
    rd(d, n, 16, 8, n_kv);
    L.fields.push_back({GgufField::Count, 8, 8});
    L.fields.push_back({GgufField::Count, 16, 8});
    size_t p = 24;
    auto str = [&](bool) -> bool {
        if (!rd(d, n, p, 8, v) || v > n - p - 8) return false;
        L.fields.push_back({GgufField::StrLen, p, 8});
        L.fields.push_back({GgufField::StrBytes, p + 8, static_cast<size_t>(v)});
        p += 8 + v;
        return true;
    };
    for (uint64_t i = 0; i < n_kv && i < 4096; ++i) {
        const size_t begin = p;
        if (!str(true)) return false;
        uint64_t type = 0;
        if (!rd(d, n, p, 4, type)) return false;
        L.fields.push_back({GgufField::KvType, p, 4});
        p += 4;
        if (type == 8) {
            if (!str(false)) return false;
        } else if (type == 9) {
            uint64_t at = 0, an = 0;
            if (!rd(d, n, p, 4, at) || !rd(d, n, p + 4, 8, an)) return false;
            L.fields.push_back({GgufField::ArrType, p, 4});
            L.fields.push_back({GgufField::ArrLen, p + 4, 8});
            p += 12;
            if (at == 8) {
                for (uint64_t k = 0; k < an; ++k) {
                    if (!rd(d, n, p, 8, v) || v > n - p - 8) return false;
                    if (k < 8) {  // a few element strings are enough to mutate
                        L.fields.push_back({GgufField::StrLen, p, 8});
                    }
                    p += 8 + v;
                }
            } else {
                const size_t es = detail::scalar_size(static_cast<uint32_t>(at));
                if (es == 0 || an > (n - p) / es) return false;
                for (uint64_t k = 0; k < an && k < 8; ++k) L.fields.push_back({GgufField::Scalar, p + k * es, es});
                p += an * es;
            }
        } else {
            const size_t es = detail::scalar_size(static_cast<uint32_t>(type));
            if (es == 0 || es > n - p) return false;
            L.fields.push_back({GgufField::Scalar, p, es});
            p += es;
        }
        L.kvs.push_back({begin, p});
    }
    for (uint64_t i = 0; i < n_tensors && i < 4096; ++i) {
        const size_t begin = p;
        if (!str(false)) return false;
        uint64_t nd = 0;
        if (!rd(d, n, p, 4, nd) || nd > 4) return false;
        L.fields.push_back({GgufField::NDims, p, 4});
        p += 4;
        for (uint64_t k = 0; k < nd; ++k) {
            if (!rd(d, n, p, 8, v)) return false;
            L.fields.push_back({GgufField::Ne, p, 8});
            p += 8;
        }
        if (!rd(d, n, p, 4, v) || !rd(d, n, p + 4, 8, v)) return false;
        L.fields.push_back({GgufField::TensorType, p, 4});
        L.fields.push_back({GgufField::Offset, p + 4, 8});
        p += 12;
        L.tensors.push_back({begin, p});
    }
    L.header_end = p;
    return true;
}

class GgufMutator {
public:
    explicit GgufMutator(uint32_t seed) : rng_(seed) {}

    // Mutates data[0, size) in place (at most max_size bytes); returns the new size, 0 when the input
    // is not parseable GGUF (the caller then mutates bytes instead).
    size_t mutate(uint8_t * data, size_t size, size_t max_size) {
        GgufLayout L;
        if (!parse_gguf(data, size, L) || L.fields.empty()) return 0;
        std::vector<uint8_t> buf(data, data + size);
        const int op = pick(10);
        if (op < 6) {
            mutate_field(buf, L.fields[pick(L.fields.size())]);
        } else if (op == 6 && !L.kvs.empty()) {
            dup_or_drop(buf, L.kvs, L.n_kv_off);
        } else if (op == 7 && !L.tensors.empty()) {
            dup_or_drop(buf, L.tensors, L.n_tensors_off);
        } else if (op == 8) {
            add_alignment(buf, L);
        } else {
            buf.resize(pick(buf.size() + 1));  // truncation
        }
        if (buf.size() > max_size || buf.empty()) return 0;
        std::memcpy(data, buf.data(), buf.size());
        return buf.size();
    }

private:
    size_t pick(size_t n) { return n == 0 ? 0 : std::uniform_int_distribution<size_t>(0, n - 1)(rng_); }

    uint64_t interesting(uint64_t old, size_t bytes) {
        static const uint64_t vals[] = {0, 1, 2, 3, 4, 7, 8, 16, 31, 32, 33, 64, 255, 256, 4095, 4096, 65535, 65536,
                                        0x7fffffffull, 0x80000000ull, 0xffffffffull, 0x100000000ull,
                                        0x7fffffffffffffffull, 0x8000000000000000ull, ~0ull, 1ull << 40, 1ull << 62};
        switch (pick(5)) {
            case 0: return old + 1;
            case 1: return old - 1;
            case 2: return old * 2 + pick(3);
            case 3: return old ^ (1ull << pick(bytes * 8));
            default: return vals[pick(sizeof(vals) / sizeof(vals[0]))];
        }
    }

    void put(std::vector<uint8_t> & b, size_t off, size_t bytes, uint64_t v) { std::memcpy(b.data() + off, &v, bytes); }

    void mutate_field(std::vector<uint8_t> & b, const GgufField & f) {
        uint64_t old = 0;
        std::memcpy(&old, b.data() + f.off, std::min<size_t>(f.size, 8));
        switch (f.kind) {
            case GgufField::KvType:
            case GgufField::ArrType:
                put(b, f.off, 4, pick(3) == 0 ? interesting(old, 4) : pick(14));
                break;
            case GgufField::TensorType:
                put(b, f.off, 4, pick(3) == 0 ? interesting(old, 4) : pick(42));
                break;
            case GgufField::NDims:
                put(b, f.off, 4, pick(3) == 0 ? interesting(old, 4) : pick(6));
                break;
            case GgufField::StrBytes:
                replace_string(b, f);
                break;
            case GgufField::Scalar:
                if (f.size == 4 && pick(2) == 0) {  // floats: NaN, inf, negative, zero, tiny
                    static const float fv[] = {0.0f, -0.0f, -1.0f, 1e-30f, 1e30f, __builtin_nanf(""), __builtin_inff(),
                                               -__builtin_inff()};
                    std::memcpy(b.data() + f.off, &fv[pick(8)], 4);
                    break;
                }
                [[fallthrough]];
            default:
                put(b, f.off, std::min<size_t>(f.size, 8), interesting(old, std::min<size_t>(f.size, 8)));
        }
    }

    // a string's bytes replaced by a known key or tensor name (or a near miss), its length updated
    void replace_string(std::vector<uint8_t> & b, const GgufField & f) {
        static const char * names[] = {
            "general.architecture", "general.alignment", "general.type", "adapter.type", "adapter.lora.alpha",
            "llama.block_count", "llama.embedding_length", "llama.context_length", "llama.feed_forward_length",
            "llama.attention.head_count", "llama.attention.head_count_kv", "llama.rope.dimension_count",
            "llama.attention.key_length", "llama.attention.value_length", "llama.rope.scaling.factor",
            "llama.rope.scaling.type", "llama.attention.layer_norm_rms_epsilon", "gemma3.attention.sliding_window",
            "gemma3.attention.sliding_window_pattern", "tokenizer.ggml.tokens", "tokenizer.ggml.model",
            "token_embd.weight", "output.weight", "output_norm.weight", "blk.0.attn_q.weight", "blk.0.attn_k.weight",
            "blk.0.ffn_up.weight", "blk.1.attn_q.weight", "blk.999.attn_q.weight", "blk.0.attn_q.weight.lora_a",
            "blk.0.attn_q.weight.lora_b", "output.weight.lora_a", "token_embd.weight.lora_a", "blk.0.attn_norm.weight",
            "llama", "qwen2", "qwen3", "gemma3", "bert", "lora", "adapter", "", "\xff\xfe",
        };
        std::string s = names[pick(sizeof(names) / sizeof(names[0]))];
        if (pick(4) == 0) s += std::string(pick(80), 'x');
        const size_t len_off = f.off - 8;
        std::vector<uint8_t> out(b.begin(), b.begin() + static_cast<std::ptrdiff_t>(f.off));
        out.insert(out.end(), s.begin(), s.end());
        out.insert(out.end(), b.begin() + static_cast<std::ptrdiff_t>(f.off + f.size), b.end());
        put(out, len_off, 8, s.size());
        b.swap(out);
    }

    void dup_or_drop(std::vector<uint8_t> & b, const std::vector<std::pair<size_t, size_t>> & recs, size_t count_off) {
        const auto [begin, end] = recs[pick(recs.size())];
        uint64_t count = 0;
        std::memcpy(&count, b.data() + count_off, 8);
        std::vector<uint8_t> rec(b.begin() + static_cast<std::ptrdiff_t>(begin), b.begin() + static_cast<std::ptrdiff_t>(end));
        if (pick(2) == 0) {
            b.erase(b.begin() + static_cast<std::ptrdiff_t>(begin), b.begin() + static_cast<std::ptrdiff_t>(end));
            count -= 1;
        } else {
            const auto at = recs[pick(recs.size())].second;
            b.insert(b.begin() + static_cast<std::ptrdiff_t>(at), rec.begin(), rec.end());
            count += 1;
        }
        put(b, count_off, 8, count);
    }

    void add_alignment(std::vector<uint8_t> & b, const GgufLayout & L) {
        static const uint32_t aligns[] = {0, 1, 3, 8, 16, 32, 64, 0x80000000u, 0xffffffffu};
        const std::string key = "general.alignment";
        std::vector<uint8_t> rec(8 + key.size() + 4 + 4);
        uint64_t kl = key.size();
        std::memcpy(rec.data(), &kl, 8);
        std::memcpy(rec.data() + 8, key.data(), key.size());
        uint32_t type = 4, a = aligns[pick(sizeof(aligns) / sizeof(aligns[0]))];
        std::memcpy(rec.data() + 8 + key.size(), &type, 4);
        std::memcpy(rec.data() + 12 + key.size(), &a, 4);
        b.insert(b.begin() + 24, rec.begin(), rec.end());
        uint64_t count = 0;
        std::memcpy(&count, b.data() + L.n_kv_off, 8);
        put(b, L.n_kv_off, 8, count + 1);
    }

    std::mt19937 rng_;
};

// A harness's LLVMFuzzerCustomMutator for GGUF input: mostly structure-aware, one in eight (and
// whenever the input no longer parses) libFuzzer's byte mutations.
inline size_t mutate_gguf_input(uint8_t * data, size_t size, size_t max_size, unsigned int seed) {
    GgufMutator mut(seed);
    if (seed % 8 != 0) {
        if (size_t n = mut.mutate(data, size, max_size)) return n;
    }
    return LLVMFuzzerMutate(data, size, max_size);
}

}  // namespace fuzz

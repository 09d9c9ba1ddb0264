#include "lora_bank.h"

#include "error.h"
#include "lora.h"
#include "model.h"

#include <algorithm>
#include <cstring>

namespace appliance {

LoraBank::LoraBank(const Model & m) : model_(m) {}

LoraBank::~LoraBank() { free_all(); }

namespace {

// a whole stack as F32 on the host, and back
std::vector<float> get_f32(const ggml_tensor * t) {
    std::vector<float> out(ggml_nelements(t));
    if (t->type == GGML_TYPE_F32) {
        ggml_backend_tensor_get(t, out.data(), 0, ggml_nbytes(t));
    } else {
        std::vector<ggml_fp16_t> h(out.size());
        ggml_backend_tensor_get(t, h.data(), 0, ggml_nbytes(t));
        ggml_fp16_to_fp32_row(h.data(), out.data(), static_cast<int64_t>(h.size()));
    }
    return out;
}

// writes n floats at element offset `first` of t, converted to t's type
void set_f32(ggml_tensor * t, const float * data, size_t first, size_t n) {
    if (t->type == GGML_TYPE_F32) {
        ggml_backend_tensor_set(t, data, first * sizeof(float), n * sizeof(float));
    } else {
        std::vector<ggml_fp16_t> h(n);
        ggml_fp32_to_fp16_row(data, h.data(), static_cast<int64_t>(n));
        ggml_backend_tensor_set(t, h.data(), first * sizeof(ggml_fp16_t), n * sizeof(ggml_fp16_t));
    }
}

}  // namespace

void LoraBank::free_all() {
    if (buf_) ggml_backend_buffer_free(buf_);
    if (ctx_) ggml_free(ctx_);
    buf_ = nullptr;
    ctx_ = nullptr;
    targets_.clear();
    stacks_.clear();
    used_.clear();
    slot_scale_.clear();
    n_slots_ = 0;
    rank_    = 0;
    n_used_  = 0;
    type_    = GGML_TYPE_F16;
    ++generation_;
}

const LoraBank::Stack * LoraBank::stack_for(const ggml_tensor * w) const {
    auto it = stacks_.find(w);
    return it == stacks_.end() ? nullptr : &it->second;
}

size_t LoraBank::bytes() const { return buf_ ? ggml_backend_buffer_get_size(buf_) : 0; }

size_t LoraBank::slot_bytes() const {
    size_t n = 0;
    for (const ggml_tensor * t : targets_) n += static_cast<size_t>(t->ne[0] + t->ne[1]) * rank_ * ggml_type_size(type_);
    return n;
}

void LoraBank::reserve(uint32_t n_slots, uint32_t rank, const std::vector<const ggml_tensor *> & targets, ggml_type type) {
    GGML_ASSERT(n_slots >= n_slots_ && rank >= rank_ && targets.size() >= targets_.size() && n_slots >= 2 && rank >= 1);
    GGML_ASSERT(type == GGML_TYPE_F32 || (type == GGML_TYPE_F16 && (n_slots_ == 0 || type_ == GGML_TYPE_F16)));
    ggml_init_params p   = {ggml_tensor_overhead() * (2 * targets.size() + 1), nullptr, /*no_alloc=*/true};
    ggml_context *   ctx = ggml_init(p);
    std::unordered_map<const ggml_tensor *, Stack> stacks;
    for (const ggml_tensor * t : targets) {
        Stack s;
        s.a = ggml_new_tensor_3d(ctx, type, t->ne[0], rank, n_slots);  // [n_in, rank, n_slots]
        s.b = ggml_new_tensor_3d(ctx, type, rank, t->ne[1], n_slots);  // [rank, n_out, n_slots]
        ggml_format_name(s.a, "lora_a:%s", ggml_get_name(t));
        ggml_format_name(s.b, "lora_b:%s", ggml_get_name(t));
        stacks[t] = s;
    }
    ggml_backend_buffer_t buf = ggml_backend_alloc_ctx_tensors_from_buft(ctx, ggml_backend_dev_buffer_type(model_.device));
    if (buf == nullptr) {
        ggml_free(ctx);
        throw RuntimeFailure("cannot allocate memory for LoRA adapters");
    }
    ggml_backend_buffer_set_usage(buf, GGML_BACKEND_BUFFER_USAGE_WEIGHTS);
    ggml_backend_buffer_clear(buf, 0);

    // keep what the old stacks hold: slot s, rank row r of A and entry r of B's row o
    std::vector<float> new_h;
    for (const ggml_tensor * t : targets_) {
        const Stack &      o     = stacks_.at(t);
        const Stack &      n     = stacks.at(t);
        const size_t       n_in  = t->ne[0], n_out = t->ne[1];
        std::vector<float> old_h = get_f32(o.a);
        new_h.assign(ggml_nelements(n.a), 0.0f);
        for (size_t s = 0; s < n_slots_; ++s) {
            std::memcpy(&new_h[s * n_in * rank], &old_h[s * n_in * rank_], n_in * rank_ * sizeof(float));
        }
        set_f32(n.a, new_h.data(), 0, new_h.size());
        old_h = get_f32(o.b);
        new_h.assign(ggml_nelements(n.b), 0.0f);
        for (size_t s = 0; s < n_slots_; ++s) {
            for (size_t j = 0; j < n_out; ++j) {
                std::memcpy(&new_h[(s * n_out + j) * rank], &old_h[(s * n_out + j) * rank_], rank_ * sizeof(float));
            }
        }
        set_f32(n.b, new_h.data(), 0, new_h.size());
    }

    if (buf_) ggml_backend_buffer_free(buf_);
    if (ctx_) ggml_free(ctx_);
    ctx_     = ctx;
    buf_     = buf;
    targets_ = targets;
    stacks_  = std::move(stacks);
    used_.resize(n_slots, false);
    slot_scale_.resize(n_slots, 0.0f);
    n_slots_ = n_slots;
    rank_    = rank;
    type_    = type;
    ++generation_;
}

int32_t LoraBank::add(const LoraAdapter & ad) {
    GGML_ASSERT(!ad.weights().empty());
    // what the stacks must cover: every weight adapted so far and this adapter's, its rank, a free
    // slot, and F32 as soon as one adapter's factors are not all F16
    std::vector<const ggml_tensor *> targets = targets_;
    bool                             all_f16 = true;
    for (const LoraWeight & w : ad.weights()) {
        GGML_ASSERT(!w.a.empty() && !w.b.empty());  // host data still there
        if (std::find(targets.begin(), targets.end(), w.target) == targets.end()) targets.push_back(w.target);
        all_f16 = all_f16 && w.f16;
    }
    const ggml_type type = (n_slots_ == 0 || type_ == GGML_TYPE_F16) && all_f16 ? GGML_TYPE_F16 : GGML_TYPE_F32;
    const uint32_t  rank = std::max(rank_, ad.max_rank());
    int32_t         slot = -1;
    for (uint32_t s = 1; s < n_slots_ && slot < 0; ++s) {
        if (!used_[s]) slot = static_cast<int32_t>(s);
    }
    const uint32_t n_slots = slot < 0 ? std::max<uint32_t>(n_slots_ + 1, 2) : n_slots_;
    if (slot < 0) slot = static_cast<int32_t>(n_slots - 1);
    if (n_slots != n_slots_ || rank != rank_ || targets.size() != targets_.size() || type != type_) {
        reserve(n_slots, rank, targets, type);
    }

    // slot `slot` of every stack: the adapter's factors where it adapts the weight, zeros elsewhere.
    // The row scale is the first weight's; a weight of another rank has the ratio folded into B.
    const float        scale = ad.weights().front().scale;
    std::vector<float> h;
    for (const ggml_tensor * t : targets_) {
        const Stack &      st   = stacks_.at(t);
        const size_t       n_in = t->ne[0], n_out = t->ne[1];
        const LoraWeight * lw   = nullptr;
        for (const LoraWeight & w : ad.weights()) {
            if (w.target == t) lw = &w;
        }
        h.assign(n_in * rank_, 0.0f);  // A slice [n_in, rank_]: the adapter's `rank` rows first
        if (lw) std::memcpy(h.data(), lw->a.data(), lw->a.size() * sizeof(float));
        set_f32(st.a, h.data(), static_cast<size_t>(slot) * h.size(), h.size());
        h.assign(n_out * rank_, 0.0f);  // B slice [rank_, n_out]: each row padded
        if (lw) {
            const float fold = lw->scale == scale ? 1.0f : (scale != 0.0f ? lw->scale / scale : 0.0f);
            for (size_t j = 0; j < n_out; ++j) {
                for (size_t r = 0; r < lw->rank; ++r) h[j * rank_ + r] = fold * lw->b[j * lw->rank + r];
            }
        }
        set_f32(st.b, h.data(), static_cast<size_t>(slot) * h.size(), h.size());
    }
    used_[slot]       = true;
    slot_scale_[slot] = scale;
    ++n_used_;
    return slot;
}

void LoraBank::remove(int32_t slot) {
    GGML_ASSERT(slot >= 1 && static_cast<uint32_t>(slot) < n_slots_ && used_[slot]);
    used_[slot]       = false;
    slot_scale_[slot] = 0.0f;
    if (--n_used_ == 0) free_all();
}

}  // namespace appliance

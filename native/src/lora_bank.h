// The LoRA adapters one model runner serves, laid out so that a single forward pass can apply a
// different adapter (or none) to every row of its batch: "adapters as experts". For each adapted
// base weight W [n_in, n_out] the bank holds two stacks,
//     A: [n_in, rank, n_slots]   slot s = adapter s's A, zero-padded to the bank's rank
//     B: [rank, n_out, n_slots]  slot s = adapter s's B, zero-padded likewise
// and the graph computes W x + scale[ids] * B[ids] (A[ids] x) with two ggml_mul_mat_id, ids giving
// each row's slot and scale its adapter's scale (slot_scale). Slot 0 is all zeros: rows without an
// adapter get exactly W x. Padding with zeros leaves the product unchanged, so adapters of different
// ranks (and targets) share one stack. (An adapter whose weights have different ranks, hence
// scales, has the ratio to its first weight's scale folded into B.)
//
// Stacks are F16 while every adapter's factors are F16 (as llama.cpp's converter writes them; the
// same kernels llama.cpp runs then), else F32, on the model's device. They grow (more slots, a larger
// rank, more adapted weights, F16 to F32)
// when an adapter does not fit, copying what they hold; every growth bumps generation(), and
// graphs built against an older generation must not run again. The bank frees its memory when its
// last adapter goes.
#pragma once

#include "ggml-backend.h"
#include "ggml.h"

#include <cstdint>
#include <unordered_map>
#include <vector>

namespace appliance {

class LoraAdapter;
struct Model;

class LoraBank {
public:
    explicit LoraBank(const Model & m);
    ~LoraBank();
    LoraBank(const LoraBank &) = delete;
    LoraBank & operator=(const LoraBank &) = delete;

    struct Stack {
        ggml_tensor * a = nullptr;  // [n_in, rank, n_slots] F16 or F32
        ggml_tensor * b = nullptr;  // [rank, n_out, n_slots] F16 or F32
    };

    // Uploads `ad` (whose host data must still be present) into a free slot, growing the stacks
    // when needed; returns the slot, >= 1. Throws RuntimeFailure when memory cannot be had.
    int32_t add(const LoraAdapter & ad);
    // Frees a slot (its contents are overwritten by the next add). Precondition: slot in use.
    void    remove(int32_t slot);

    // the stacks of base weight w, or nullptr when no adapter in the bank adapts it
    const Stack * stack_for(const ggml_tensor * w) const;
    // what the LoRA term of a row in `slot` is multiplied by (0 for slot 0)
    float         slot_scale(int32_t slot) const { return slot_scale_[slot]; }
    bool          empty() const { return n_used_ == 0; }
    ggml_type     type() const { return type_; }
    uint32_t      n_slots() const { return n_slots_; }  // slot 0 included
    uint32_t      rank() const { return rank_; }
    size_t        bytes() const;                  // device memory of the stacks
    size_t        slot_bytes() const;             // what one slot occupies
    uint64_t      generation() const { return generation_; }

private:
    // reallocates every stack for n_slots slots of `rank` over `targets`, keeping the contents
    void reserve(uint32_t n_slots, uint32_t rank, const std::vector<const ggml_tensor *> & targets, ggml_type type);
    void free_all();

    const Model &                                        model_;
    ggml_context *                                       ctx_ = nullptr;
    ggml_backend_buffer_t                                buf_ = nullptr;
    std::vector<const ggml_tensor *>                     targets_;  // in allocation order
    std::unordered_map<const ggml_tensor *, Stack>       stacks_;
    std::vector<bool>                                    used_;     // per slot; used_[0] stays false
    std::vector<float>                                   slot_scale_;
    ggml_type                                            type_ = GGML_TYPE_F16;
    uint32_t                                             n_slots_ = 0;
    uint32_t                                             rank_    = 0;
    uint32_t                                             n_used_  = 0;
    uint64_t                                             generation_ = 0;
};

}  // namespace appliance

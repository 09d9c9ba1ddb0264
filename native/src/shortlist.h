// A shortlisted output head: the rows of the model's output matrix for a few thousand tokens that
// carry most of the probability mass in practice. Early exit checks its confidence with it, and the
// lossless draft picks its tokens with it, at a fraction of the full head's cost (the default
// model's head is 262,144 x 640, about three quarters of the bytes read per token).
#pragma once

#include "ggml-backend.h"
#include "ggml.h"

#include <cstdint>
#include <vector>

namespace appliance {

struct Model;

class Shortlist {
public:
    // Copies the output rows of `tokens` (distinct ids in [0, n_vocab)) into their own buffer, where
    // the CPU backend repacks them like any weight. Throws InvalidArgument for bad ids.
    Shortlist(const Model & m, std::vector<int32_t> tokens);
    ~Shortlist();
    Shortlist(const Shortlist &) = delete;
    Shortlist & operator=(const Shortlist &) = delete;

    ggml_tensor *                weights() const { return w_; }  // [n_embd, n_short]
    const std::vector<int32_t> & tokens() const { return tokens_; }
    uint32_t                     size() const { return static_cast<uint32_t>(tokens_.size()); }
    size_t                       bytes() const;

private:
    std::vector<int32_t>  tokens_;
    ggml_context *        ctx_ = nullptr;
    ggml_backend_buffer_t buf_ = nullptr;
    ggml_tensor *         w_   = nullptr;
};

}  // namespace appliance

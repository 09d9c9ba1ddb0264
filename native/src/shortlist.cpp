#include "shortlist.h"

#include "error.h"
#include "model.h"

#include <cstring>
#include <unordered_set>

namespace appliance {

Shortlist::Shortlist(const Model & m, std::vector<int32_t> tokens) : tokens_(std::move(tokens)) {
    const HParams & hp = m.hp;
    APPL_REQUIRE(!tokens_.empty(), InvalidArgument, "the shortlist is empty");
    std::unordered_set<int32_t> seen;
    for (int32_t t : tokens_) {
        APPL_REQUIRE(t >= 0 && t < static_cast<int32_t>(hp.n_vocab), InvalidArgument,
                     "shortlist token " + std::to_string(t) + " is outside the vocabulary of " + std::to_string(hp.n_vocab));
        APPL_REQUIRE(seen.insert(t).second, InvalidArgument, "shortlist token " + std::to_string(t) + " is listed twice");
    }
    // the output matrix as stored in the file (its rows are independent, whatever the quantization)
    const ggml_tensor * out = m.output;  // [n_embd, n_vocab]
    const size_t        row = ggml_row_size(out->type, hp.n_embd);
    const uint8_t *     src = m.file->tensor_data(out);
    std::vector<uint8_t> host(row * tokens_.size());
    for (size_t i = 0; i < tokens_.size(); ++i) {
        std::memcpy(host.data() + i * row, src + static_cast<size_t>(tokens_[i]) * row, row);
    }

    ggml_init_params p = {ggml_tensor_overhead(), nullptr, /*no_alloc=*/true};
    ctx_ = ggml_init(p);
    w_   = ggml_new_tensor_2d(ctx_, out->type, hp.n_embd, static_cast<int64_t>(tokens_.size()));  // [n_embd, n_short]
    ggml_set_name(w_, "output_shortlist");
    buf_ = ggml_backend_alloc_ctx_tensors_from_buft(ctx_, matmul_buft(m, w_));
    if (buf_ == nullptr) {
        ggml_free(ctx_);
        throw RuntimeFailure("cannot allocate the shortlisted output head");
    }
    ggml_backend_buffer_set_usage(buf_, GGML_BACKEND_BUFFER_USAGE_WEIGHTS);
    ggml_backend_tensor_set(w_, host.data(), 0, host.size());
}

Shortlist::~Shortlist() {
    ggml_backend_buffer_free(buf_);
    ggml_free(ctx_);
}

size_t Shortlist::bytes() const { return ggml_backend_buffer_get_size(buf_); }

}  // namespace appliance

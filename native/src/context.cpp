#include "context.h"

#include "error.h"
#include "model.h"

#include <algorithm>
#include <cstring>

namespace appliance {

namespace {

uint32_t checked_n_ctx(const ContextParams & p) {
    APPL_REQUIRE(p.n_ctx > 0, InvalidArgument, "n_ctx must be positive");
    APPL_REQUIRE(p.n_ubatch > 0, InvalidArgument, "n_ubatch must be positive");
    APPL_REQUIRE(p.n_threads > 0, InvalidArgument, "n_threads must be positive, got " + std::to_string(p.n_threads));
    return p.n_ctx;
}

}  // namespace

Context::Context(const Model & model, const ContextParams & params)
    : runner_(model, checked_n_ctx(params), params.n_ubatch, params.n_threads),
      n_ubatch_(std::min(params.n_ubatch, params.n_ctx)) {}

uint32_t Context::n_vocab() const { return runner_.model().hp.n_vocab; }

const float * Context::logits(uint32_t i) const {
    APPL_REQUIRE(i < n_outputs_, InvalidArgument, "output index " + std::to_string(i) + " out of range");
    return logits_.data() + static_cast<size_t>(i) * n_vocab();
}

void Context::truncate(uint32_t n_keep) {
    APPL_REQUIRE(n_keep <= n_past_, InvalidArgument, "truncate beyond the end of the sequence");
    n_past_ = n_keep;  // cells past n_past are never attended to; the next decode overwrites them
}

void Context::decode(const int32_t * tokens, uint32_t n, bool all_logits) {
    APPL_REQUIRE(n > 0, InvalidArgument, "decode needs at least one token");
    if (static_cast<uint64_t>(n_past_) + n > n_ctx()) {
        throw ContextOverflowError("sequence of " + std::to_string(n_past_ + static_cast<uint64_t>(n)) +
                                   " tokens does not fit the context of " + std::to_string(n_ctx()) + " tokens");
    }
    const int32_t n_vocab_i = static_cast<int32_t>(n_vocab());
    for (uint32_t i = 0; i < n; ++i) {
        if (tokens[i] < 0 || tokens[i] >= n_vocab_i) {
            throw InvalidArgument("token id " + std::to_string(tokens[i]) + " at index " + std::to_string(i) +
                                  " is outside the vocabulary of " + std::to_string(n_vocab_i));
        }
    }

    const uint32_t start = n_past_;
    n_outputs_           = 0;
    logits_.clear();
    try {
        for (uint32_t off = 0; off < n; off += n_ubatch_) {
            const uint32_t len = std::min(n_ubatch_, n - off);
            batch_.clear();
            batch_.views.push_back(SeqView{&blocks_, n_ctx()});
            for (uint32_t i = 0; i < len; ++i) {
                // logits for every token, or for the chunk's last (the one after the prompt's last is kept)
                batch_.add(tokens[off + i], static_cast<int32_t>(n_past_ + i), 0, all_logits || i == len - 1);
            }
            runner_.run(batch_, chunk_logits_);
            if (all_logits || off + len == n) {
                logits_.insert(logits_.end(), chunk_logits_.begin(), chunk_logits_.end());
            }
            n_past_ += len;
        }
    } catch (...) {
        n_past_ = start;
        logits_.clear();
        throw;
    }
    n_outputs_ = all_logits ? n : 1;
}

}  // namespace appliance

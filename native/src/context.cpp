#include "context.h"

#include "error.h"
#include "model.h"
#include "sampler.h"

#include <algorithm>
#include <cmath>
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
    : runner_(model, checked_n_ctx(params), checked_n_ctx(params), params.n_ubatch, params.n_threads),
      n_ubatch_(std::min(params.n_ubatch, params.n_ctx)) {}

uint32_t Context::n_vocab() const { return runner_.model().hp.n_vocab; }
uint32_t Context::n_layer() const { return runner_.model().hp.n_layer; }

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
            batch_.views.push_back(SeqView{&blocks_, n_ctx(), &blocks_});
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

void Context::run_pass(const std::vector<int32_t> & tokens, const PassSpec & pass) {
    const uint32_t n = static_cast<uint32_t>(tokens.size());
    APPL_REQUIRE(n > 0 && n <= std::min(n_ubatch_, runner_.n_hidden_rows()), InvalidArgument, "run_pass takes 1..n_ubatch tokens");
    APPL_REQUIRE(n_past_ + n <= n_ctx(), ContextOverflowError, "the pass does not fit the context");
    APPL_REQUIRE(pass.head != Head::Shortlist || runner_.shortlist() != nullptr, InvalidArgument, "no shortlist is set");
    APPL_REQUIRE(pass.l_begin <= runner_.model().hp.n_layer, InvalidArgument, "l_begin is beyond the last layer");
    for (int32_t t : tokens) {
        APPL_REQUIRE(t >= 0 && t < static_cast<int32_t>(n_vocab()), InvalidArgument, "token id outside the vocabulary");
    }
    batch_.clear();
    batch_.views.push_back(SeqView{&blocks_, n_ctx(), &blocks_});
    for (uint32_t i = 0; i < n; ++i) {
        batch_.add(tokens[i], static_cast<int32_t>(n_past_ + i), 0, true);
        batch_.hidden_rows.push_back(static_cast<int32_t>(i));
    }
    runner_.run(batch_, chunk_logits_, pass);
}

void Context::probe_exits(const std::vector<int32_t> & tokens, const std::vector<uint32_t> & exit_layers,
                          std::vector<int32_t> & full_top, std::vector<int32_t> & exit_top, std::vector<float> & exit_conf) {
    const Model &     m = runner_.model();
    const uint32_t    L = m.hp.n_layer;
    const uint32_t    n = static_cast<uint32_t>(tokens.size());
    const Shortlist * sl = runner_.shortlist();
    APPL_REQUIRE(sl != nullptr, InvalidArgument, "probe_exits needs a shortlist (set_shortlist)");
    APPL_REQUIRE(n > 0, InvalidArgument, "probe_exits needs at least one token");
    APPL_REQUIRE(n <= n_ctx(), ContextOverflowError, "sequence of " + std::to_string(n) + " tokens does not fit the context");
    for (size_t x = 0; x < exit_layers.size(); ++x) {
        APPL_REQUIRE(exit_layers[x] >= 1 && exit_layers[x] < L && (x == 0 || exit_layers[x] > exit_layers[x - 1]),
                     InvalidArgument, "exit_layers must be ascending, in [1, n_layer)");
    }
    for (int32_t t : tokens) {
        APPL_REQUIRE(t >= 0 && t < static_cast<int32_t>(m.hp.n_vocab), InvalidArgument, "token id outside the vocabulary");
    }
    const size_t n_exits = exit_layers.size();
    const size_t n_short = sl->size();
    full_top.assign(n, 0);
    exit_top.assign(static_cast<size_t>(n) * n_exits, 0);
    exit_conf.assign(static_cast<size_t>(n) * n_exits, 0.0f);
    n_past_    = 0;
    n_outputs_ = 0;
    logits_.clear();
    const uint32_t chunk = std::min(n_ubatch_, runner_.n_hidden_rows());
    for (uint32_t off = 0; off < n; off += chunk) {
        const uint32_t len = std::min(chunk, n - off);
        batch_.clear();
        batch_.views.push_back(SeqView{&blocks_, n_ctx(), &blocks_});
        for (uint32_t i = 0; i < len; ++i) {
            batch_.add(tokens[off + i], static_cast<int32_t>(off + i), 0, true);
            batch_.hidden_rows.push_back(static_cast<int32_t>(i));
        }
        uint32_t begin = 0;
        for (size_t x = 0; x < n_exits; ++x) {
            runner_.run(batch_, chunk_logits_, PassSpec{begin, exit_layers[x], Head::Shortlist, true, false});
            for (uint32_t i = 0; i < len; ++i) {
                const float * row       = chunk_logits_.data() + static_cast<size_t>(i) * n_short;
                const SoftmaxStats st = softmax_stats(row, static_cast<int32_t>(n_short));
                exit_top[(off + i) * n_exits + x]  = sl->tokens()[st.best];
                exit_conf[(off + i) * n_exits + x] = st.top_prob();
            }
            begin = exit_layers[x];
        }
        runner_.run(batch_, chunk_logits_, begin == 0 ? PassSpec{} : PassSpec{begin, L, Head::Full, false, false});
        for (uint32_t i = 0; i < len; ++i) {
            full_top[off + i] = argmax(chunk_logits_.data() + static_cast<size_t>(i) * m.hp.n_vocab, static_cast<int32_t>(m.hp.n_vocab));
        }
    }
    n_past_ = n;  // the sequence is now `tokens` (its K/V are those of full-depth passes)
}

}  // namespace appliance

#include "choices.h"

#include "error.h"
#include "sampler.h"

#include <algorithm>
#include <cmath>
#include <string>

namespace appliance {

Choices::Choices(const std::vector<std::vector<int32_t>> & answers, int32_t n_vocab, const std::unordered_set<int32_t> & eog)
    : eog_(eog.begin(), eog.end()), n_vocab_(n_vocab) {
    APPL_REQUIRE(!answers.empty(), InvalidArgument, "choices: no answers to choose from");
    std::sort(eog_.begin(), eog_.end());
    size_t total = 0;
    nodes_.emplace_back();
    for (size_t a = 0; a < answers.size(); ++a) {
        const std::vector<int32_t> & toks = answers[a];
        APPL_REQUIRE(!toks.empty(), InvalidArgument, "choices: answer " + std::to_string(a) + " has no tokens");
        total += toks.size();
        APPL_REQUIRE(total <= kMaxTokens, InvalidArgument,
                     "choices: more than " + std::to_string(kMaxTokens) + " tokens in all");
        int32_t at = 0;
        for (const int32_t t : toks) {
            APPL_REQUIRE(t >= 0 && t < n_vocab, InvalidArgument,
                         "choices: answer " + std::to_string(a) + " has token " + std::to_string(t) +
                             ", outside the vocabulary [0, " + std::to_string(n_vocab) + ")");
            auto & next = nodes_[static_cast<size_t>(at)].next;
            auto   it   = std::lower_bound(next.begin(), next.end(), std::make_pair(t, INT32_MIN));
            if (it != next.end() && it->first == t) {
                at = it->second;
                continue;
            }
            const int32_t node = static_cast<int32_t>(nodes_.size());
            next.insert(it, {t, node});  // `next` is not used after nodes_ grows
            nodes_.emplace_back();
            at = node;
        }
        nodes_[static_cast<size_t>(at)].whole = true;
    }
}

int32_t Choices::child(int32_t token) const {
    const auto & next = nodes_[static_cast<size_t>(at_)].next;
    auto         it   = std::lower_bound(next.begin(), next.end(), std::make_pair(token, INT32_MIN));
    return it != next.end() && it->first == token ? it->second : -1;
}

bool Choices::ends_here(int32_t token) const {
    return nodes_[static_cast<size_t>(at_)].whole && std::binary_search(eog_.begin(), eog_.end(), token);
}

bool Choices::complete() const {
    return ended_ || nodes_[static_cast<size_t>(at_)].next.empty();
}

bool Choices::allows(int32_t token) {
    if (ended_ || token < 0 || token >= n_vocab_) return false;
    return child(token) >= 0 || ends_here(token);
}

int32_t Choices::mask(float * logits, int32_t n, const int32_t * ids) {
    int32_t allowed = 0;
    for (int32_t i = 0; i < n; ++i) {
        if (logits[i] == -INFINITY) continue;
        if (allows(ids != nullptr ? ids[i] : i)) {
            ++allowed;
        } else {
            logits[i] = -INFINITY;
        }
    }
    return allowed;
}

float Choices::runner_up(const float * logits, int32_t n, int32_t chosen) {
    APPL_REQUIRE(n > 0 && chosen >= 0 && chosen < n, InvalidArgument, "row size or token out of range");
    float best = -INFINITY;
    each_allowed([&](int32_t tok) {
        if (tok != chosen && tok < n) best = std::max(best, logits[tok]);
    });
    return best;
}

void Choices::accept(int32_t token) {
    APPL_REQUIRE(allows(token), RuntimeFailure, "token " + std::to_string(token) + " continues none of the choices");
    const int32_t node = child(token);
    if (node >= 0) {
        at_ = node;
    } else {
        ended_ = true;
    }
}

int32_t Choices::sample(Sampler & sampler, const float * logits, const std::vector<int32_t> & history) {
    const int32_t n = sampler.n_vocab();
    row_.assign(static_cast<size_t>(n), -INFINITY);
    int32_t allowed = 0;
    each_allowed([&](int32_t tok) {
        if (tok < n && logits[tok] != -INFINITY) {
            row_[static_cast<size_t>(tok)] = logits[tok];
            ++allowed;
        }
    });
    return allowed == 0 ? -1 : sampler.sample(row_.data(), history);
}

}  // namespace appliance

// Decoding kept to a fixed set of answers, given as token sequences (a task's known labels, tokenized
// as the model writes them after its prompt): a trie over them. At each step only the tokens that
// continue some answer are allowed; once an answer is whole the output ends, unless a longer answer
// continues it, where the end-of-generation tokens are allowed beside the continuations.
//
// Unlike a GBNF grammar of the same strings, only each answer's own tokenization is allowed (the
// one the model was trained on), so a margin compares answers, not spellings of one answer, and a
// step costs the handful of allowed tokens, not a grammar check of the vocabulary's best ones.
#pragma once

#include "constraint.h"

#include <cstddef>
#include <cstdint>
#include <unordered_set>
#include <utility>
#include <vector>

namespace appliance {

class Choices final : public Constraint {
public:
    static constexpr size_t kMaxTokens = size_t{1} << 20;  // all answers' tokens together

    // Throws InvalidArgument for no answers, an empty answer, a token outside [0, n_vocab) or more
    // than kMaxTokens tokens in all. `eog`: the end-of-generation tokens (allowed where an answer is
    // whole and a longer one goes on).
    Choices(const std::vector<std::vector<int32_t>> & answers, int32_t n_vocab, const std::unordered_set<int32_t> & eog);

    bool    allows(int32_t token) override;
    int32_t mask(float * logits, int32_t n, const int32_t * ids = nullptr) override;
    float   runner_up(const float * logits, int32_t n, int32_t chosen) override;
    void    accept(int32_t token) override;
    int32_t sample(Sampler & sampler, const float * logits, const std::vector<int32_t> & history) override;
    bool    complete() const override;

private:
    struct Node {
        std::vector<std::pair<int32_t, int32_t>> next;  // (token, node), sorted by token
        bool                                     whole = false;  // an answer ends here
    };

    int32_t child(int32_t token) const;  // -1: none
    // f(token) for every token allowed next: the continuations, and the end-of-generation tokens
    // where an answer is whole
    template <typename F> void each_allowed(F && f) const {
        if (ended_) return;
        const Node & node = nodes_[static_cast<size_t>(at_)];
        for (const auto & kid : node.next) f(kid.first);
        if (node.whole) {
            for (const int32_t tok : eog_) f(tok);
        }
    }
    bool    ends_here(int32_t token) const;  // an end-of-generation token where an answer is whole

    std::vector<Node>     nodes_;  // nodes_[0]: the root
    std::vector<int32_t>  eog_;
    int32_t               at_      = 0;
    int32_t               n_vocab_ = 0;
    bool                  ended_   = false;  // took an end-of-generation token
    std::vector<float>    row_;  // scratch: the masked row
};

}  // namespace appliance

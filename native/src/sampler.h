// Token sampling: repetition penalty, top-k, top-p, min-p, temperature, seeded draws; greedy at
// temperature 0. The order follows llama.cpp's default chain (penalties -> top-k -> top-p ->
// min-p -> temperature -> draw).
#pragma once

#include <cmath>
#include <cstdint>
#include <random>
#include <utility>
#include <vector>

namespace appliance {

struct SamplingParams {
    float    temperature    = 0.8f;  // <= 0: greedy
    int32_t  top_k          = 40;    // <= 0: off
    float    top_p          = 0.95f; // >= 1: off
    float    min_p          = 0.05f; // <= 0: off
    float    repeat_penalty = 1.0f;  // 1: off
    int32_t  repeat_last_n  = 64;    // tokens of history the penalty looks at
    uint64_t seed           = 0;
};

class Sampler {
public:
    // Throws InvalidArgument for out-of-range parameters.
    Sampler(const SamplingParams & params, int32_t n_vocab);

    // Picks the next token from logits[n_vocab]; `history` holds the tokens so far (prompt and output).
    int32_t sample(const float * logits, const std::vector<int32_t> & history);

    const SamplingParams & params() const { return params_; }
    int32_t                n_vocab() const { return n_vocab_; }

private:
    struct Cand {
        int32_t id;
        float   logit;
    };

    SamplingParams    params_;
    int32_t           n_vocab_;
    std::mt19937_64   rng_;
    std::vector<Cand> cands_;
};

// index of the largest logit (lowest index on ties)
int32_t argmax(const float * logits, int32_t n);

// How sure the model was of a token: under softmax(logits[0..n)) at temperature 1, before any
// penalty or truncation, the token's log-probability and the distribution's entropy (nats).
// The cascade's confidence check reads these; they cost one pass over the row.
// `margin` is how clearly it won: its logit minus the best logit of any other token the request could
// have taken instead (those its grammar allows, when it has one); +inf when it was the only choice.
struct TokenScore {
    float logprob = NAN;
    float entropy = NAN;
    float margin  = NAN;
};
// the largest of logits[0..n) other than logits[idx] (-inf when n == 1); precondition: 0 <= idx < n
float runner_up(const float * logits, int32_t n, int32_t idx);
// precondition: 0 <= idx < n
TokenScore score_token(const float * logits, int32_t n, int32_t idx);

// softmax(logits[0..n)) at temperature 1 in one vectorised pass: the largest logit and its (lowest)
// index, log Z relative to that maximum, and the entropy (nats). Early exit's confidence is
// top_prob(), the cascade's token scores are logprob() and entropy. precondition: n > 0
struct SoftmaxStats {
    int32_t best      = 0;
    float   max_logit = 0.0f;
    float   log_z     = 0.0f;  // log sum_i e^(l_i - max_logit)
    float   entropy   = 0.0f;
    float   top_prob() const { return std::exp(-log_z); }
    float   logprob(float logit) const { return logit - max_logit - log_z; }
};
SoftmaxStats softmax_stats(const float * logits, int32_t n);

}  // namespace appliance

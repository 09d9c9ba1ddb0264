#include "sampler.h"

#include "error.h"

#include <algorithm>
#include <cassert>
#include <cmath>
#include <cstring>
#include <unordered_set>
#include <vector>

namespace appliance {

int32_t argmax(const float * logits, int32_t n) {
    int32_t best = 0;
    for (int32_t i = 1; i < n; ++i) {
        if (logits[i] > logits[best]) {
            best = i;
        }
    }
    return best;
}

namespace {

// e^x for x in [-87, 0], branch-free so the compiler vectorizes the loop that calls it: 2^(x log2 e)
// split into a rounded integer n and a fraction f in [-0.5, 0.5]; 2^f by its Taylor series to the
// 7th power (relative error about 5e-9), 2^n put in the exponent bits.
inline float exp_nonpos(float x) {
    const float t = x * 1.44269504089f;
    const float n = (t + 12582912.0f) - 12582912.0f;  // round to nearest (|t| < 2^22)
    const float f = (t - n) * 0.69314718056f;         // (t - n) ln 2, in [-0.35, 0.35]
    float p = 1.0f / 5040.0f;
    p = p * f + 1.0f / 720.0f;
    p = p * f + 1.0f / 120.0f;
    p = p * f + 1.0f / 24.0f;
    p = p * f + 1.0f / 6.0f;
    p = p * f + 0.5f;
    p = p * f + 1.0f;
    p = p * f + 1.0f;
    const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

}  // namespace

SoftmaxStats softmax_stats(const float * logits, int32_t n) {
    assert(n > 0);
    // every loop below is branch-free over 8 independent lanes, so the compiler vectorizes it
    constexpr int32_t kLanes = 8;
    const int32_t     n8     = n / kLanes * kLanes;
    float             lane[kLanes];
    for (int32_t k = 0; k < kLanes; ++k) lane[k] = logits[0];
    for (int32_t i = 0; i < n8; i += kLanes) {
        for (int32_t k = 0; k < kLanes; ++k) lane[k] = logits[i + k] > lane[k] ? logits[i + k] : lane[k];
    }
    float mx = logits[0];
    for (int32_t k = 0; k < kLanes; ++k) mx = std::max(mx, lane[k]);
    for (int32_t i = n8; i < n; ++i) mx = std::max(mx, logits[i]);
    // e^d and e^d d for d = l - mx, clamped at -87 (-inf logits, impossible tokens, add ~1e-38 each);
    // log Z and E[d] from their sums
    float z[kLanes] = {}, zl[kLanes] = {};
    for (int32_t i = 0; i < n8; i += kLanes) {
        for (int32_t k = 0; k < kLanes; ++k) {
            const float r = logits[i + k] - mx;
            const float d = r > -87.0f ? r : -87.0f;
            const float e = exp_nonpos(d);
            z[k] += e;
            zl[k] += e * d;
        }
    }
    for (int32_t i = n8; i < n; ++i) {
        const float r = logits[i] - mx;
        const float d = r > -87.0f ? r : -87.0f;
        const float e = exp_nonpos(d);
        z[0] += e;
        zl[0] += e * d;
    }
    float zs = 0.0f, zls = 0.0f;
    for (int32_t k = 0; k < kLanes; ++k) {
        zs += z[k];
        zls += zl[k];
    }
    SoftmaxStats out;
    out.max_logit = mx;
    out.log_z     = std::log(zs);
    out.entropy   = out.log_z - zls / zs;
    out.best      = 0;
    while (logits[out.best] != mx) ++out.best;  // the lowest index holding the maximum (n > 0, mx is in the row)
    return out;
}

TokenScore score_token(const float * logits, int32_t n, int32_t idx) {
    assert(n > 0 && idx >= 0 && idx < n);
    const SoftmaxStats st = softmax_stats(logits, n);
    return TokenScore{st.logprob(logits[idx]), st.entropy, logits[idx] - runner_up(logits, n, idx)};
}

float runner_up(const float * logits, int32_t n, int32_t idx) {
    assert(n > 0 && idx >= 0 && idx < n);
    float best = -INFINITY;
    for (int32_t i = 0; i < idx; ++i) best = std::max(best, logits[i]);
    for (int32_t i = idx + 1; i < n; ++i) best = std::max(best, logits[i]);
    return best;
}

Sampler::Sampler(const SamplingParams & p, int32_t n_vocab) : params_(p), n_vocab_(n_vocab), rng_(p.seed) {
    APPL_REQUIRE(n_vocab > 0, InvalidArgument, "n_vocab must be positive");
    APPL_REQUIRE(std::isfinite(p.temperature) && p.temperature >= 0.0f, InvalidArgument, "temperature must be >= 0");
    APPL_REQUIRE(std::isfinite(p.top_p) && p.top_p > 0.0f && p.top_p <= 1.0f, InvalidArgument, "top_p must be in (0, 1]");
    APPL_REQUIRE(std::isfinite(p.min_p) && p.min_p >= 0.0f && p.min_p < 1.0f, InvalidArgument, "min_p must be in [0, 1)");
    APPL_REQUIRE(std::isfinite(p.repeat_penalty) && p.repeat_penalty > 0.0f, InvalidArgument, "repeat_penalty must be > 0");
    APPL_REQUIRE(p.repeat_last_n >= 0, InvalidArgument, "repeat_last_n must be >= 0");
    APPL_REQUIRE(p.top_k >= 0, InvalidArgument, "top_k must be >= 0");
}

int32_t Sampler::sample(const float * logits, const std::vector<int32_t> & history) {
    const bool penalize = params_.repeat_penalty != 1.0f && params_.repeat_last_n > 0 && !history.empty();

    // penalised copy of the logits of recently seen tokens (as llama.cpp: divide positive, multiply negative)
    std::vector<std::pair<int32_t, float>> changed;
    if (penalize) {
        std::unordered_set<int32_t> seen;
        const size_t from = history.size() > static_cast<size_t>(params_.repeat_last_n) ? history.size() - params_.repeat_last_n : 0;
        for (size_t i = from; i < history.size(); ++i) {
            const int32_t t = history[i];
            if (t >= 0 && t < n_vocab_ && seen.insert(t).second) {
                const float l = logits[t];
                changed.emplace_back(t, l > 0 ? l / params_.repeat_penalty : l * params_.repeat_penalty);
            }
        }
    }
    if (params_.temperature <= 0.0f) {
        if (changed.empty()) {
            return argmax(logits, n_vocab_);
        }
        std::vector<float> tmp(logits, logits + n_vocab_);
        for (const auto & [id, l] : changed) tmp[id] = l;
        return argmax(tmp.data(), n_vocab_);
    }

    // candidates: top-k first (a partial selection keeps this cheap for a 262k vocabulary)
    cands_.resize(n_vocab_);
    for (int32_t i = 0; i < n_vocab_; ++i) {
        cands_[i] = {i, logits[i]};
    }
    for (auto & [id, l] : changed) {
        cands_[id].logit = l;
    }
    auto by_logit = [](const Cand & a, const Cand & b) { return a.logit > b.logit || (a.logit == b.logit && a.id < b.id); };
    size_t k = params_.top_k > 0 ? std::min<size_t>(params_.top_k, cands_.size()) : cands_.size();
    if (k < cands_.size()) {
        std::nth_element(cands_.begin(), cands_.begin() + k, cands_.end(), by_logit);
        cands_.resize(k);
    }
    // top-p and min-p need the candidates in order; without top-k, sort only as far as needed
    size_t sorted = std::min<size_t>(cands_.size(), 1024);
    std::partial_sort(cands_.begin(), cands_.begin() + sorted, cands_.end(), by_logit);

    const float max_l = cands_[0].logit;
    double      sum   = 0.0;
    for (const Cand & c : cands_) {
        sum += std::exp(static_cast<double>(c.logit - max_l));
    }
    // top-p: keep the smallest prefix whose probability mass reaches top_p
    if (params_.top_p < 1.0f) {
        double cum = 0.0;
        size_t keep = cands_.size();
        for (size_t i = 0; i < cands_.size(); ++i) {
            if (i == sorted) {  // need more of the order
                sorted = std::min(cands_.size(), sorted * 8);
                std::partial_sort(cands_.begin() + i, cands_.begin() + sorted, cands_.end(), by_logit);
            }
            cum += std::exp(static_cast<double>(cands_[i].logit - max_l)) / sum;
            if (cum >= params_.top_p) {
                keep = i + 1;
                break;
            }
        }
        cands_.resize(keep);
    }
    // min-p: drop tokens whose probability is below min_p times the best one's
    if (params_.min_p > 0.0f) {
        const float cutoff = max_l + std::log(params_.min_p);
        size_t      keep   = 1;
        while (keep < cands_.size() && keep < sorted && cands_[keep].logit >= cutoff) {
            ++keep;
        }
        if (keep == sorted && keep < cands_.size()) {
            std::sort(cands_.begin() + keep, cands_.end(), by_logit);
            while (keep < cands_.size() && cands_[keep].logit >= cutoff) ++keep;
        }
        cands_.resize(keep);
    }
    // temperature and the draw
    std::vector<double> w(cands_.size());
    for (size_t i = 0; i < cands_.size(); ++i) {
        w[i] = std::exp(static_cast<double>(cands_[i].logit - max_l) / params_.temperature);
    }
    std::discrete_distribution<size_t> dist(w.begin(), w.end());
    return cands_[dist(rng_)].id;
}

}  // namespace appliance

#include "spec_policy.h"

#include <algorithm>
#include <cmath>
#include <string_view>

namespace appliance {

std::vector<double> & SpecPolicy::tab(Pass kind) {
    return kind == Pass::Draft ? draft_ : kind == Pass::Verify ? verify_ : plain_;
}

const std::vector<double> & SpecPolicy::tab(Pass kind) const {
    return kind == Pass::Draft ? draft_ : kind == Pass::Verify ? verify_ : plain_;
}

void SpecPolicy::record_pass(Pass kind, uint32_t rows, uint64_t us) {
    if (rows == 0) return;
    std::vector<double> & t = tab(kind);
    if (t.size() <= rows) t.resize(rows + 1, 0.0);
    const double x = static_cast<double>(std::max<uint64_t>(us, 1));
    t[rows]        = t[rows] == 0.0 ? x : (1.0 - kAlpha) * t[rows] + kAlpha * x;
}

void SpecPolicy::record_acceptance(uint32_t agreed, uint32_t observed) {
    for (uint32_t i = 0; i < observed; ++i) {  // one position at a time: agreed ones first, order is immaterial
        accept_n_ = std::min(accept_n_ + 1.0, kAcceptN);
        accept_ += ((i < agreed ? 1.0 : 0.0) - accept_) / accept_n_;
    }
}

bool SpecPolicy::measured(Pass kind, uint32_t rows) const {
    const std::vector<double> & t = tab(kind);
    return rows < t.size() && t[rows] > 0.0;
}

double SpecPolicy::pass_us(Pass kind, uint32_t rows) const {
    const std::vector<double> & t = tab(kind);
    if (measured(kind, rows)) return t[rows];
    // the nearest measured sizes below and above: linear between them; below the smallest, the
    // smallest's time (a pass never gets cheaper with more rows); above the largest, in proportion
    // to the rows (an upper bound: the head's weights are read once for all rows)
    uint32_t lo = 0, hi = 0;
    for (uint32_t r = std::min<uint32_t>(rows, static_cast<uint32_t>(t.size()) - 1); r > 0 && t.size() > 1; --r) {
        if (t[r] > 0.0) { lo = r; break; }
    }
    for (uint32_t r = rows + 1; r < t.size(); ++r) {
        if (t[r] > 0.0) { hi = r; break; }
    }
    if (lo > 0 && hi > 0) return t[lo] + (t[hi] - t[lo]) * (rows - lo) / static_cast<double>(hi - lo);
    if (hi > 0) return t[hi];
    if (lo > 0) return t[lo] * rows / static_cast<double>(lo);
    return 0.0;
}

std::vector<std::pair<uint32_t, double>> SpecPolicy::table(Pass kind) const {
    std::vector<std::pair<uint32_t, double>> out;
    const std::vector<double> &              t = tab(kind);
    for (uint32_t r = 1; r < t.size(); ++r) {
        if (t[r] > 0.0) out.emplace_back(r, t[r]);
    }
    return out;
}

double SpecPolicy::expected_tokens(double a, uint32_t k) {
    if (k == 0) return 0.0;
    if (a >= 1.0) return k;
    return (1.0 - std::pow(a, static_cast<double>(k))) / (1.0 - a);
}

SpecPolicy::Choice SpecPolicy::choose(const std::vector<uint32_t> & ks) {
    const uint32_t n = static_cast<uint32_t>(ks.size());
    if (last_.size() <= n) {
        last_.resize(n + 1);
        since_other_.resize(n + 1, 0);
    }
    const uint32_t kmax = ks.empty() ? 0 : *std::max_element(ks.begin(), ks.end());
    Choice         c;
    c.cap = kmax;
    const bool predictable = !ks.empty() && accept_n_ > 0.0 && !draft_.empty() && !verify_.empty() && !plain_.empty();
    if (predictable) {
        c.plain_us_per_token = pass_us(Pass::Plain, n) / n;
        double best = 0.0;
        for (uint32_t cap = 1; cap <= kmax; ++cap) {
            double   us     = 0.0, tokens = 0.0;
            uint32_t m      = 0;
            for (uint32_t i = 0; i < cap; ++i) {  // draft pass i runs the sequences still drafting
                uint32_t n_i = 0;
                for (uint32_t k : ks) n_i += std::min(k, cap) > i ? 1 : 0;
                if (n_i > 0) us += pass_us(Pass::Draft, n_i);
            }
            for (uint32_t k : ks) {
                m += std::min(k, cap);
                tokens += expected_tokens(accept_, std::min(k, cap));
            }
            us += pass_us(Pass::Verify, m);
            const double per = us / tokens;
            if (best == 0.0 || per < best) {
                best  = per;
                c.cap = cap;
            }
        }
        c.spec_us_per_token = best;
    }
    if (!ks.empty() && (!measured(Pass::Draft, n) || verify_.empty() || accept_n_ == 0.0)) {
        c.spec = true;  // measure drafting at this size first, with the sequences' own lengths
        c.cap  = kmax;
        c.why  = "explore";
    } else if (!measured(Pass::Plain, n)) {
        c.spec = false;  // then a plain step
        c.why  = "explore";
    } else {
        c.spec = predictable && c.spec_us_per_token < c.plain_us_per_token;
        c.why  = "model";
        if (++since_other_[n] >= kRefresh) {  // now and then the other kind, so its times stay current
            since_other_[n] = 0;
            c.spec          = !c.spec;
            c.why           = "refresh";
        }
    }
    if (c.spec && std::string_view(c.why) != "model") c.cap = kmax;
    last_[n] = c;
    return c;
}

}  // namespace appliance

#include "spec_policy.h"

namespace appliance {

SpecPolicy::Bucket & SpecPolicy::bucket(uint32_t n_seqs) {
    if (buckets_.size() <= n_seqs) buckets_.resize(n_seqs + 1);
    return buckets_[n_seqs];
}

bool SpecPolicy::use_spec(uint32_t n_seqs) {
    Bucket & b = bucket(n_seqs);
    if (b.spec_us == 0.0) return true;    // measure speculation first
    if (b.plain_us == 0.0) return false;  // then plain decoding
    const bool faster = b.spec_us <= b.plain_us;
    if (++b.since_probe >= kProbeEvery) {  // now and then run the slower kind, in case things changed
        b.since_probe = 0;
        return !faster;
    }
    return faster;
}

void SpecPolicy::record(bool spec, uint32_t n_seqs, uint64_t us, uint32_t n_tokens) {
    if (n_tokens == 0) return;
    Bucket &     b    = bucket(n_seqs);
    double &     ema  = spec ? b.spec_us : b.plain_us;
    const double cost = static_cast<double>(us) / n_tokens;
    ema               = ema == 0.0 ? cost : (1.0 - kAlpha) * ema + kAlpha * cost;
}

double SpecPolicy::us_per_token(bool spec, uint32_t n_seqs) const {
    if (n_seqs >= buckets_.size()) return 0.0;
    return spec ? buckets_[n_seqs].spec_us : buckets_[n_seqs].plain_us;
}

}  // namespace appliance

// Whether self-speculative decoding pays at the current batch size. Speculation stops paying once
// the batch is full (llama.cpp measured lookup decoding at 0.86x with 4 slots): rather than guess,
// the engine measures the time per emitted token of drafting and plain decode steps at each number
// of decoding sequences and picks the faster, probing the slower one now and then (rarely enough
// that a probe, a whole drafting round, costs a few percent).
#pragma once

#include <cstdint>
#include <vector>

namespace appliance {

class SpecPolicy {
public:
    // Speculate in a step that decodes n_seqs sequences?
    bool use_spec(uint32_t n_seqs);
    // A decode step of n_seqs sequences took `us` microseconds and emitted n_tokens tokens.
    void record(bool spec, uint32_t n_seqs, uint64_t us, uint32_t n_tokens);

    // the measured microseconds per emitted token (0 while unmeasured)
    double us_per_token(bool spec, uint32_t n_seqs) const;

private:
    struct Bucket {
        double   spec_us  = 0.0;  // EMA of microseconds per emitted token
        double   plain_us = 0.0;
        uint32_t since_probe = 0;  // decisions since the slower kind last ran
    };
    Bucket & bucket(uint32_t n_seqs);

    static constexpr double   kAlpha      = 0.2;  // EMA weight of a new measurement
    static constexpr uint32_t kProbeEvery = 128;  // steps between probes of the slower kind
    std::vector<Bucket>       buckets_;
};

}  // namespace appliance

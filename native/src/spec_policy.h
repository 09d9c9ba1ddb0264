// Whether self-speculative decoding pays in a step, and how far to draft. Decided from a cost model
// over what the engine measures pass by pass, not from noisy end-to-end step times:
//   - the time of a draft pass, a plain (full-depth, full-head) pass and a verification pass, each
//     an EWMA per number of rows (sequences for drafts and plain passes, drafted positions for a
//     verification), interpolated between measured sizes;
//   - the draft's per-position acceptance rate a (an EWMA over positions; with the default draft,
//     the whole network and the shortlisted head, plain steps measure it too: the shortlist's best
//     token in the full head's row against the token sampled).
// A round that drafts k positions of a sequence emits (1 - a^k) / (1 - a) tokens of it on average
// (the accepted run, then the full model's own token). For the step's sequences and their planned
// draft lengths, each cap c on the draft length gives
//   spec(c)  = (sum_i draft(n_i) + verify(sum_j min(k_j, c))) / sum_j E(a, min(k_j, c))  per token,
// n_i being the sequences still drafting at position i, against plain = plain(n) / n; the step
// drafts, up to the best cap, only where that predicts it faster. A size never measured is
// measured first (one step of each kind), and every kRefresh decisions at a size the kind not
// chosen runs once, so the tables follow the machine's load.
#pragma once

#include <cstdint>
#include <vector>

namespace appliance {

class SpecPolicy {
public:
    enum class Pass { Draft, Verify, Plain };

    struct Choice {
        bool     spec = false;
        uint32_t cap  = 0;             // most positions a sequence drafts this step (spec only)
        double   spec_us_per_token  = 0.0;  // predicted, at the best cap (0: not predictable yet)
        double   plain_us_per_token = 0.0;
        const char * why = "";         // "model", "explore" or "refresh"
    };

    // A step of ks.size() sequences whose own draft lengths are ks (each >= 1).
    Choice choose(const std::vector<uint32_t> & ks);
    // A forward pass of `kind` over `rows` rows took `us` microseconds.
    void record_pass(Pass kind, uint32_t rows, uint64_t us);
    // `agreed` of `observed` drafted (or would-be drafted) positions matched the full model.
    void record_acceptance(uint32_t agreed, uint32_t observed);

    // measured (or interpolated) microseconds of a pass over `rows` rows; 0 while nothing is measured
    double pass_us(Pass kind, uint32_t rows) const;
    bool   measured(Pass kind, uint32_t rows) const;  // that exact size has a measurement
    double acceptance() const { return accept_n_ > 0.0 ? accept_ : 0.0; }
    double acceptance_observations() const { return accept_n_; }

    // the last decision at each number of sequences (index n; spec false and cap 0 where none yet)
    const std::vector<Choice> & last_choices() const { return last_; }
    // the measured sizes of a kind and their times (microseconds), ascending by size
    std::vector<std::pair<uint32_t, double>> table(Pass kind) const;

    // expected tokens emitted by a round that drafts k positions at acceptance a
    static double expected_tokens(double a, uint32_t k);

    static constexpr double   kAlpha   = 0.2;  // EWMA weight of a new pass time
    static constexpr double   kAcceptN = 256;  // acceptance: EWMA over about this many positions
    static constexpr uint32_t kRefresh = 64;   // decisions between runs of the kind not chosen

private:
    std::vector<double> & tab(Pass kind);
    const std::vector<double> & tab(Pass kind) const;

    std::vector<double>   draft_, verify_, plain_;  // EWMA microseconds by rows (0: unmeasured)
    double                accept_   = 0.0;
    double                accept_n_ = 0.0;  // positions observed, saturating at kAcceptN
    std::vector<Choice>   last_;
    std::vector<uint32_t> since_other_;  // decisions at each size since the other kind ran
};

}  // namespace appliance

// One token sequence with its own KV cache: the simple single-request interface (tests, the CLI,
// the reference comparisons). Many concurrent requests go through BatchEngine instead.
#pragma once

#include "model_runner.h"

#include <cstdint>
#include <vector>

namespace appliance {

struct Model;

struct ContextParams {
    uint32_t n_ctx     = 4096;  // KV cells = the longest sequence (prompt + generated tokens)
    uint32_t n_ubatch  = 512;   // most tokens per forward pass; longer prompts run in chunks
    int      n_threads = 2;     // CPU threads for the CPU backend
};

class Context {
public:
    // Throws InvalidArgument for bad params, RuntimeFailure when memory cannot be had.
    Context(const Model & model, const ContextParams & params);

    // Appends `n` tokens to the sequence (positions n_past() .. n_past()+n-1) and runs them.
    // all_logits: keep logits for every token; otherwise for the last one only.
    // Throws ContextOverflowError when the sequence would outgrow n_ctx, InvalidArgument for a token
    // outside the vocabulary. On error the sequence is left as it was.
    void decode(const int32_t * tokens, uint32_t n, bool all_logits);

    // Forgets positions >= n_keep (to reuse a common prompt prefix). Precondition: n_keep <= n_past().
    void truncate(uint32_t n_keep);

    // Early-exit calibration. For each token of `tokens` (run as a new sequence from position 0,
    // replacing the current one), what the shortlisted head would pick after each of `exit_layers`
    // (ascending, in [1, n_layer)) and with what confidence (its top softmax probability over the
    // shortlist), and what the full model picks. Outputs are [n], [n][n_exits], [n][n_exits].
    // Precondition: a shortlist is set. Throws InvalidArgument / ContextOverflowError.
    void probe_exits(const std::vector<int32_t> & tokens, const std::vector<uint32_t> & exit_layers,
                     std::vector<int32_t> & full_top, std::vector<int32_t> & exit_top, std::vector<float> & exit_conf);
    void set_shortlist(const std::vector<int32_t> & tokens) { runner_.set_shortlist(tokens); }
    // One pass of the given kind over `tokens` at positions n_past().., every token an output and
    // hidden rows 0..n-1, without advancing the sequence (costing the parts of early exit; tests).
    void run_pass(const std::vector<int32_t> & tokens, const PassSpec & pass);

    uint32_t n_past() const { return n_past_; }
    uint32_t n_ctx() const { return runner_.n_cells(); }
    uint32_t n_vocab() const;
    uint32_t n_layer() const;
    // logits of the i-th output of the last decode (i < n_outputs()), [n_vocab] floats
    const float * logits(uint32_t i) const;
    uint32_t      n_outputs() const { return n_outputs_; }

    int             n_threads() const { return runner_.n_threads(); }
    void            set_n_threads(int n_threads) { runner_.set_n_threads(n_threads); }
    size_t          kv_bytes() const { return runner_.kv_bytes(); }
    size_t          compute_bytes() const { return runner_.compute_bytes(); }
    const Timings & timings() const { return runner_.timings(); }

private:
    ModelRunner          runner_;
    uint32_t             n_ubatch_;
    std::vector<int32_t> blocks_{0};  // one block spanning the whole cache: position p lives in cell p
    uint32_t             n_past_ = 0;
    std::vector<float>   logits_;
    uint32_t             n_outputs_ = 0;
    Batch                batch_;
    std::vector<float>   chunk_logits_;
};

}  // namespace appliance

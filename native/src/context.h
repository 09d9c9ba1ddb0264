// Runs the model over one token sequence held in a KV cache: the model runner of the native core.
// v1 serves a single sequence whose positions map one-to-one onto KV cells.
#pragma once

#include "ggml-backend.h"
#include "graph.h"
#include "kv_cache.h"

#include <cstdint>
#include <memory>
#include <vector>

namespace appliance {

struct Model;

struct ContextParams {
    uint32_t n_ctx     = 4096;  // KV cells = the longest sequence (prompt + generated tokens)
    uint32_t n_ubatch  = 512;   // most tokens per forward pass; longer prompts run in chunks
    int      n_threads = 2;     // CPU threads for the CPU backend
};

// Where the time of forward passes went, cumulative since the context was made (microseconds).
struct Timings {
    uint64_t n_passes   = 0;
    uint64_t n_tokens   = 0;
    uint64_t build_us   = 0;  // graph construction and allocation
    uint64_t inputs_us  = 0;  // masks, positions, indices
    uint64_t compute_us = 0;  // ggml compute
    uint64_t output_us  = 0;  // copying logits out
};

class Context {
public:
    // Throws InvalidArgument for bad params, RuntimeFailure when memory cannot be had.
    Context(const Model & model, const ContextParams & params);
    ~Context();
    Context(const Context &) = delete;
    Context & operator=(const Context &) = delete;

    // Appends `n` tokens to the sequence (positions n_past() .. n_past()+n-1) and runs them.
    // all_logits: keep logits for every token; otherwise for the last one only.
    // Throws ContextOverflowError when the sequence would outgrow n_ctx, InvalidArgument for a token
    // outside the vocabulary. On error the sequence is left as it was.
    void decode(const int32_t * tokens, uint32_t n, bool all_logits);

    // Forgets positions >= n_keep (to reuse a common prompt prefix). Precondition: n_keep <= n_past().
    void truncate(uint32_t n_keep);

    uint32_t n_past() const { return n_past_; }
    uint32_t n_ctx() const { return params_.n_ctx; }
    uint32_t n_vocab() const;
    // logits of the i-th output of the last decode (i < n_outputs()), [n_vocab] floats
    const float * logits(uint32_t i) const;
    uint32_t n_outputs() const { return n_outputs_; }

    int    n_threads() const { return params_.n_threads; }
    void   set_n_threads(int n_threads);
    size_t kv_bytes() const { return kv_.bytes(); }
    const Timings & timings() const { return timings_; }
    size_t compute_bytes() const;

private:
    // A built and allocated graph with its input tensors. Kept between passes: a pass of the same
    // shape (every decode step until the attended cells pass the next multiple of 256) reuses it
    // and only refills the inputs.
    struct BuiltGraph {
        ggml_context * ctx = nullptr;
        ggml_cgraph *  gf  = nullptr;
        UBatchShape    shape;
        ggml_tensor *  tokens = nullptr, *pos = nullptr, *kv_idx = nullptr, *mask = nullptr, *mask_swa = nullptr,
                    *out_ids = nullptr, *logits = nullptr;
        ~BuiltGraph();
    };
    std::unique_ptr<BuiltGraph> build(const UBatchShape & shape);

    // one forward pass over tokens[0..n) at positions pos0.., writing output logits into out
    void run_ubatch(const int32_t * tokens, uint32_t pos0, uint32_t n, bool all_logits, float * out);

    const Model &         model_;
    ContextParams         params_;
    KvStorage             kv_;
    KvCells               cells_;
    uint32_t              n_past_ = 0;
    ggml_backend_t        backend_cpu_ = nullptr;
    ggml_backend_t        backend_dev_ = nullptr;  // GPU backend, when the model lives there
    ggml_backend_sched_t  sched_       = nullptr;
    size_t                max_nodes_;
    std::vector<uint8_t>  graph_mem_;
    std::unique_ptr<BuiltGraph> graph_;  // the last allocated graph
    std::vector<float>    logits_;
    uint32_t              n_outputs_ = 0;
    Timings               timings_;
};

}  // namespace appliance

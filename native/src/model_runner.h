// Runs forward passes of a model over batches of tokens from any number of sequences, against one
// paged KV cache: builds (or reuses) the graph, fills its inputs, computes, returns logits.
#pragma once

#include "batch.h"
#include "ggml-backend.h"
#include "graph.h"
#include "kv_cache.h"

#include <cstdint>
#include <memory>
#include <vector>

namespace appliance {

struct Model;

// Where the time of forward passes went, cumulative (microseconds).
struct Timings {
    uint64_t n_passes   = 0;
    uint64_t n_tokens   = 0;
    uint64_t build_us   = 0;  // graph construction and allocation
    uint64_t inputs_us  = 0;  // masks, positions, indices
    uint64_t compute_us = 0;  // ggml compute
    uint64_t output_us  = 0;  // copying logits out
};

class ModelRunner {
public:
    // n_cells: KV cache size in tokens; max_tokens: the largest batch run() accepts.
    // Throws InvalidArgument for bad sizes, RuntimeFailure when memory cannot be had.
    ModelRunner(const Model & model, uint32_t n_cells, uint32_t max_tokens, int n_threads);
    ~ModelRunner();
    ModelRunner(const ModelRunner &) = delete;
    ModelRunner & operator=(const ModelRunner &) = delete;

    // One forward pass. Writes K/V of every batch token into its cell, attends each token to the
    // cells of positions 0..pos of its own sequence (within the window on sliding layers) and stores
    // logits of batch.out_ids in `logits` ([out_ids.size()][n_vocab]).
    // Preconditions: 0 < batch.size() <= max_tokens, !out_ids.empty(), every cell < n_cells.
    void run(const Batch & batch, std::vector<float> & logits);

    uint32_t        n_cells() const { return kv_.n_cells(); }
    uint32_t        max_tokens() const { return max_tokens_; }
    int             n_threads() const { return n_threads_; }
    void            set_n_threads(int n_threads);
    size_t          kv_bytes() const { return kv_.bytes(); }
    size_t          compute_bytes() const;
    const Timings & timings() const { return timings_; }
    const Model &   model() const { return model_; }
    const KvStorage & kv() const { return kv_; }

private:
    // A built and allocated graph with its input tensors. Kept between passes: a pass of the same
    // shape (most decode steps) reuses it and only refills the inputs.
    struct BuiltGraph {
        ggml_context * ctx = nullptr;
        ggml_cgraph *  gf  = nullptr;
        UBatchShape    shape;
        ggml_tensor *  tokens = nullptr, *pos = nullptr, *kv_idx = nullptr, *mask = nullptr, *mask_swa = nullptr,
                    *out_ids = nullptr, *logits = nullptr;
        ~BuiltGraph();
    };
    std::unique_ptr<BuiltGraph> build(const UBatchShape & shape);

    const Model &               model_;
    KvStorage                   kv_;
    uint32_t                    max_tokens_;
    int                         n_threads_;
    ggml_backend_t              backend_cpu_ = nullptr;
    ggml_backend_t              backend_dev_ = nullptr;  // GPU backend, when the model lives there
    ggml_backend_sched_t        sched_       = nullptr;
    size_t                      max_nodes_;
    std::vector<uint8_t>        graph_mem_;
    std::unique_ptr<BuiltGraph> graph_;  // the last allocated graph
    Timings                     timings_;
    // scratch, reused across passes
    std::vector<ggml_fp16_t> mask_, mask_swa_;
    std::vector<int64_t>     cells_;
};

}  // namespace appliance

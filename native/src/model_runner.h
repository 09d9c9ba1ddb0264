// Runs forward passes of a model over batches of tokens from any number of sequences, against one
// paged KV cache: builds (or reuses) the graph, fills its inputs, computes, returns logits.
#pragma once

#include "attn_span.h"
#include "batch.h"
#include "ggml-backend.h"
#include "graph.h"
#include "kv_cache.h"
#include "lora_bank.h"
#include "shortlist.h"

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
    uint64_t n_gathered = 0;  // passes whose attention gathered a pool's cells (AttnSpan)
};

class ModelRunner {
public:
    // n_cells: KV cache size in tokens (n_cells_swa: of the sliding-window layers' pool, used only
    // when the model has such layers); max_tokens: the largest batch run() accepts.
    // Throws InvalidArgument for bad sizes, RuntimeFailure when memory cannot be had.
    ModelRunner(const Model & model, uint32_t n_cells, uint32_t n_cells_swa, uint32_t max_tokens, int n_threads);
    ~ModelRunner();
    ModelRunner(const ModelRunner &) = delete;
    ModelRunner & operator=(const ModelRunner &) = delete;

    // One forward pass. Writes K/V of every batch token into its cell, attends each token to the
    // cells of positions 0..pos of its own sequence (within the window on sliding layers) and stores
    // logits of batch.out_ids in `logits` ([out_ids.size()][n_vocab], or [n_short] per output for
    // the shortlist head; nothing for Head::None).
    // A partial pass (early exit) reads or keeps hidden states in rows batch.hidden_rows of the
    // runner's hidden store.
    // Each token's sequence view names its LoRA bank slot (0: no adapter).
    // Preconditions: 0 < batch.size() <= max_tokens, !out_ids.empty(), every cell < n_cells (the
    // sliding-window table covers each token's window, within n_cells_swa); for a
    // partial pass every token is an output and has a hidden row < n_hidden_rows(); a shortlist head
    // needs set_shortlist() first.
    void run(const Batch & batch, std::vector<float> & logits, const PassSpec & pass = PassSpec{});

    // LoRA adapters: uploads one into the bank (returns its slot, >= 1) or frees a slot. Graphs built
    // against stacks the bank reallocated are dropped. Throws RuntimeFailure when memory runs out.
    // Precondition of remove_adapter: no batch run from now on names the slot.
    int32_t           add_adapter(const LoraAdapter & ad);
    void              remove_adapter(int32_t slot);
    const LoraBank &  lora() const { return lora_; }

    // The shortlisted head early exit uses (replaces any earlier one). Throws InvalidArgument.
    void              set_shortlist(const std::vector<int32_t> & tokens);
    const Shortlist * shortlist() const { return shortlist_.get(); }
    uint32_t          n_hidden_rows() const { return max_tokens_; }

    uint32_t        n_cells() const { return kv_.n_cells(); }
    uint32_t        max_tokens() const { return max_tokens_; }
    int             n_threads() const { return n_threads_; }
    void            set_n_threads(int n_threads);
    size_t          kv_bytes() const { return kv_.bytes(); }
    size_t          compute_bytes() const;
    const Timings & timings() const { return timings_; }
    // whether attention gathers the cells it reads (AttnSpan): by cost, or forced (tests, measurements)
    void            set_gather(GatherPolicy p) { gather_ = p; }
    const Model &   model() const { return model_; }
    const KvStorage & kv() const { return kv_; }

private:
    // A built and allocated graph with its input tensors. Kept between passes: a pass of the same
    // shape (most decode steps) reuses it and only refills the inputs.
    struct BuiltGraph {
        ggml_context * ctx = nullptr;
        ggml_cgraph *  gf  = nullptr;
        UBatchShape    shape;
        ggml_tensor *  tokens = nullptr, *pos = nullptr, *kv_idx = nullptr, *kv_idx_swa = nullptr, *kv_rows = nullptr, *kv_rows_swa = nullptr, *mask = nullptr, *mask_swa = nullptr,
                    *out_ids = nullptr, *rows_get = nullptr, *rows_set = nullptr, *lora_ids = nullptr,
                    *lora_ids_out = nullptr, *lora_scale = nullptr, *lora_scale_out = nullptr, *logits = nullptr;
        ~BuiltGraph();
    };
    // One kind of pass (PassSpec) and its last graph, with its own scheduler and compute buffers,
    // so alternating kinds (a draft, then a verification) do not rebuild each other's graphs.
    struct Slot {
        PassSpec                    pass;
        ggml_backend_sched_t        sched = nullptr;
        std::vector<uint8_t>        graph_mem;
        std::unique_ptr<BuiltGraph> graph;
        ~Slot();
    };
    Slot &                      slot_for(const PassSpec & pass);
    std::unique_ptr<BuiltGraph> build(Slot & slot, const UBatchShape & shape);
    void                        drop_graphs();  // after the bank reallocated its stacks

    const Model &               model_;
    KvStorage                   kv_;
    uint32_t                    max_tokens_;
    int                         n_threads_;
    ggml_backend_t              backend_cpu_ = nullptr;
    ggml_backend_t              backend_dev_ = nullptr;  // GPU backend, when the model lives there
    std::vector<ggml_backend_t> backends_;
    size_t                      max_nodes_;
    std::vector<std::unique_ptr<Slot>> slots_;  // slots_[0]: the full pass
    std::unique_ptr<Shortlist>  shortlist_;
    LoraBank                    lora_;
    ggml_context *              hidden_ctx_ = nullptr;
    ggml_backend_buffer_t       hidden_buf_ = nullptr;
    ggml_tensor *               hidden_     = nullptr;  // [n_embd, max_tokens] F32
    Timings                     timings_;
    // scratch, reused across passes
    std::vector<ggml_fp16_t> mask_, mask_swa_;
    std::vector<int64_t>     cells_, cells_swa_, rows64_;
    std::vector<int32_t>     lora_ids_, lora_ids_out_;
    std::vector<float>       lora_scale_, lora_scale_out_;
    AttnSpan                 span_, span_swa_;
    GatherPolicy             gather_ = GatherPolicy::Auto;
};

}  // namespace appliance

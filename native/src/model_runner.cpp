#include "model_runner.h"

#include "arch/arch.h"
#include "error.h"
#include "model.h"

#include "cpu_backend.h"

#include <algorithm>
#include <chrono>
#include <cmath>

namespace appliance {

namespace {

// attention looks at a multiple of this many cells, so the graph keeps its shape across steps
constexpr uint32_t kKvPad = 256;

uint64_t now_us() {
    return static_cast<uint64_t>(
        std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now().time_since_epoch()).count());
}

}  // namespace

ModelRunner::ModelRunner(const Model & model, uint32_t n_cells, uint32_t max_tokens, int n_threads)
    : model_(model), kv_(model, std::max<uint32_t>(n_cells, 1)), max_tokens_(std::min(max_tokens, n_cells)), n_threads_(n_threads) {
    APPL_REQUIRE(n_cells > 0, InvalidArgument, "the KV cache needs at least one cell");
    APPL_REQUIRE(max_tokens > 0, InvalidArgument, "batch size must be positive");
    APPL_REQUIRE(n_threads > 0, InvalidArgument, "n_threads must be positive, got " + std::to_string(n_threads));

    ggml_backend_dev_t cpu_dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
    backend_cpu_ = ggml_backend_dev_init(cpu_dev, nullptr);
    if (backend_cpu_ == nullptr) {
        throw RuntimeFailure("cannot initialise the CPU backend");
    }
    cpu_set_n_threads(backend_cpu_, n_threads_);

    std::vector<ggml_backend_t> backends;
    if (model.device != cpu_dev) {
        backend_dev_ = ggml_backend_dev_init(model.device, nullptr);
        if (backend_dev_ == nullptr) {
            ggml_backend_free(backend_cpu_);
            throw RuntimeFailure(std::string("cannot initialise device ") + ggml_backend_dev_name(model.device));
        }
        backends.push_back(backend_dev_);
    }
    backends.push_back(backend_cpu_);

    max_nodes_ = std::max<size_t>(2048, 16 * static_cast<size_t>(model.file->n_tensors()));
    graph_mem_.resize(ggml_tensor_overhead() * max_nodes_ + ggml_graph_overhead_custom(max_nodes_, false));
    sched_ = ggml_backend_sched_new(backends.data(), nullptr, static_cast<int>(backends.size()), max_nodes_,
                                    /*parallel=*/false, /*op_offload=*/true);

    // reserve compute memory for the largest ordinary pass (a full batch over the whole cache), so
    // running out of memory shows here rather than mid-request
    std::unique_ptr<BuiltGraph> worst = build(UBatchShape{max_tokens_, 1, kv_.n_cells()});
    if (!ggml_backend_sched_reserve(sched_, worst->gf)) {
        worst.reset();
        ggml_backend_sched_free(sched_);
        ggml_backend_free(backend_cpu_);
        if (backend_dev_) ggml_backend_free(backend_dev_);
        throw RuntimeFailure("cannot reserve compute memory for a KV cache of " + std::to_string(n_cells) + " cells");
    }
}

ModelRunner::BuiltGraph::~BuiltGraph() { ggml_free(ctx); }

std::unique_ptr<ModelRunner::BuiltGraph> ModelRunner::build(const UBatchShape & shape) {
    graph_.reset();  // shares graph_mem_
    auto bg = std::make_unique<BuiltGraph>();
    ggml_init_params p = {graph_mem_.size(), graph_mem_.data(), /*no_alloc=*/true};
    bg->ctx   = ggml_init(p);
    bg->gf    = ggml_new_graph_custom(bg->ctx, max_nodes_, false);
    bg->shape = shape;
    GraphBuilder g(bg->ctx, bg->gf, model_, kv_, shape);
    bg->logits = model_.spec->build_graph(g);  // [n_vocab, n_outputs]
    ggml_build_forward_expand(bg->gf, bg->logits);
    bg->tokens   = g.inp_tokens;
    bg->pos      = g.inp_pos;
    bg->kv_idx   = g.inp_kv_idx;
    bg->mask     = g.inp_mask;
    bg->mask_swa = g.inp_mask_swa;
    bg->out_ids  = g.inp_out_ids;
    return bg;
}

ModelRunner::~ModelRunner() {
    graph_.reset();
    ggml_backend_sched_free(sched_);
    if (backend_dev_) ggml_backend_free(backend_dev_);
    ggml_backend_free(backend_cpu_);
}

size_t ModelRunner::compute_bytes() const {
    size_t total = 0;
    for (int i = 0; i < ggml_backend_sched_get_n_backends(sched_); ++i) {
        total += ggml_backend_sched_get_buffer_size(sched_, ggml_backend_sched_get_backend(sched_, i));
    }
    return total;
}

void ModelRunner::set_n_threads(int n_threads) {
    APPL_REQUIRE(n_threads > 0, InvalidArgument, "n_threads must be positive, got " + std::to_string(n_threads));
    n_threads_ = n_threads;
    cpu_set_n_threads(backend_cpu_, n_threads);
}

void ModelRunner::run(const Batch & batch, std::vector<float> & logits) {
    const HParams & hp        = model_.hp;
    const uint32_t  n         = batch.size();
    const uint32_t  n_outputs = static_cast<uint32_t>(batch.out_ids.size());
    GGML_ASSERT(n > 0 && n <= max_tokens_ && n_outputs > 0);

    // the cell of every token, and how far attention has to look
    cells_.resize(n);
    int64_t max_cell = 0;
    for (uint32_t i = 0; i < n; ++i) {
        const SeqView & v = batch.views[batch.seq[i]];
        cells_[i]         = v.cell(batch.pos[i]);
        GGML_ASSERT(cells_[i] >= 0 && cells_[i] < kv_.n_cells());
        const int32_t bs = static_cast<int32_t>(v.block_size);
        for (int32_t p = 0; p <= batch.pos[i]; p += bs) {  // the last cell it sees in each block
            max_cell = std::max(max_cell, v.cell(std::min(p + bs - 1, batch.pos[i])));
        }
    }
    const uint32_t n_kv = std::min(kv_.n_cells(), std::max(kKvPad, GGML_PAD(static_cast<uint32_t>(max_cell + 1), kKvPad)));

    const uint64_t    t0 = now_us();
    const UBatchShape shape{n, n_outputs, n_kv};
    if (!graph_ || !(graph_->shape == shape)) {
        graph_ = build(shape);
        ggml_backend_sched_reset(sched_);
        if (!ggml_backend_sched_alloc_graph(sched_, graph_->gf)) {
            graph_.reset();
            throw RuntimeFailure("cannot allocate the compute graph");
        }
    }
    const BuiltGraph & g  = *graph_;
    const uint64_t     t1 = now_us();

    ggml_backend_tensor_set(g.tokens, batch.tokens.data(), 0, n * sizeof(int32_t));
    ggml_backend_tensor_set(g.pos, batch.pos.data(), 0, n * sizeof(int32_t));
    ggml_backend_tensor_set(g.kv_idx, cells_.data(), 0, n * sizeof(int64_t));

    // masks: a token sees the cells of positions 0..pos of its own sequence (the last n_swa of
    // them on sliding-window layers); everything else is -inf
    const ggml_fp16_t keep = ggml_fp32_to_fp16(0.0f);
    const ggml_fp16_t drop = ggml_fp32_to_fp16(-INFINITY);
    mask_.assign(static_cast<size_t>(n_kv) * n, drop);
    mask_swa_.assign(g.mask_swa ? mask_.size() : 0, drop);
    for (uint32_t i = 0; i < n; ++i) {
        const SeqView & v   = batch.views[batch.seq[i]];
        const int32_t   p1  = batch.pos[i];
        ggml_fp16_t *   row = mask_.data() + static_cast<size_t>(i) * n_kv;
        for (int32_t p0 = 0; p0 <= p1; ++p0) {
            row[v.cell(p0)] = keep;
        }
        if (g.mask_swa) {
            ggml_fp16_t * row_swa = mask_swa_.data() + static_cast<size_t>(i) * n_kv;
            for (int32_t p0 = std::max<int32_t>(0, p1 - static_cast<int32_t>(hp.n_swa) + 1); p0 <= p1; ++p0) {
                row_swa[v.cell(p0)] = keep;
            }
        }
    }
    ggml_backend_tensor_set(g.mask, mask_.data(), 0, mask_.size() * sizeof(ggml_fp16_t));
    if (g.mask_swa) {
        ggml_backend_tensor_set(g.mask_swa, mask_swa_.data(), 0, mask_swa_.size() * sizeof(ggml_fp16_t));
    }
    if (g.out_ids) {
        ggml_backend_tensor_set(g.out_ids, batch.out_ids.data(), 0, n_outputs * sizeof(int32_t));
    } else {
        for (uint32_t i = 0; i < n_outputs; ++i) GGML_ASSERT(batch.out_ids[i] == static_cast<int32_t>(i));
    }

    const uint64_t t2 = now_us();
    if (ggml_backend_sched_graph_compute(sched_, g.gf) != GGML_STATUS_SUCCESS) {
        graph_.reset();
        throw RuntimeFailure("graph compute failed");
    }
    const uint64_t t3 = now_us();
    logits.resize(static_cast<size_t>(n_outputs) * hp.n_vocab);
    ggml_backend_tensor_get(g.logits, logits.data(), 0, logits.size() * sizeof(float));
    const uint64_t t4 = now_us();

    timings_.n_passes += 1;
    timings_.n_tokens += n;
    timings_.build_us += t1 - t0;
    timings_.inputs_us += t2 - t1;
    timings_.compute_us += t3 - t2;
    timings_.output_us += t4 - t3;
}

}  // namespace appliance

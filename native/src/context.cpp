#include "context.h"

#include "arch/arch.h"
#include "error.h"
#include "graph.h"
#include "model.h"

#include "ggml-cpu.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>

namespace appliance {

namespace {

// attention looks at a multiple of this many cells, so the graph keeps its shape across steps
constexpr uint32_t kKvPad = 256;

uint64_t now_us() {
    return static_cast<uint64_t>(
        std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now().time_since_epoch()).count());
}

}  // namespace

Context::Context(const Model & model, const ContextParams & params)
    : model_(model), params_(params), kv_(model, std::max<uint32_t>(params.n_ctx, 1)), cells_(kv_.n_cells()) {
    APPL_REQUIRE(params.n_ctx > 0, InvalidArgument, "n_ctx must be positive");
    APPL_REQUIRE(params.n_ubatch > 0, InvalidArgument, "n_ubatch must be positive");
    APPL_REQUIRE(params.n_threads > 0, InvalidArgument, "n_threads must be positive, got " + std::to_string(params.n_threads));
    params_.n_ubatch = std::min(params_.n_ubatch, params_.n_ctx);

    ggml_backend_dev_t cpu_dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
    backend_cpu_ = ggml_backend_dev_init(cpu_dev, nullptr);
    if (backend_cpu_ == nullptr) {
        throw RuntimeFailure("cannot initialise the CPU backend");
    }
    ggml_backend_cpu_set_n_threads(backend_cpu_, params_.n_threads);

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

    // reserve compute memory for the largest ordinary step (a full prompt chunk over the whole
    // cache), so running out of memory shows here rather than mid-request
    std::unique_ptr<BuiltGraph> worst = build(UBatchShape{params_.n_ubatch, 1, kv_.n_cells()});
    if (!ggml_backend_sched_reserve(sched_, worst->gf)) {
        ggml_backend_sched_free(sched_);
        ggml_backend_free(backend_cpu_);
        if (backend_dev_) ggml_backend_free(backend_dev_);
        throw RuntimeFailure("cannot reserve compute memory for n_ctx=" + std::to_string(params_.n_ctx));
    }
}

Context::BuiltGraph::~BuiltGraph() { ggml_free(ctx); }

std::unique_ptr<Context::BuiltGraph> Context::build(const UBatchShape & shape) {
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

Context::~Context() {
    graph_.reset();
    ggml_backend_sched_free(sched_);
    if (backend_dev_) ggml_backend_free(backend_dev_);
    ggml_backend_free(backend_cpu_);
}

uint32_t Context::n_vocab() const { return model_.hp.n_vocab; }

size_t Context::compute_bytes() const {
    size_t total = 0;
    for (int i = 0; i < ggml_backend_sched_get_n_backends(sched_); ++i) {
        total += ggml_backend_sched_get_buffer_size(sched_, ggml_backend_sched_get_backend(sched_, i));
    }
    return total;
}

void Context::set_n_threads(int n_threads) {
    APPL_REQUIRE(n_threads > 0, InvalidArgument, "n_threads must be positive, got " + std::to_string(n_threads));
    params_.n_threads = n_threads;
    ggml_backend_cpu_set_n_threads(backend_cpu_, n_threads);
}

const float * Context::logits(uint32_t i) const {
    APPL_REQUIRE(i < n_outputs_, InvalidArgument, "output index " + std::to_string(i) + " out of range");
    return logits_.data() + static_cast<size_t>(i) * model_.hp.n_vocab;
}

void Context::truncate(uint32_t n_keep) {
    APPL_REQUIRE(n_keep <= n_past_, InvalidArgument, "truncate beyond the end of the sequence");
    for (uint32_t c = n_keep; c < n_past_; ++c) {
        cells_.free(c);
    }
    n_past_ = n_keep;
}

void Context::decode(const int32_t * tokens, uint32_t n, bool all_logits) {
    APPL_REQUIRE(n > 0, InvalidArgument, "decode needs at least one token");
    if (static_cast<uint64_t>(n_past_) + n > params_.n_ctx) {
        throw ContextOverflowError("sequence of " + std::to_string(n_past_ + static_cast<uint64_t>(n)) +
                                   " tokens does not fit the context of " + std::to_string(params_.n_ctx) + " tokens");
    }
    const int32_t n_vocab = static_cast<int32_t>(model_.hp.n_vocab);
    for (uint32_t i = 0; i < n; ++i) {
        if (tokens[i] < 0 || tokens[i] >= n_vocab) {
            throw InvalidArgument("token id " + std::to_string(tokens[i]) + " at index " + std::to_string(i) +
                                  " is outside the vocabulary of " + std::to_string(n_vocab));
        }
    }

    const uint32_t n_out = all_logits ? n : 1;
    logits_.resize(static_cast<size_t>(n_out) * model_.hp.n_vocab);
    n_outputs_ = 0;
    const uint32_t start = n_past_;
    try {
        for (uint32_t off = 0; off < n; off += params_.n_ubatch) {
            const uint32_t len  = std::min(params_.n_ubatch, n - off);
            const bool     last = off + len == n;
            if (!all_logits && !last) {
                run_ubatch(tokens + off, n_past_, len, false, nullptr);
            } else {
                float * out = logits_.data() + static_cast<size_t>(all_logits ? off : 0) * model_.hp.n_vocab;
                run_ubatch(tokens + off, n_past_, len, all_logits, out);
            }
            n_past_ += len;
        }
    } catch (...) {
        for (uint32_t c = start; c < start + n; ++c) {  // cells of the failed ubatch too
            cells_.free(c);
        }
        n_past_ = start;
        throw;
    }
    n_outputs_ = n_out;
}

void Context::run_ubatch(const int32_t * tokens, uint32_t pos0, uint32_t n, bool all_logits, float * out) {
    const HParams & hp = model_.hp;

    // bookkeeping first: the graph writes these cells before attention reads them
    for (uint32_t i = 0; i < n; ++i) {
        cells_.set(pos0 + i, static_cast<int32_t>(pos0 + i), 0);
    }
    const uint32_t n_kv = std::min(kv_.n_cells(), std::max(kKvPad, GGML_PAD(cells_.used_end(), kKvPad)));
    const uint32_t n_outputs = all_logits ? n : 1;

    const uint64_t t0 = now_us();
    const UBatchShape shape{n, n_outputs, n_kv};
    if (!graph_ || !(graph_->shape == shape)) {
        graph_ = build(shape);
        ggml_backend_sched_reset(sched_);
        if (!ggml_backend_sched_alloc_graph(sched_, graph_->gf)) {
            graph_.reset();
            throw RuntimeFailure("cannot allocate the compute graph");
        }
    }
    const BuiltGraph & g = *graph_;
    const uint64_t t1 = now_us();

    // inputs
    std::vector<int32_t> pos(n);
    std::vector<int64_t> idx(n);
    for (uint32_t i = 0; i < n; ++i) {
        pos[i] = static_cast<int32_t>(pos0 + i);
        idx[i] = pos0 + i;
    }
    ggml_backend_tensor_set(g.tokens, tokens, 0, n * sizeof(int32_t));
    ggml_backend_tensor_set(g.pos, pos.data(), 0, n * sizeof(int32_t));
    ggml_backend_tensor_set(g.kv_idx, idx.data(), 0, n * sizeof(int64_t));

    const ggml_fp16_t keep = ggml_fp32_to_fp16(0.0f);
    const ggml_fp16_t drop = ggml_fp32_to_fp16(-INFINITY);
    std::vector<ggml_fp16_t> mask(static_cast<size_t>(n_kv) * n);
    std::vector<ggml_fp16_t> mask_swa(g.mask_swa ? mask.size() : 0);
    for (uint32_t i = 0; i < n; ++i) {
        const int32_t p1 = pos[i];
        for (uint32_t c = 0; c < n_kv; ++c) {
            const int32_t p0      = cells_.pos(c);
            const bool    visible = !cells_.empty(c) && cells_.seq(c) == 0 && p0 <= p1;
            mask[static_cast<size_t>(i) * n_kv + c] = visible ? keep : drop;
            if (!mask_swa.empty()) {
                const bool in_window = visible && static_cast<uint32_t>(p1 - p0) < hp.n_swa;
                mask_swa[static_cast<size_t>(i) * n_kv + c] = in_window ? keep : drop;
            }
        }
    }
    ggml_backend_tensor_set(g.mask, mask.data(), 0, mask.size() * sizeof(ggml_fp16_t));
    if (g.mask_swa) {
        ggml_backend_tensor_set(g.mask_swa, mask_swa.data(), 0, mask_swa.size() * sizeof(ggml_fp16_t));
    }
    if (g.out_ids) {
        const int32_t last = static_cast<int32_t>(n - 1);
        ggml_backend_tensor_set(g.out_ids, &last, 0, sizeof(int32_t));
    }

    const uint64_t t2 = now_us();
    if (ggml_backend_sched_graph_compute(sched_, g.gf) != GGML_STATUS_SUCCESS) {
        graph_.reset();
        throw RuntimeFailure("graph compute failed");
    }
    const uint64_t t3 = now_us();
    if (out != nullptr) {
        ggml_backend_tensor_get(g.logits, out, 0, static_cast<size_t>(n_outputs) * hp.n_vocab * sizeof(float));
    }
    const uint64_t t4 = now_us();
    timings_.n_passes += 1;
    timings_.n_tokens += n;
    timings_.build_us += t1 - t0;
    timings_.inputs_us += t2 - t1;
    timings_.compute_us += t3 - t2;
    timings_.output_us += t4 - t3;
}

}  // namespace appliance

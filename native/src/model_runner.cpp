#include "model_runner.h"

#include "arch/arch.h"
#include "clock.h"
#include "error.h"
#include "model.h"

#include "cpu_backend.h"

#include <algorithm>
#include <cmath>

namespace appliance {

namespace {

// inputs a pass does not read (token ids when it starts from hidden states, masks when it runs no
// attention layer of that kind) are not in its graph and have no memory
void set_input(ggml_tensor * t, const void * data, size_t bytes) {
    if (t != nullptr && t->buffer != nullptr) {
        ggml_backend_tensor_set(t, data, 0, bytes);
    }
}

}  // namespace

ModelRunner::ModelRunner(const Model & model, uint32_t n_cells, uint32_t n_cells_swa, uint32_t max_tokens, int n_threads)
    : model_(model),
      kv_(model, std::max<uint32_t>(n_cells, 1), std::max<uint32_t>(n_cells_swa, 1)),
      max_tokens_(std::min({max_tokens, n_cells, model.hp.has_swa() ? n_cells_swa : n_cells})),
      n_threads_(n_threads),
      lora_(model) {
    APPL_REQUIRE(n_cells > 0, InvalidArgument, "the KV cache needs at least one cell");
    APPL_REQUIRE(max_tokens > 0, InvalidArgument, "batch size must be positive");
    APPL_REQUIRE(n_threads > 0, InvalidArgument, "n_threads must be positive, got " + std::to_string(n_threads));

    ggml_backend_dev_t cpu_dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
    backend_cpu_ = ggml_backend_dev_init(cpu_dev, nullptr);
    if (backend_cpu_ == nullptr) {
        throw RuntimeFailure("cannot initialise the CPU backend");
    }
    cpu_set_n_threads(backend_cpu_, n_threads_);

    if (model.device != cpu_dev) {
        backend_dev_ = ggml_backend_dev_init(model.device, nullptr);
        if (backend_dev_ == nullptr) {
            ggml_backend_free(backend_cpu_);
            throw RuntimeFailure(std::string("cannot initialise device ") + ggml_backend_dev_name(model.device));
        }
        backends_.push_back(backend_dev_);
    }
    backends_.push_back(backend_cpu_);
    max_nodes_ = std::max<size_t>(2048, 16 * static_cast<size_t>(model.file->n_tensors()));

    // hidden states handed from one partial pass to the next (early exit)
    ggml_init_params hp_params = {ggml_tensor_overhead(), nullptr, /*no_alloc=*/true};
    hidden_ctx_ = ggml_init(hp_params);
    hidden_     = ggml_new_tensor_2d(hidden_ctx_, GGML_TYPE_F32, model.hp.n_embd, max_tokens_);  // [n_embd, max_tokens]
    ggml_set_name(hidden_, "hidden_store");
    hidden_buf_ = ggml_backend_alloc_ctx_tensors_from_buft(hidden_ctx_, ggml_backend_dev_buffer_type(model.device));
    if (hidden_buf_ == nullptr) {
        ggml_free(hidden_ctx_);
        ggml_backend_free(backend_cpu_);
        if (backend_dev_) ggml_backend_free(backend_dev_);
        throw RuntimeFailure("cannot allocate the hidden-state store");
    }

    // reserve compute memory for the largest ordinary pass (a full batch over the whole cache), so
    // running out of memory shows here rather than mid-request
    Slot &                      full  = slot_for(PassSpec{});
    std::unique_ptr<BuiltGraph> worst = build(full, UBatchShape{max_tokens_, 1, kv_.n_cells(), kv_.n_cells_swa(), false, false});
    if (!ggml_backend_sched_reserve(full.sched, worst->gf)) {
        worst.reset();
        slots_.clear();
        ggml_backend_buffer_free(hidden_buf_);
        ggml_free(hidden_ctx_);
        ggml_backend_free(backend_cpu_);
        if (backend_dev_) ggml_backend_free(backend_dev_);
        throw RuntimeFailure("cannot reserve compute memory for a KV cache of " + std::to_string(n_cells) + " cells");
    }
}

ModelRunner::BuiltGraph::~BuiltGraph() { ggml_free(ctx); }

ModelRunner::Slot::~Slot() {
    graph.reset();
    if (sched) ggml_backend_sched_free(sched);
}

ModelRunner::Slot & ModelRunner::slot_for(const PassSpec & pass) {
    for (auto & s : slots_) {
        if (s->pass == pass) return *s;
    }
    auto s   = std::make_unique<Slot>();
    s->pass  = pass;
    s->sched = ggml_backend_sched_new(backends_.data(), nullptr, static_cast<int>(backends_.size()), max_nodes_,
                                      /*parallel=*/false, /*op_offload=*/true);
    s->graph_mem.resize(ggml_tensor_overhead() * max_nodes_ + ggml_graph_overhead_custom(max_nodes_, false));
    slots_.push_back(std::move(s));
    return *slots_.back();
}

std::unique_ptr<ModelRunner::BuiltGraph> ModelRunner::build(Slot & slot, const UBatchShape & shape) {
    slot.graph.reset();  // shares slot.graph_mem
    auto bg = std::make_unique<BuiltGraph>();
    ggml_init_params p = {slot.graph_mem.size(), slot.graph_mem.data(), /*no_alloc=*/true};
    bg->ctx   = ggml_init(p);
    bg->gf    = ggml_new_graph_custom(bg->ctx, max_nodes_, false);
    bg->shape = shape;
    GraphBuilder g(bg->ctx, bg->gf, model_, kv_, shape, slot.pass, hidden_, shortlist_ ? shortlist_->weights() : nullptr,
                   &lora_);
    bg->logits = build_pass(g);  // [n_vocab or n_short, n_outputs], or the hidden state when no head
    ggml_build_forward_expand(bg->gf, bg->logits);
    bg->tokens   = g.inp_tokens;
    bg->pos      = g.inp_pos;
    bg->kv_idx   = g.inp_kv_idx;
    bg->kv_idx_swa = g.inp_kv_idx_swa;
    bg->kv_rows    = g.inp_kv_rows;
    bg->kv_rows_swa = g.inp_kv_rows_swa;
    bg->mask     = g.inp_mask;
    bg->mask_swa = g.inp_mask_swa;
    bg->out_ids  = g.inp_out_ids;
    bg->rows_get = g.inp_rows_get;
    bg->rows_set = g.inp_rows_set;
    bg->lora_ids = g.inp_lora_ids;
    bg->lora_ids_out = g.inp_lora_ids_out;
    bg->lora_scale     = g.inp_lora_scale;
    bg->lora_scale_out = g.inp_lora_scale_out;
    return bg;
}

void ModelRunner::drop_graphs() {
    for (auto & s : slots_) {
        s->graph.reset();
        ggml_backend_sched_reset(s->sched);
    }
}

int32_t ModelRunner::add_adapter(const LoraAdapter & ad) {
    const uint64_t gen  = lora_.generation();
    const int32_t  slot = lora_.add(ad);
    if (lora_.generation() != gen) drop_graphs();
    return slot;
}

void ModelRunner::remove_adapter(int32_t slot) {
    const uint64_t gen = lora_.generation();
    lora_.remove(slot);
    if (lora_.generation() != gen) drop_graphs();
}

ModelRunner::~ModelRunner() {
    slots_.clear();
    shortlist_.reset();
    ggml_backend_buffer_free(hidden_buf_);
    ggml_free(hidden_ctx_);
    if (backend_dev_) ggml_backend_free(backend_dev_);
    ggml_backend_free(backend_cpu_);
}

size_t ModelRunner::compute_bytes() const {
    size_t total = 0;
    for (const auto & s : slots_) {
        for (int i = 0; i < ggml_backend_sched_get_n_backends(s->sched); ++i) {
            total += ggml_backend_sched_get_buffer_size(s->sched, ggml_backend_sched_get_backend(s->sched, i));
        }
    }
    return total;
}

void ModelRunner::set_n_threads(int n_threads) {
    APPL_REQUIRE(n_threads > 0, InvalidArgument, "n_threads must be positive, got " + std::to_string(n_threads));
    n_threads_ = n_threads;
    cpu_set_n_threads(backend_cpu_, n_threads);
}

void ModelRunner::set_shortlist(const std::vector<int32_t> & tokens) {
    auto next = std::make_unique<Shortlist>(model_, tokens);
    // graphs that read the old shortlist go with it
    slots_.erase(std::remove_if(slots_.begin() + 1, slots_.end(),
                                [](const std::unique_ptr<Slot> & s) { return s->pass.head == Head::Shortlist; }),
                 slots_.end());
    shortlist_ = std::move(next);
}

void ModelRunner::run(const Batch & batch, std::vector<float> & logits, const PassSpec & pass) {
    const HParams & hp        = model_.hp;
    const uint32_t  n         = batch.size();
    const uint32_t  n_outputs = static_cast<uint32_t>(batch.out_ids.size());
    GGML_ASSERT(n > 0 && n <= max_tokens_ && n_outputs > 0);
    GGML_ASSERT(pass.is_full() || n_outputs == n);
    GGML_ASSERT(pass.head != Head::Shortlist || shortlist_);
    const bool rows = pass.l_begin > 0 || pass.keep_hidden;
    if (rows) {
        GGML_ASSERT(batch.hidden_rows.size() == n);
        for (int32_t r : batch.hidden_rows) GGML_ASSERT(r >= 0 && static_cast<uint32_t>(r) < max_tokens_);
    }

    // the cell that receives every token's K and V, in each pool
    const bool swa = hp.has_swa();
    cells_.resize(n);
    cells_swa_.resize(swa ? n : 0);
    for (uint32_t i = 0; i < n; ++i) {
        const SeqView & v = batch.views[batch.seq[i]];
        cells_[i]         = v.cell(batch.pos[i]);
        GGML_ASSERT(cells_[i] >= 0 && cells_[i] < kv_.n_cells());
        if (swa) {
            GGML_ASSERT(v.swa_blocks != nullptr && batch.pos[i] / v.block_size < v.swa_blocks->size());
            cells_swa_[i] = v.cell_swa(batch.pos[i]);
            GGML_ASSERT(cells_swa_[i] >= 0 && cells_swa_[i] < kv_.n_cells_swa());
        }
    }
    // what attention reads in each pool: a token sees positions 0..pos of its own sequence (the last
    // n_swa of them on sliding-window layers, in their own pool)
    plan_span(batch, 0, kv_.n_cells(), hp.n_head, gather_, span_);
    if (swa) plan_span(batch, hp.n_swa, kv_.n_cells_swa(), hp.n_head, gather_, span_swa_);

    // each token's adapter slot, and each output's; the LoRA terms are built only when some row has one
    bool with_lora = false;
    lora_ids_.resize(n);
    for (uint32_t i = 0; i < n; ++i) {
        lora_ids_[i] = batch.views[batch.seq[i]].lora_slot;
        GGML_ASSERT(lora_ids_[i] >= 0 && static_cast<uint32_t>(lora_ids_[i]) < std::max<uint32_t>(lora_.n_slots(), 1));
        with_lora |= lora_ids_[i] != 0;
    }
    lora_ids_out_.resize(n_outputs);
    for (uint32_t j = 0; j < n_outputs; ++j) lora_ids_out_[j] = lora_ids_[batch.out_ids[j]];
    if (with_lora) {
        lora_scale_.resize(n);
        for (uint32_t i = 0; i < n; ++i) lora_scale_[i] = lora_.slot_scale(lora_ids_[i]);
        lora_scale_out_.resize(n_outputs);
        for (uint32_t j = 0; j < n_outputs; ++j) lora_scale_out_[j] = lora_scale_[batch.out_ids[j]];
    }

    const uint64_t    t0 = now_us();
    const UBatchShape shape{n, n_outputs, span_.n_kv, swa ? span_swa_.n_kv : 0, span_.gather, swa && span_swa_.gather,
                            with_lora};
    Slot &            slot = slot_for(pass);
    if (!slot.graph || !(slot.graph->shape == shape)) {
        slot.graph = build(slot, shape);
        ggml_backend_sched_reset(slot.sched);
        if (!ggml_backend_sched_alloc_graph(slot.sched, slot.graph->gf)) {
            slot.graph.reset();
            throw RuntimeFailure("cannot allocate the compute graph");
        }
    }
    const BuiltGraph & g  = *slot.graph;
    const uint64_t     t1 = now_us();

    set_input(g.tokens, batch.tokens.data(), n * sizeof(int32_t));
    set_input(g.pos, batch.pos.data(), n * sizeof(int32_t));
    set_input(g.kv_idx, cells_.data(), n * sizeof(int64_t));
    set_input(g.kv_idx_swa, cells_swa_.data(), cells_swa_.size() * sizeof(int64_t));
    fill_mask(batch, 0, span_, mask_);
    set_input(g.mask, mask_.data(), mask_.size() * sizeof(ggml_fp16_t));
    if (span_.gather) set_input(g.kv_rows, span_.rows.data(), span_.rows.size() * sizeof(int32_t));
    if (swa) {
        fill_mask(batch, hp.n_swa, span_swa_, mask_swa_);
        set_input(g.mask_swa, mask_swa_.data(), mask_swa_.size() * sizeof(ggml_fp16_t));
        if (span_swa_.gather) set_input(g.kv_rows_swa, span_swa_.rows.data(), span_swa_.rows.size() * sizeof(int32_t));
    }
    if (g.out_ids) {
        ggml_backend_tensor_set(g.out_ids, batch.out_ids.data(), 0, n_outputs * sizeof(int32_t));
    } else {
        for (uint32_t i = 0; i < n_outputs; ++i) GGML_ASSERT(batch.out_ids[i] == static_cast<int32_t>(i));
    }
    if (g.rows_get) {
        ggml_backend_tensor_set(g.rows_get, batch.hidden_rows.data(), 0, n * sizeof(int32_t));
    }
    if (g.lora_ids) set_input(g.lora_ids, lora_ids_.data(), n * sizeof(int32_t));
    if (g.lora_ids_out) set_input(g.lora_ids_out, lora_ids_out_.data(), n_outputs * sizeof(int32_t));
    if (g.lora_scale) set_input(g.lora_scale, lora_scale_.data(), n * sizeof(float));
    if (g.lora_scale_out) set_input(g.lora_scale_out, lora_scale_out_.data(), n_outputs * sizeof(float));
    if (g.rows_set) {
        rows64_.assign(batch.hidden_rows.begin(), batch.hidden_rows.end());
        ggml_backend_tensor_set(g.rows_set, rows64_.data(), 0, n * sizeof(int64_t));
    }

    const uint64_t t2 = now_us();
    if (ggml_backend_sched_graph_compute(slot.sched, g.gf) != GGML_STATUS_SUCCESS) {
        slot.graph.reset();
        throw RuntimeFailure("graph compute failed");
    }
    const uint64_t t3 = now_us();
    if (pass.head == Head::None) {
        logits.clear();
    } else {
        const size_t n_cols = pass.head == Head::Full ? hp.n_vocab : shortlist_->size();
        logits.resize(static_cast<size_t>(n_outputs) * n_cols);
        ggml_backend_tensor_get(g.logits, logits.data(), 0, logits.size() * sizeof(float));
    }
    const uint64_t t4 = now_us();

    timings_.n_passes += 1;
    timings_.n_tokens += n;
    timings_.n_gathered += shape.gather || shape.gather_swa ? 1 : 0;
    timings_.build_us += t1 - t0;
    timings_.inputs_us += t2 - t1;
    timings_.compute_us += t3 - t2;
    timings_.output_us += t4 - t3;
}

}  // namespace appliance

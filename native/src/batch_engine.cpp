#include "batch_engine.h"

#include "clock.h"
#include "error.h"
#include "choices.h"
#include "grammar.h"
#include "model.h"
#include "vocab.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>

namespace appliance {

namespace {

uint64_t fnv1a(const std::string & s) {
    uint64_t h = 1469598103934665603ull;
    for (unsigned char c : s) {
        h = (h ^ c) * 1099511628211ull;
    }
    return h;
}

// K/V bytes per position of the layers with (swa) or without a sliding window
size_t kv_bytes_per_token(const Model & m, bool swa) {
    size_t n = 0;
    for (uint32_t il = 0; il < m.hp.n_layer; ++il) {
        n += m.hp.is_swa(il) == swa ? (m.hp.n_embd_k_gqa() + m.hp.n_embd_v_gqa()) * sizeof(uint16_t) : 0;
    }
    return n;
}

}  // namespace

BatchEngine::PoolSizes BatchEngine::pool_sizes(const Model & m, const BatchEngineParams & p) {
    APPL_REQUIRE(p.block_size > 0 && p.block_size <= 1024, InvalidArgument, "block_size must be in [1, 1024]");
    APPL_REQUIRE(p.kv_cache_mb > 0, InvalidArgument, "kv_cache_mb must be positive");
    APPL_REQUIRE(p.max_seqs > 0, InvalidArgument, "max_seqs must be positive");
    APPL_REQUIRE(p.max_batched_tokens > 0, InvalidArgument, "max_batched_tokens must be positive");
    const bool swa = m.hp.has_swa();
    PoolSizes  out;
    if (p.n_blocks > 0) {
        APPL_REQUIRE(p.n_blocks >= 2, InvalidArgument, "n_blocks must be at least 2");
        APPL_REQUIRE(p.n_blocks_swa == 0 || p.n_blocks_swa >= 2, InvalidArgument, "n_blocks_swa must be at least 2");
        out.n_blocks     = p.n_blocks;
        out.n_blocks_swa = swa ? (p.n_blocks_swa > 0 ? std::min(p.n_blocks_swa, p.n_blocks) : p.n_blocks) : 0;
        return out;
    }
    const size_t bs     = p.block_size;
    const size_t budget = static_cast<size_t>(p.kv_cache_mb) << 20;
    const size_t g      = kv_bytes_per_token(m, false) * bs;  // bytes of a global block
    const size_t w      = kv_bytes_per_token(m, true) * bs;   // bytes of a windowed block
    const size_t equal  = budget / (g + w);                    // both pools alike
    size_t       n_g = equal, n_w = swa ? equal : 0;
    if (swa) {
        // what the windowed pool needs at most: every running sequence's window (plus the block its
        // next token opens), and one pass's worth of new tokens
        const size_t window = (m.hp.n_swa + bs - 1) / bs + 1;
        const size_t cap    = p.max_seqs * (window + 1) + (p.max_batched_tokens + bs - 1) / bs;
        if (cap < equal) {
            n_w = cap;
            n_g = g > 0 ? (budget - cap * w) / g : equal;
        }
    }
    APPL_REQUIRE(n_g >= 2 && (!swa || n_w >= 2), InvalidArgument,
                 "kv_cache_mb=" + std::to_string(p.kv_cache_mb) + " holds fewer than 2 blocks");
    out.n_blocks     = static_cast<uint32_t>(std::min<size_t>(n_g, 1u << 20));
    out.n_blocks_swa = static_cast<uint32_t>(std::min<size_t>(n_w, out.n_blocks));
    return out;
}

BatchEngine::BatchEngine(const Model & model, const BatchEngineParams & params, const Vocab * vocab)
    : model_(model),
      vocab_(vocab),
      params_(params),
      pools_(pool_sizes(model, params)),
      blocks_(pools_.n_blocks, params.block_size),
      blocks_swa_(pools_.n_blocks_swa > 0 ? std::make_unique<BlockManager>(pools_.n_blocks_swa, params.block_size)
                                          : nullptr),
      sched_(blocks_, blocks_swa_.get(),
             SchedulerConfig{params.max_batched_tokens, params.max_seqs,
                             std::min(model.hp.n_ctx_train, pools_.n_blocks * params.block_size),
                             blocks_swa_ ? model.hp.n_swa : 0}),
      runner_(model, pools_.n_blocks * params.block_size, pools_.n_blocks_swa * params.block_size,
              params.max_batched_tokens, params.n_threads),
      eog_(params.eog_tokens.begin(), params.eog_tokens.end()),
      exits_per_layer_(model.hp.n_layer + 1, 0) {
    check_exit_params();
    runner_.set_gather(params.gather_kv);
}

uint64_t BatchEngine::salt_for(const std::string & tenant, uint64_t adapter_identity) const {
    return fnv1a(params_.model_key) ^ (fnv1a(tenant) * 0x9e3779b97f4a7c15ull) ^ (adapter_identity * 0xc2b2ae3d27d4eb4full);
}

int64_t BatchEngine::load_adapter(const std::string & path, float scale) {
    APPL_REQUIRE(std::isfinite(scale), InvalidArgument, "adapter scale must be finite");
    std::unique_ptr<LoraAdapter> ad   = LoraAdapter::load(model_, path, scale);
    const int32_t                slot = runner_.add_adapter(*ad);
    Adapter                      a;
    a.slot              = slot;
    a.info.id           = next_adapter_id_++;
    a.info.path         = ad->path();
    a.info.scale        = scale;
    a.info.alpha        = ad->alpha();
    a.info.rank         = ad->max_rank();
    a.info.n_weights    = static_cast<uint32_t>(ad->weights().size());
    a.info.content_hash = ad->content_hash();
    a.info.identity     = ad->identity();
    a.info.file_bytes   = ad->file_bytes();
    const int64_t id    = a.info.id;
    adapters_.emplace(id, std::move(a));
    return id;
}

bool BatchEngine::unload_adapter(int64_t id) {
    auto it = adapters_.find(id);
    APPL_REQUIRE(it != adapters_.end(), InvalidArgument, "no adapter with id " + std::to_string(id) + " is loaded");
    if (it->second.info.n_requests > 0) {
        it->second.info.unloading = true;  // freed by forget() when its last request leaves
        return false;
    }
    runner_.remove_adapter(it->second.slot);
    adapters_.erase(it);
    return true;
}

std::vector<AdapterInfo> BatchEngine::adapters() const {
    std::vector<AdapterInfo> out;
    for (const auto & [id, a] : adapters_) out.push_back(a.info);
    std::sort(out.begin(), out.end(), [](const AdapterInfo & x, const AdapterInfo & y) { return x.id < y.id; });
    return out;
}

void BatchEngine::forget(Sequence & s) {
    if (s.adapter == 0) return;
    auto it = adapters_.find(s.adapter);
    GGML_ASSERT(it != adapters_.end() && it->second.info.n_requests > 0);
    s.adapter = 0;
    if (--it->second.info.n_requests == 0 && it->second.info.unloading) {
        runner_.remove_adapter(it->second.slot);
        adapters_.erase(it);
    }
}

int64_t BatchEngine::submit(const Request & r) {
    APPL_REQUIRE(!r.prompt.empty(), InvalidArgument, "prompt is empty");
    APPL_REQUIRE(r.max_tokens > 0, InvalidArgument, "max_tokens must be positive");
    const int32_t n_vocab = static_cast<int32_t>(model_.hp.n_vocab);
    for (size_t i = 0; i < r.prompt.size(); ++i) {
        if (r.prompt[i] < 0 || r.prompt[i] >= n_vocab) {
            throw InvalidArgument("token id " + std::to_string(r.prompt[i]) + " at index " + std::to_string(i) +
                                  " is outside the vocabulary of " + std::to_string(n_vocab));
        }
    }
    if (r.prompt.size() >= max_seq_len()) {
        throw ContextOverflowError("prompt of " + std::to_string(r.prompt.size()) + " tokens does not fit: the longest "
                                   "sequence is " + std::to_string(max_seq_len()) + " tokens (prompt and output)");
    }
    if (r.exit_mode != ExitMode::Off) {
        APPL_REQUIRE(runner_.shortlist() != nullptr, InvalidArgument,
                     "early exit needs the model's exit calibration (a shortlist): none is loaded");
        APPL_REQUIRE(r.exit_mode != ExitMode::Adaptive || !params_.exit_layers.empty(), InvalidArgument,
                     "adaptive early exit needs calibrated exit layers: none are configured");
        APPL_REQUIRE(r.exit_threshold <= 1.0f, InvalidArgument, "exit_threshold must be <= 1 (or < 0 for calibrated)");
    }
    Adapter * ad = nullptr;
    if (r.adapter != 0) {
        auto it = adapters_.find(r.adapter);
        APPL_REQUIRE(it != adapters_.end(), InvalidArgument, "no adapter with id " + std::to_string(r.adapter) + " is loaded");
        APPL_REQUIRE(!it->second.info.unloading, InvalidArgument,
                     "adapter " + std::to_string(r.adapter) + " is being unloaded");
        ad = &it->second;
    }
    APPL_REQUIRE(r.grammar.empty() || r.choices.empty(), InvalidArgument, "a request takes a grammar or choices, not both");
    std::unique_ptr<Constraint> constraint;
    if (!r.grammar.empty()) {
        APPL_REQUIRE(vocab_ != nullptr, InvalidArgument, "a grammar needs the engine's vocabulary (BatchEngine's vocab)");
        APPL_REQUIRE(vocab_->n_tokens() <= n_vocab, InvalidArgument, "the vocabulary does not match the model");
        constraint = std::make_unique<Grammar>(*vocab_, r.grammar);  // InvalidArgument naming the problem
    } else if (!r.choices.empty()) {
        constraint = std::make_unique<Choices>(r.choices, n_vocab, eog_);  // InvalidArgument naming the problem
    }
    auto seq = std::make_unique<Sequence>(next_id_++, r.prompt, salt_for(r.tenant, ad ? ad->info.identity : 0),
                                          r.sampling, n_vocab);
    if (ad != nullptr) {
        seq->adapter   = r.adapter;
        seq->lora_slot = ad->slot;
        ++ad->info.n_requests;
    }
    seq->max_tokens     = r.max_tokens;
    seq->stop_at_eog    = r.stop_at_eog;
    seq->exit_mode      = r.exit_mode;
    seq->exit_threshold = r.exit_threshold;
    seq->logprobs       = r.logprobs;
    seq->constraint     = std::move(constraint);
    Sequence * s = seq.get();
    seqs_.emplace(s->id, std::move(seq));
    sched_.add(s);
    return s->id;
}

bool BatchEngine::cancel(int64_t id) {
    auto it = seqs_.find(id);
    if (it == seqs_.end()) {
        return false;
    }
    sched_.remove(it->second.get());
    forget(*it->second);
    seqs_.erase(it);
    return true;
}

void BatchEngine::finish(Sequence * s, const std::string & reason, std::vector<Event> & events) {
    sched_.remove(s);
    Event * ev = nullptr;
    for (Event & e : events) {
        if (e.id == s->id) ev = &e;
    }
    if (ev == nullptr) {
        events.push_back(Event{s->id, {}, "", s->n_prompt, s->n_prompt_cached});
        ev = &events.back();
    }
    ev->finish_reason = reason;
    forget(*s);
    seqs_.erase(s->id);
}

void BatchEngine::advanced(Sequence & s) {
    const uint32_t bs = blocks_.block_size();
    while ((s.block_hashes.size() + 1) * bs <= s.n_computed) {
        const size_t    i      = s.block_hashes.size();
        const uint64_t  parent = i == 0 ? 0 : s.block_hashes[i - 1];
        const int32_t * toks   = s.tokens.data() + i * bs;
        const uint64_t  h      = BlockManager::hash_block(parent, toks, bs, s.salt);
        blocks_.register_full(s.blocks[i], h, toks);
        if (blocks_swa_ && i < s.swa_blocks.size() && s.swa_blocks[i] >= 0) {
            blocks_swa_->register_full(s.swa_blocks[i], h, toks);
        }
        s.block_hashes.push_back(h);
    }
    sched_.slide_window(s);
}

int32_t BatchEngine::sample(Sequence & s, const float * row) {
    return s.constraint ? s.constraint->sample(s.sampler, row, s.tokens) : s.sampler.sample(row, s.tokens);
}

TokenScore BatchEngine::score(const Sequence & s, const float * row, uint32_t n, int32_t idx) {
    if (!s.logprobs || idx < 0) return TokenScore{};
    TokenScore sc = score_token(row, static_cast<int32_t>(n), idx);
    if (s.constraint) sc.margin = row[idx] - s.constraint->runner_up(row, static_cast<int32_t>(n), idx);  // before accept()
    return sc;
}

bool BatchEngine::emit(Sequence & s, int32_t tok, std::vector<Event> & events, TokenScore sc) {
    if (tok < 0 || (eog_.count(tok) != 0 && s.stop_at_eog)) {  // tok < 0: the constraint allows nothing more
        finish(&s, "stop", events);
        return false;
    }
    if (s.constraint) s.constraint->accept(tok);
    s.tokens.push_back(tok);
    for (auto it = events.rbegin(); it != events.rend(); ++it) {
        if (it->id == s.id) {
            it->tokens.push_back(tok);
            if (s.logprobs) {
                it->logprobs.push_back(sc.logprob);
                it->entropies.push_back(sc.entropy);
                it->margins.push_back(sc.margin);
            }
            break;
        }
    }
    if (s.constraint && s.constraint->complete()) {  // a whole answer: nothing may follow
        finish(&s, "stop", events);
        return false;
    }
    if (s.n_generated() >= s.max_tokens || s.tokens.size() >= max_seq_len()) {
        finish(&s, "length", events);
        return false;
    }
    return true;
}

std::vector<Event> BatchEngine::step() {
    std::vector<Event>      events;
    std::vector<Sequence *> oom;
    std::vector<Scheduled>  plan = sched_.schedule(oom);
    for (Sequence * s : oom) {
        finish(s, "oom", events);
    }
    if (plan.empty()) {
        return events;
    }
    const ExitMode mode = exit_mode_for(plan);
    const uint32_t n    = static_cast<uint32_t>(plan.size());
    if (mode == ExitMode::Lossless) {
        const std::vector<uint32_t> ks = draft_lengths(plan);
        SpecPolicy::Choice          ch = spec_.choose(ks);
        if (params_.always_draft || ch.spec) {
            step_lossless(plan, events, params_.always_draft ? *std::max_element(ks.begin(), ks.end()) : ch.cap);
            return events;
        }
    }
    if (mode == ExitMode::Adaptive) {  // asked for explicitly, at the request's own threshold
        step_adaptive(plan, events);
        return events;
    }
    // run: every scheduled token, logits for each sequence whose last token is in this pass
    batch_.clear();
    for (size_t k = 0; k < plan.size(); ++k) {
        Sequence & s = *plan[k].seq;
        batch_.views.push_back(view(s));
        const uint32_t end = s.n_computed + plan[k].n_tokens;
        for (uint32_t p = s.n_computed; p < end; ++p) {
            batch_.add(s.tokens[p], static_cast<int32_t>(p), static_cast<int32_t>(k), p + 1 == s.tokens.size());
        }
    }
    const bool no_outputs = batch_.out_ids.empty();
    if (no_outputs) {
        batch_.out_ids.push_back(static_cast<int32_t>(batch_.size()) - 1);  // a pass must output something
    }
    const uint64_t t_pass = now_us();
    runner_.run(batch_, logits_);
    const uint64_t pass_us = now_us() - t_pass;
    ++n_steps_;

    // postprocess: advance, cache full blocks, sample, finish
    size_t out_row = 0;
    for (const Scheduled & sc : plan) {
        Sequence & s = *sc.seq;
        s.n_computed += sc.n_tokens;
        advanced(s);
        if (no_outputs || s.n_computed != s.tokens.size()) {
            continue;  // mid-prompt chunk
        }
        const float * row = logits_.data() + out_row++ * model_.hp.n_vocab;
        const int32_t tok = sample(s, row);
        events.push_back(Event{s.id, {}, "", s.n_prompt, s.n_prompt_cached});
        events.back().layers_run = model_.hp.n_layer;  // for the new token (a prompt's layers are not counted)
        events.back().exit_layers.push_back(static_cast<uint16_t>(model_.hp.n_layer));
        if (mode == ExitMode::Lossless) observe_acceptance(row, tok);
        emit(s, tok, events, score(s, row, model_.hp.n_vocab, tok));
    }
    if (mode == ExitMode::Lossless) {  // a plain step where drafting was possible: the policy's plain pass time
        spec_.record_pass(SpecPolicy::Pass::Plain, n, pass_us);
        ++plain_decode_steps_;
    }
    return events;
}

std::vector<int32_t> BatchEngine::shortlist() const {
    return runner_.shortlist() ? runner_.shortlist()->tokens() : std::vector<int32_t>{};
}

BatchEngine::Stats BatchEngine::stats() const {
    const auto bs = blocks_.stats();
    Stats s{};
    s.n_blocks             = blocks_.n_blocks();
    s.n_free_blocks        = blocks_.n_free();
    s.n_blocks_swa         = blocks_swa_ ? blocks_swa_->n_blocks() : 0;
    s.n_free_blocks_swa    = blocks_swa_ ? blocks_swa_->n_free() : 0;
    s.block_size           = blocks_.block_size();
    s.n_waiting            = sched_.n_waiting();
    s.n_running            = sched_.n_running();
    s.n_preemptions        = sched_.n_preemptions();
    s.prefix_hits          = sched_.n_prefix_hits();
    s.prefix_lookups       = sched_.n_prefix_lookups();
    s.prefix_evictions     = bs.evictions;
    s.prefix_cached_blocks = bs.cached;
    s.n_steps              = n_steps_;
    s.n_tokens_run         = runner_.timings().n_tokens;
    s.kv_bytes             = runner_.kv_bytes();
    s.kv_bytes_per_token   = kv_bytes_per_token(model_, false);
    s.kv_bytes_per_token_swa = kv_bytes_per_token(model_, true);
    s.spec_steps           = spec_steps_;
    s.plain_decode_steps   = plain_decode_steps_;
    s.drafted              = drafted_;
    s.accepted             = accepted_;
    s.adaptive_tokens      = adaptive_tokens_;
    s.spec_acceptance      = spec_.acceptance();
    s.spec_draft_us        = spec_.table(SpecPolicy::Pass::Draft);
    s.spec_verify_us       = spec_.table(SpecPolicy::Pass::Verify);
    s.spec_plain_us        = spec_.table(SpecPolicy::Pass::Plain);
    const auto & choices   = spec_.last_choices();
    for (uint32_t i = 1; i < choices.size(); ++i) {
        if (choices[i].why[0] != '\0') s.spec_choices.emplace_back(i, choices[i]);
    }
    s.exits_per_layer      = exits_per_layer_;
    s.n_adapters           = static_cast<uint32_t>(adapters_.size());
    s.adapter_bytes        = runner_.lora().bytes();
    return s;
}

namespace {

constexpr char kPrefixMagic[8] = {'A', 'P', 'L', 'P', 'F', 'X', '0', '2'};

struct PrefixHeader {
    char     magic[8];
    uint64_t model;       // hash of the engine's model key: a file loads only into the same model
    uint64_t salt;        // model key and tenant
    uint32_t block_size;
    uint32_t n_layer;
    uint32_t n_embd_k;
    uint32_t n_embd_v;
    uint32_t n_blocks;
    uint32_t n_swa_blocks;  // the last blocks, whose sliding-window layers' K/V follow (0: no such layers)
};

// Calls io(tensor, byte offset, bytes) for the K and V rows of one block in every layer with (swa)
// or without a sliding window, in the order prefix files store them.
template <typename F>
bool for_block_rows(const KvStorage & kv, const HParams & hp, bool swa, int32_t block, uint32_t bs, F && io) {
    for (uint32_t il = 0; il < hp.n_layer; ++il) {
        if (hp.is_swa(il) != swa) continue;
        for (ggml_tensor * t : {kv.k(il), kv.v(il)}) {
            const size_t row = ggml_row_size(t->type, t->ne[0]);
            if (!io(t, static_cast<size_t>(block) * bs * row, row * bs)) {
                return false;
            }
        }
    }
    return true;
}

}  // namespace

// File: header, the prefix's token ids, then per block the K/V rows of the global layers, then, for
// the blocks a token right after the prefix sees through its window, those of the windowed layers.
uint32_t BatchEngine::save_prefix(const std::vector<int32_t> & tokens, const std::string & tenant, const std::string & path,
                                  int64_t adapter) {
    uint64_t identity = 0;
    if (adapter != 0) {
        auto it = adapters_.find(adapter);
        APPL_REQUIRE(it != adapters_.end(), InvalidArgument, "no adapter with id " + std::to_string(adapter) + " is loaded");
        identity = it->second.info.identity;
    }
    const uint32_t bs   = blocks_.block_size();
    const uint64_t salt = salt_for(tenant, identity);
    PrefixHit      hit  = sched_.match_prefix(tokens, salt, static_cast<uint32_t>(tokens.size() / bs));
    const uint32_t k    = static_cast<uint32_t>(hit.blocks.size());
    const uint32_t lo   = blocks_swa_ ? first_window_block(k * bs, model_.hp.n_swa, bs) : k;
    const KvStorage & kv = runner_.kv();
    const HParams &   hp = model_.hp;
    PrefixHeader h{};
    std::memcpy(h.magic, kPrefixMagic, sizeof(h.magic));
    h.model        = fnv1a(params_.model_key);
    h.salt         = salt;
    h.block_size   = bs;
    h.n_layer      = hp.n_layer;
    h.n_embd_k     = hp.n_embd_k_gqa();
    h.n_embd_v     = hp.n_embd_v_gqa();
    h.n_blocks     = k;
    h.n_swa_blocks = k - lo;
    std::FILE * f = std::fopen((path + ".tmp").c_str(), "wb");
    if (f == nullptr) {
        sched_.release(hit);
        throw RuntimeFailure("cannot write " + path);
    }
    const size_t n_tok = static_cast<size_t>(k) * bs;
    bool ok = std::fwrite(&h, sizeof(h), 1, f) == 1 && std::fwrite(tokens.data(), sizeof(int32_t), n_tok, f) == n_tok;
    std::vector<uint8_t> buf;
    auto write = [&](ggml_tensor * t, size_t off, size_t bytes) {
        buf.resize(bytes);
        ggml_backend_tensor_get(t, buf.data(), off, bytes);
        return std::fwrite(buf.data(), 1, bytes, f) == bytes;
    };
    for (uint32_t i = 0; i < k && ok; ++i) {
        ok = for_block_rows(kv, hp, false, hit.blocks[i], bs, write);
    }
    for (uint32_t j = lo; j < k && ok; ++j) {
        ok = for_block_rows(kv, hp, true, hit.swa_blocks[j], bs, write);
    }
    ok = std::fclose(f) == 0 && ok;
    sched_.release(hit);
    if (!ok || std::rename((path + ".tmp").c_str(), path.c_str()) != 0) {
        std::remove((path + ".tmp").c_str());
        throw RuntimeFailure("cannot write " + path);
    }
    return k * bs;
}

uint32_t BatchEngine::load_prefix(const std::string & path) {
    std::FILE * f = std::fopen(path.c_str(), "rb");
    if (f == nullptr) {
        throw ModelFormatError("cannot open prefix file " + path);
    }
    const HParams & hp = model_.hp;
    PrefixHeader h{};
    const uint32_t bs = blocks_.block_size();
    const bool header_ok =
        std::fread(&h, sizeof(h), 1, f) == 1 && std::memcmp(h.magic, kPrefixMagic, sizeof(h.magic)) == 0 &&
        h.model == fnv1a(params_.model_key) && h.block_size == bs && h.n_layer == hp.n_layer &&
        h.n_embd_k == hp.n_embd_k_gqa() && h.n_embd_v == hp.n_embd_v_gqa() && h.n_blocks <= blocks_.n_blocks() &&
        h.n_swa_blocks == (blocks_swa_ ? h.n_blocks - first_window_block(h.n_blocks * bs, hp.n_swa, bs) : 0);
    if (!header_ok) {
        std::fclose(f);
        throw ModelFormatError("prefix file " + path + " is not for this model and block size");
    }
    std::vector<int32_t> tokens(static_cast<size_t>(h.n_blocks) * bs);
    if (std::fread(tokens.data(), sizeof(int32_t), tokens.size(), f) != tokens.size()) {
        std::fclose(f);
        throw ModelFormatError("prefix file " + path + " is truncated");
    }
    const KvStorage & kv = runner_.kv();
    std::vector<uint8_t> buf;
    auto read = [&](ggml_tensor * t, size_t off, size_t bytes) {
        buf.resize(bytes);
        if (std::fread(buf.data(), 1, bytes, f) != bytes) return false;
        ggml_backend_tensor_set(t, buf.data(), off, bytes);
        return true;
    };
    // at most as many blocks as are free (the oldest cached ones may be evicted to make room); with
    // windowed layers all or nothing, since a hit needs the window's blocks at the prefix's end
    const bool windows_fit =
        !blocks_swa_ || (h.n_blocks <= blocks_.n_free() && h.n_swa_blocks <= blocks_swa_->n_free());
    const uint32_t        n = windows_fit ? std::min(h.n_blocks, blocks_.n_free()) : 0;
    std::vector<int32_t>  held, held_swa;
    std::vector<uint64_t> hashes;
    bool                  ok = true;
    for (uint32_t i = 0; i < n && ok; ++i) {
        const int32_t b = blocks_.allocate();
        held.push_back(b);
        ok = for_block_rows(kv, hp, false, b, bs, read);
        if (ok) {
            const int32_t * toks = tokens.data() + static_cast<size_t>(i) * bs;
            hashes.push_back(BlockManager::hash_block(hashes.empty() ? 0 : hashes.back(), toks, bs, h.salt));
            blocks_.register_full(b, hashes.back(), toks);
        }
    }
    if (ok && blocks_swa_ && n > 0) {
        for (uint32_t j = n - h.n_swa_blocks; j < n && ok; ++j) {
            const int32_t b = blocks_swa_->allocate();
            held_swa.push_back(b);
            ok = for_block_rows(kv, hp, true, b, bs, read);
            if (ok) blocks_swa_->register_full(b, hashes[j], tokens.data() + static_cast<size_t>(j) * bs);
        }
    }
    std::fclose(f);
    blocks_.release(held);  // cached and free: reused on a hit, evicted in LRU order
    if (blocks_swa_) blocks_swa_->release(held_swa);
    if (!ok) {
        throw ModelFormatError("prefix file " + path + " is truncated");
    }
    return n * bs;
}

std::string BatchEngine::check_invariants() const {
    std::string err = blocks_.check(sched_.holders());
    if (err.empty() && blocks_swa_) {
        err = blocks_swa_->check(sched_.swa_holders());
        if (!err.empty()) err = "sliding-window pool: " + err;
    }
    return err;
}

}  // namespace appliance

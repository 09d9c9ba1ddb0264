#include "batch_engine.h"

#include "error.h"
#include "model.h"

#include <algorithm>

namespace appliance {

namespace {

uint64_t fnv1a(const std::string & s) {
    uint64_t h = 1469598103934665603ull;
    for (unsigned char c : s) {
        h = (h ^ c) * 1099511628211ull;
    }
    return h;
}

size_t kv_bytes_per_token(const Model & m) {
    return static_cast<size_t>(m.hp.n_layer) * (m.hp.n_embd_k_gqa() + m.hp.n_embd_v_gqa()) * sizeof(uint16_t);
}

}  // namespace

uint32_t BatchEngine::n_blocks_for(const Model & m, const BatchEngineParams & p) {
    APPL_REQUIRE(p.block_size > 0 && p.block_size <= 1024, InvalidArgument, "block_size must be in [1, 1024]");
    APPL_REQUIRE(p.kv_cache_mb > 0, InvalidArgument, "kv_cache_mb must be positive");
    APPL_REQUIRE(p.max_seqs > 0, InvalidArgument, "max_seqs must be positive");
    APPL_REQUIRE(p.max_batched_tokens > 0, InvalidArgument, "max_batched_tokens must be positive");
    if (p.n_blocks > 0) {
        APPL_REQUIRE(p.n_blocks >= 2, InvalidArgument, "n_blocks must be at least 2");
        return p.n_blocks;
    }
    const size_t per_block = kv_bytes_per_token(m) * p.block_size;
    const size_t n         = (static_cast<size_t>(p.kv_cache_mb) << 20) / per_block;
    APPL_REQUIRE(n >= 2, InvalidArgument, "kv_cache_mb=" + std::to_string(p.kv_cache_mb) + " holds fewer than 2 blocks");
    return static_cast<uint32_t>(std::min<size_t>(n, 1u << 20));
}

BatchEngine::BatchEngine(const Model & model, const BatchEngineParams & params)
    : model_(model),
      params_(params),
      blocks_(n_blocks_for(model, params), params.block_size),
      sched_(blocks_, SchedulerConfig{params.max_batched_tokens, params.max_seqs,
                                      std::min(model.hp.n_ctx_train, blocks_.n_blocks() * params.block_size)}),
      runner_(model, blocks_.n_blocks() * params.block_size, params.max_batched_tokens, params.n_threads),
      eog_(params.eog_tokens.begin(), params.eog_tokens.end()) {}

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
    const uint64_t salt = fnv1a(params_.model_key) ^ (fnv1a(r.tenant) * 0x9e3779b97f4a7c15ull);
    auto seq = std::make_unique<Sequence>(next_id_++, r.prompt, salt, r.sampling, n_vocab);
    seq->max_tokens  = r.max_tokens;
    seq->stop_at_eog = r.stop_at_eog;
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
    seqs_.erase(s->id);
}

void BatchEngine::register_full_blocks(Sequence & s) {
    const uint32_t bs = blocks_.block_size();
    while ((s.block_hashes.size() + 1) * bs <= s.n_computed) {
        const size_t    i      = s.block_hashes.size();
        const uint64_t  parent = i == 0 ? 0 : s.block_hashes[i - 1];
        const int32_t * toks   = s.tokens.data() + i * bs;
        const uint64_t  h      = BlockManager::hash_block(parent, toks, bs, s.salt);
        blocks_.register_full(s.blocks[i], h, toks);
        s.block_hashes.push_back(h);
    }
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

    // run: every scheduled token, logits for each sequence whose last token is in this pass
    batch_.clear();
    for (size_t k = 0; k < plan.size(); ++k) {
        Sequence & s = *plan[k].seq;
        batch_.views.push_back(SeqView{&s.blocks, blocks_.block_size()});
        const uint32_t end = s.n_computed + plan[k].n_tokens;
        for (uint32_t p = s.n_computed; p < end; ++p) {
            batch_.add(s.tokens[p], static_cast<int32_t>(p), static_cast<int32_t>(k), p + 1 == s.tokens.size());
        }
    }
    const bool no_outputs = batch_.out_ids.empty();
    if (no_outputs) {
        batch_.out_ids.push_back(static_cast<int32_t>(batch_.size()) - 1);  // a pass must output something
    }
    runner_.run(batch_, logits_);
    ++n_steps_;

    // postprocess: advance, cache full blocks, sample, finish
    size_t out_row = 0;
    for (const Scheduled & sc : plan) {
        Sequence & s = *sc.seq;
        s.n_computed += sc.n_tokens;
        register_full_blocks(s);
        if (no_outputs || s.n_computed != s.tokens.size()) {
            continue;  // mid-prompt chunk
        }
        const float * row = logits_.data() + out_row++ * model_.hp.n_vocab;
        const int32_t tok = s.sampler.sample(row, s.tokens);
        const bool    eog = eog_.count(tok) != 0;
        events.push_back(Event{s.id, {}, "", s.n_prompt, s.n_prompt_cached});
        if (eog && s.stop_at_eog) {
            finish(&s, "stop", events);
            continue;
        }
        s.tokens.push_back(tok);
        events.back().tokens.push_back(tok);
        if (s.n_generated() >= s.max_tokens || s.tokens.size() >= max_seq_len()) {
            finish(&s, "length", events);
        }
    }
    return events;
}

BatchEngine::Stats BatchEngine::stats() const {
    const auto bs = blocks_.stats();
    Stats s{};
    s.n_blocks             = blocks_.n_blocks();
    s.n_free_blocks        = blocks_.n_free();
    s.block_size           = blocks_.block_size();
    s.n_waiting            = sched_.n_waiting();
    s.n_running            = sched_.n_running();
    s.n_preemptions        = sched_.n_preemptions();
    s.prefix_hits          = bs.hits;
    s.prefix_lookups       = bs.lookups;
    s.prefix_evictions     = bs.evictions;
    s.prefix_cached_blocks = bs.cached;
    s.n_steps              = n_steps_;
    s.n_tokens_run         = runner_.timings().n_tokens;
    s.kv_bytes             = runner_.kv_bytes();
    s.kv_bytes_per_token   = kv_bytes_per_token(model_);
    return s;
}

std::string BatchEngine::check_invariants() const { return blocks_.check(sched_.holders()); }

}  // namespace appliance

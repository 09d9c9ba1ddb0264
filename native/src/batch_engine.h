// The continuous-batching engine: requests join and leave between steps; every step schedules,
// runs one batched forward pass over all scheduled sequences and samples their next tokens
// (schedule -> run -> postprocess, as nano-vllm's LLMEngine.step()).
#pragma once

#include "batch.h"
#include "block_manager.h"
#include "lora.h"
#include "model_runner.h"
#include "scheduler.h"
#include "sequence.h"
#include "spec_policy.h"

#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

namespace appliance {

struct Model;
class Vocab;

struct BatchEngineParams {
    uint32_t             kv_cache_mb        = 256;  // memory for the paged KV cache
    uint32_t             n_blocks           = 0;    // > 0: exactly this many blocks instead (tests)
    uint32_t             n_blocks_swa       = 0;    // > 0: this many in the sliding-window layers' pool (tests;
                                                    // by default as many as n_blocks)
    uint32_t             block_size         = 16;   // tokens per KV block
    uint32_t             max_batched_tokens = 512;  // tokens per forward pass
    uint32_t             max_seqs           = 16;   // sequences in flight
    int                  n_threads          = 2;
    std::vector<int32_t> eog_tokens;                // end-of-generation token ids (from the vocabulary)
    std::string          model_key;                 // salts the prefix cache (e.g. the model file's hash)
    // early exit (both modes need a shortlist: set_shortlist)
    std::vector<uint32_t> exit_layers;       // adaptive: a token may exit after these layers (ascending, < n_layer)
    std::vector<float>    exit_thresholds;   // the calibrated confidence each exit layer needs (same length)
    uint32_t              draft_exit_layer = 0;  // lossless: the draft runs layers [0, E); 0 means all of them
    uint32_t              draft_max        = 8;  // lossless: most positions drafted per round
    bool                  always_draft     = false;  // lossless: draft even where plain steps measure faster
    GatherPolicy          gather_kv        = GatherPolicy::Auto;  // attention over gathered cells (AttnSpan)
};

struct Request {
    std::vector<int32_t> prompt;
    SamplingParams       sampling;
    uint32_t             max_tokens  = 256;
    bool                 stop_at_eog = true;
    std::string          tenant;  // prefix-cache namespace: a cached prefix is reused only within it
    ExitMode             exit_mode      = ExitMode::Off;
    float                exit_threshold = -1.0f;  // adaptive: exit when confidence > this; < 0: calibrated
    bool                 logprobs       = false;  // score each new token (Event::logprobs, Event::entropies)
    int64_t              adapter        = 0;      // a loaded LoRA adapter's id (BatchEngine::load_adapter); 0: none
    std::string          grammar;  // GBNF (root rule "root") every new token must follow; "": none. Needs the
                                   // engine's vocabulary. Adaptive exits look at the grammar's allowed tokens
                                   // only; lossless drafts ignore it (verification applies it: same output)
    std::vector<std::vector<int32_t>> choices;  // or: the output is one of these token sequences, then ends
                                                // (choices.h); not with a grammar
};

// A LoRA adapter the engine serves.
struct AdapterInfo {
    int64_t     id = 0;
    std::string path;
    float       scale        = 1.0f;  // the user scale it was loaded with
    float       alpha        = 0.0f;
    uint32_t    rank         = 0;     // its largest rank
    uint32_t    n_weights    = 0;     // base weights it adapts
    uint64_t    content_hash = 0;     // of the file's bytes
    uint64_t    identity     = 0;     // content hash and scale: salts the prefix cache
    size_t      file_bytes   = 0;
    uint32_t    n_requests   = 0;     // requests (waiting or running) that use it
    bool        unloading    = false; // unload_adapter was called while requests used it
};

// What a step produced for one request.
struct Event {
    int64_t              id;
    std::vector<int32_t> tokens;         // new tokens (0 or 1 per step)
    std::string          finish_reason;  // "" while running; "stop", "length" or "oom" at the end
    uint32_t             n_prompt        = 0;
    uint32_t             n_prompt_cached = 0;  // prompt tokens served from the prefix cache
    // early exit, for this step's tokens
    uint32_t             layers_run = 0;       // layer evaluations spent deciding the new tokens (drafts included; prompts not)
    uint32_t             n_drafted  = 0;       // lossless: positions drafted
    uint32_t             n_accepted = 0;       // lossless: drafted tokens the full model agreed with
    std::vector<uint16_t> exit_layers;         // per new token: the layer count it was decided at
    // Request::logprobs: per new token, its log-probability, the entropy (nats) of the distribution
    // it was drawn from (the full head's, or the shortlist's for a token that exited early)
    std::vector<float>    logprobs;
    std::vector<float>    entropies;
    std::vector<float>    margins;  // its logit's lead over the best other token it could have been
};

class BatchEngine {
public:
    // vocab: the model's tokenizer (kept by the caller for the engine's lifetime); requests with a
    // grammar need it
    BatchEngine(const Model & model, const BatchEngineParams & params, const Vocab * vocab = nullptr);

    // Queues a request; returns its id. Throws InvalidArgument / ContextOverflowError for a request
    // that can never run (empty prompt, token ids outside the vocabulary, prompt longer than the
    // longest sequence the cache holds).
    int64_t submit(const Request & r);
    // Drops a request at once, returning its blocks. Unknown ids are ignored (it may have finished).
    bool cancel(int64_t id);
    // One scheduling step and forward pass. Returns the events; empty when there is nothing to do.
    std::vector<Event> step();

    // The shortlisted output head both early-exit modes use (the tokens likely to be emitted, from
    // calibration). Throws InvalidArgument for bad ids.
    void set_shortlist(const std::vector<int32_t> & tokens) { runner_.set_shortlist(tokens); }
    std::vector<int32_t> shortlist() const;

    bool     idle() const { return sched_.idle(); }
    uint32_t max_seq_len() const { return sched_.config().max_seq_len; }

    // The two KV pools' sizes in blocks: every layer's pool, or, for a model with sliding-window
    // layers, the global layers' pool and the windowed layers' pool (which only needs each running
    // sequence's window, so kv_cache_mb buys many more global blocks). Throws InvalidArgument.
    struct PoolSizes {
        uint32_t n_blocks = 0, n_blocks_swa = 0;  // n_blocks_swa: 0 when the model has no windowed layers
    };
    static PoolSizes pool_sizes(const Model & m, const BatchEngineParams & p);

    struct Stats {
        uint32_t n_blocks, n_free_blocks, block_size, n_waiting, n_running;
        uint32_t n_blocks_swa, n_free_blocks_swa;  // the sliding-window layers' pool (0, 0 when none)
        uint64_t n_preemptions, prefix_hits, prefix_lookups, prefix_evictions, n_steps, n_tokens_run;
        uint32_t prefix_cached_blocks;
        size_t   kv_bytes;
        size_t   kv_bytes_per_token;      // what every cached position costs (the layers without a window)
        size_t   kv_bytes_per_token_swa;  // per position of the windowed layers' pool (only windows are kept)
        uint64_t spec_steps, plain_decode_steps, drafted, accepted, adaptive_tokens;
        // lossless: the drafting policy's measurements and its last decision per number of sequences
        // (spec_policy.h): the draft's acceptance rate, pass times (microseconds) by rows
        double                                   spec_acceptance;
        std::vector<std::pair<uint32_t, double>> spec_draft_us, spec_verify_us, spec_plain_us;
        std::vector<std::pair<uint32_t, SpecPolicy::Choice>> spec_choices;
        std::vector<uint64_t> exits_per_layer;  // adaptive: tokens decided after each layer count [0, n_layer]
        uint32_t n_adapters;     // LoRA adapters loaded (deferred unloads included)
        size_t   adapter_bytes;  // device memory their stacks take (lora_bank.h)
    };
    Stats stats() const;
    // Hot prefixes across restarts: writes the K/V of the cached full blocks that start `tokens` under
    // `tenant` to `path` (returns how many tokens were saved), and reads such a file back into the
    // prefix cache (returns the tokens loaded; 0 when the cache lacks room). A file from another
    // model or block size is refused with ModelFormatError.
    // The prefix's K/V under adapter `adapter` (0: none) is what is saved; its file loads into the cache
    // under the same tenant and adapter identity (file content and scale), so it never serves others.
    uint32_t save_prefix(const std::vector<int32_t> & tokens, const std::string & tenant, const std::string & path,
                         int64_t adapter = 0);
    uint32_t load_prefix(const std::string & path);

    // LoRA adapters (lora.h), served side by side: requests with different adapters, and without,
    // share one forward pass. load_adapter checks the file against the model (ModelFormatError
    // naming the offending key or tensor) and returns its id (>= 1, never reused). unload_adapter
    // frees an adapter no request uses at once (returns true); while waiting or running requests use
    // it, it defers: new requests naming it are refused from now on, and it is freed when the last
    // of them finishes or is cancelled (returns false). InvalidArgument for an unknown id.
    int64_t                  load_adapter(const std::string & path, float scale);
    bool                     unload_adapter(int64_t id);
    std::vector<AdapterInfo> adapters() const;

    // Block-pool invariants (every block free or held, ref counts match); "" when they hold.
    std::string check_invariants() const;
    const Timings & timings() const { return runner_.timings(); }

private:
    // prefix-cache salt of a request: model, tenant and adapter identity (0: none; the base's salt
    // is the same as before adapters existed, so saved prefix files stay valid)
    uint64_t        salt_for(const std::string & tenant, uint64_t adapter_identity = 0) const;
    // a sequence leaves the engine: its adapter loses a user (and goes if it was being unloaded)
    void            forget(Sequence & s);
    void            finish(Sequence * s, const std::string & reason, std::vector<Event> & events);
    // After s.n_computed grew: registers its new full blocks in the prefix cache (both pools) and
    // gives back the windowed layers' blocks its window has left.
    void            advanced(Sequence & s);
    SeqView         view(Sequence & s) const {
        return SeqView{&s.blocks, blocks_.block_size(), &s.swa_blocks, s.lora_slot};
    }
    // Appends tok to s, or finishes s on an end-of-generation token or at its length limit; false once
    // s is finished (and gone). The step's event for s must exist.
    bool            emit(Sequence & s, int32_t tok, std::vector<Event> & events, TokenScore score = {});
    // the next token of s from a full-vocabulary row: its sampler, under its constraint when it has
    // one (-1: the constraint allows no token)
    static int32_t  sample(Sequence & s, const float * row);
    // the token's score when its request asked for one (a pass over the row), else NaNs
    static TokenScore score(const Sequence & s, const float * row, uint32_t n, int32_t idx);
    // early exit (early_exit.cpp)
    ExitMode        exit_mode_for(const std::vector<Scheduled> & plan) const;
    // each sequence's draft length this step (its own, within the hidden store, its budget and the cache)
    std::vector<uint32_t> draft_lengths(const std::vector<Scheduled> & plan) const;
    void            step_lossless(const std::vector<Scheduled> & plan, std::vector<Event> & events, uint32_t cap);
    // a plain lossless step's rows: would the draft (E = n_layer: the shortlist's best) have agreed?
    void            observe_acceptance(const float * row, int32_t tok);
    void            step_adaptive(const std::vector<Scheduled> & plan, std::vector<Event> & events);
    int32_t         sample_shortlist(Sequence & s, const float * row, TokenScore * sc = nullptr);
    void            check_exit_params() const;

    const Model &                                          model_;
    const Vocab *                                          vocab_;  // nullptr: grammars are refused
    BatchEngineParams                                      params_;
    PoolSizes                                              pools_;
    BlockManager                                           blocks_;
    std::unique_ptr<BlockManager>                          blocks_swa_;  // sliding-window layers (nullptr: none)
    Scheduler                                              sched_;
    ModelRunner                                            runner_;
    std::unordered_set<int32_t>                            eog_;
    std::unordered_map<int64_t, std::unique_ptr<Sequence>> seqs_;
    int64_t                                                next_id_ = 1;
    uint64_t                                               n_steps_ = 0;
    Batch                                                  batch_;
    std::vector<float>                                     logits_;
    SpecPolicy                                             spec_;  // lossless drafting vs plain steps
    uint64_t spec_steps_ = 0, plain_decode_steps_ = 0, drafted_ = 0, accepted_ = 0, adaptive_tokens_ = 0;
    std::vector<uint64_t>                                  exits_per_layer_;
    std::vector<float>                                     vocab_row_;  // scratch: a shortlist row spread over the vocabulary
    struct Adapter {
        AdapterInfo info;
        int32_t     slot = 0;  // in the runner's LoRA bank
    };
    std::unordered_map<int64_t, Adapter>                   adapters_;
    int64_t                                                next_adapter_id_ = 1;
};

}  // namespace appliance

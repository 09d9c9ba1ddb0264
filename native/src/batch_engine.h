// The continuous-batching engine: requests join and leave between steps; every step schedules,
// runs one batched forward pass over all scheduled sequences and samples their next tokens
// (schedule -> run -> postprocess, as nano-vllm's LLMEngine.step()).
#pragma once

#include "batch.h"
#include "block_manager.h"
#include "model_runner.h"
#include "scheduler.h"
#include "sequence.h"

#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

namespace appliance {

struct Model;

struct BatchEngineParams {
    uint32_t             kv_cache_mb        = 256;  // memory for the paged KV cache
    uint32_t             n_blocks           = 0;    // > 0: exactly this many blocks instead (tests)
    uint32_t             block_size         = 16;   // tokens per KV block
    uint32_t             max_batched_tokens = 512;  // tokens per forward pass
    uint32_t             max_seqs           = 16;   // sequences in flight
    int                  n_threads          = 2;
    std::vector<int32_t> eog_tokens;                // end-of-generation token ids (from the vocabulary)
    std::string          model_key;                 // salts the prefix cache (e.g. the model file's hash)
};

struct Request {
    std::vector<int32_t> prompt;
    SamplingParams       sampling;
    uint32_t             max_tokens  = 256;
    bool                 stop_at_eog = true;
    std::string          tenant;  // prefix-cache namespace: a cached prefix is reused only within it
};

// What a step produced for one request.
struct Event {
    int64_t              id;
    std::vector<int32_t> tokens;         // new tokens (0 or 1 per step)
    std::string          finish_reason;  // "" while running; "stop", "length" or "oom" at the end
    uint32_t             n_prompt        = 0;
    uint32_t             n_prompt_cached = 0;  // prompt tokens served from the prefix cache
};

class BatchEngine {
public:
    BatchEngine(const Model & model, const BatchEngineParams & params);

    // Queues a request; returns its id. Throws InvalidArgument / ContextOverflowError for a request
    // that can never run (empty prompt, token ids outside the vocabulary, prompt longer than the
    // longest sequence the cache holds).
    int64_t submit(const Request & r);
    // Drops a request at once, returning its blocks. Unknown ids are ignored (it may have finished).
    bool cancel(int64_t id);
    // One scheduling step and forward pass. Returns the events; empty when there is nothing to do.
    std::vector<Event> step();

    bool     idle() const { return sched_.idle(); }
    uint32_t max_seq_len() const { return sched_.config().max_seq_len; }

    struct Stats {
        uint32_t n_blocks, n_free_blocks, block_size, n_waiting, n_running;
        uint64_t n_preemptions, prefix_hits, prefix_lookups, prefix_evictions, n_steps, n_tokens_run;
        uint32_t prefix_cached_blocks;
        size_t   kv_bytes, kv_bytes_per_token;
    };
    Stats stats() const;
    // Hot prefixes across restarts: writes the K/V of the cached full blocks that start `tokens` under
    // `tenant` to `path` (returns how many tokens were saved), and reads such a file back into the
    // prefix cache (returns the tokens loaded; 0 when the cache lacks room). A file from another
    // model or block size is refused with ModelFormatError.
    uint32_t save_prefix(const std::vector<int32_t> & tokens, const std::string & tenant, const std::string & path);
    uint32_t load_prefix(const std::string & path);

    // Block-pool invariants (every block free or held, ref counts match); "" when they hold.
    std::string check_invariants() const;
    const Timings & timings() const { return runner_.timings(); }

private:
    static uint32_t n_blocks_for(const Model & m, const BatchEngineParams & p);
    uint64_t        salt_for(const std::string & tenant) const;
    void            finish(Sequence * s, const std::string & reason, std::vector<Event> & events);
    void            register_full_blocks(Sequence & s);

    const Model &                                          model_;
    BatchEngineParams                                      params_;
    BlockManager                                           blocks_;
    Scheduler                                              sched_;
    ModelRunner                                            runner_;
    std::unordered_set<int32_t>                            eog_;
    std::unordered_map<int64_t, std::unique_ptr<Sequence>> seqs_;
    int64_t                                                next_id_ = 1;
    uint64_t                                               n_steps_ = 0;
    Batch                                                  batch_;
    std::vector<float>                                     logits_;
};

}  // namespace appliance

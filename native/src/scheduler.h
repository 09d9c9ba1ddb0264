// Decides which sequences run in the next forward pass and how many tokens each (vLLM V1 style: no
// separate prefill and decode phases; each sequence advances its computed tokens toward its
// length). Running sequences go first so streams keep their pace; waiting ones fill the rest of the
// token budget, chunked when their prompt is longer. When blocks run out the newest running
// sequence is preempted (its blocks released, recomputed later, largely from the prefix cache).
#pragma once

#include "block_manager.h"
#include "sequence.h"

#include <cstdint>
#include <deque>
#include <vector>

namespace appliance {

struct SchedulerConfig {
    uint32_t max_batched_tokens = 512;  // tokens per forward pass
    uint32_t max_seqs           = 16;   // sequences running at once
    uint32_t max_seq_len        = 0;    // longest sequence (prompt + output); set by the engine
};

struct Scheduled {
    Sequence * seq;
    uint32_t   n_tokens;  // tokens[n_computed, n_computed + n_tokens) run this pass
};

class Scheduler {
public:
    Scheduler(BlockManager & blocks, const SchedulerConfig & cfg) : bm_(blocks), cfg_(cfg) {}

    void add(Sequence * s);     // joins the waiting queue
    void remove(Sequence * s);  // finished or cancelled: leaves its queue, releases its blocks

    // The next pass. Sequences that can never fit the cache are returned in `out_of_memory`.
    std::vector<Scheduled> schedule(std::vector<Sequence *> & out_of_memory);

    // Blocks for positions [0, n_tokens) of a running sequence, from free blocks only (no preemption);
    // false when there are not enough (speculative drafting then drafts less).
    bool     grow(Sequence & s, uint32_t n_tokens) { return ensure_blocks(s, n_tokens); }

    bool     idle() const { return waiting_.empty() && running_.empty(); }
    uint32_t n_waiting() const { return static_cast<uint32_t>(waiting_.size()); }
    uint32_t n_running() const { return static_cast<uint32_t>(running_.size()); }
    uint64_t n_preemptions() const { return preemptions_; }
    const SchedulerConfig & config() const { return cfg_; }
    // the block tables of every sequence holding blocks (for invariant checks)
    std::vector<const std::vector<int32_t> *> holders() const;

private:
    bool ensure_blocks(Sequence & s, uint32_t n_tokens);  // blocks for positions [0, n_tokens)
    void preempt(Sequence * s);
    void release(Sequence & s);

    BlockManager &          bm_;
    SchedulerConfig         cfg_;
    std::deque<Sequence *>  waiting_;
    std::vector<Sequence *> running_;  // oldest first
    uint64_t                preemptions_ = 0;
};

}  // namespace appliance

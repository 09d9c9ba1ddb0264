// Decides which sequences run in the next forward pass and how many tokens each (vLLM V1 style: no
// separate prefill and decode phases; each sequence advances its computed tokens toward its
// length). Running sequences go first so streams keep their pace; waiting ones fill the rest of the
// token budget, chunked when their prompt is longer. When blocks run out the newest running
// sequence is preempted (its blocks released, recomputed later, largely from the prefix cache).
//
// Models with sliding-window layers keep those layers' K/V in a second pool: a sequence holds
// blocks there only for the last n_swa positions its next token can see (plus the ones this pass
// writes), and gives each block back as soon as the window has moved past it.
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
    uint32_t n_swa              = 0;    // sliding window of the windowed layers (0: none)
};

struct Scheduled {
    Sequence * seq;
    uint32_t   n_tokens;  // tokens[n_computed, n_computed + n_tokens) run this pass
};

// A cached prefix a sequence can start from: `blocks` hold its full blocks (one reference each, in
// both pools), `swa_blocks` the windowed layers' blocks (-1 before the window), `hashes` their
// chained hashes.
struct PrefixHit {
    std::vector<int32_t>  blocks, swa_blocks;
    std::vector<uint64_t> hashes;
    uint32_t              n_matched = 0;  // blocks the global pool matched, before the window check
};

// The first block a token at position `pos` still sees through a window of n_swa positions.
inline uint32_t first_window_block(uint32_t pos, uint32_t n_swa, uint32_t block_size) {
    return pos + 1 > n_swa ? (pos + 1 - n_swa) / block_size : 0;
}

class Scheduler {
public:
    // swa: the sliding-window layers' pool (nullptr when the model has none; then cfg.n_swa is 0)
    Scheduler(BlockManager & blocks, BlockManager * swa, const SchedulerConfig & cfg);

    void add(Sequence * s);     // joins the waiting queue
    void remove(Sequence * s);  // finished or cancelled: leaves its queue, releases its blocks

    // The next pass. Sequences that can never fit the cache are returned in `out_of_memory`.
    std::vector<Scheduled> schedule(std::vector<Sequence *> & out_of_memory);

    // Blocks for positions [0, n_tokens) of a running sequence, from free blocks only (no preemption);
    // false when there are not enough (speculative drafting then drafts less).
    bool     grow(Sequence & s, uint32_t n_tokens) { return ensure_blocks(s, n_tokens); }

    // After a pass: gives back the windowed layers' blocks that no later token of `s` can see.
    void     slide_window(Sequence & s);

    // The longest cached prefix of `tokens` (at most max_blocks blocks) whose blocks are in both pools
    // (in the windowed pool only those a token right after it sees), with a reference taken to each.
    PrefixHit match_prefix(const std::vector<int32_t> & tokens, uint64_t salt, uint32_t max_blocks);
    void      release(PrefixHit & hit);

    bool     idle() const { return waiting_.empty() && running_.empty(); }
    uint32_t n_waiting() const { return static_cast<uint32_t>(waiting_.size()); }
    uint32_t n_running() const { return static_cast<uint32_t>(running_.size()); }
    uint64_t n_preemptions() const { return preemptions_; }
    // Prefix reuse by admitted sequences: blocks looked up, and blocks reused (after the window check;
    // save_prefix's lookups are not counted).
    uint64_t n_prefix_lookups() const { return prefix_lookups_; }
    uint64_t n_prefix_hits() const { return prefix_hits_; }
    const SchedulerConfig & config() const { return cfg_; }
    // the block tables of every sequence holding blocks (for invariant checks), per pool
    std::vector<const std::vector<int32_t> *> holders() const;
    std::vector<const std::vector<int32_t> *> swa_holders() const;

private:
    bool     ensure_blocks(Sequence & s, uint32_t n_tokens);  // blocks for positions [0, n_tokens)
    // blocks positions [0, n_tokens) can be given at most: those held plus the free ones
    uint32_t room(const Sequence & s) const;
    void     preempt(Sequence * s);
    void     release(Sequence & s);

    BlockManager &          bm_;
    BlockManager *          swa_;
    SchedulerConfig         cfg_;
    std::deque<Sequence *>  waiting_;
    std::vector<Sequence *> running_;  // oldest first
    uint64_t                preemptions_ = 0;
    uint64_t                prefix_lookups_ = 0, prefix_hits_ = 0;
};

}  // namespace appliance

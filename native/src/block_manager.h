// Bookkeeping of the paged KV cache: which fixed-size blocks of cells are free, which sequences
// hold them (reference counts), and the prefix cache over full blocks.
//
// Prefix cache (as vLLM's): a full block is identified by a chained hash of (parent block's hash,
// its token ids, salt), the salt covering model and tenant so one tenant's cached prefix never
// serves another. A hit is confirmed against the stored token ids, never trusted on the hash alone.
// Blocks whose last holder finished stay cached in LRU order and are reused on a hit or evicted
// when a fresh block is needed; a finished sequence's blocks are released tail first, so its tail
// is evicted before its head (the shared system prompt).
#pragma once

#include <cstdint>
#include <list>
#include <string>
#include <unordered_map>
#include <vector>

namespace appliance {

class BlockManager {
public:
    BlockManager(uint32_t n_blocks, uint32_t block_size);

    uint32_t n_blocks() const { return static_cast<uint32_t>(blocks_.size()); }
    uint32_t block_size() const { return block_size_; }
    uint32_t n_free() const { return static_cast<uint32_t>(free_.size()); }  // includes cached blocks

    // chained hash of one full block
    static uint64_t hash_block(uint64_t parent, const int32_t * tokens, uint32_t n, uint64_t salt);

    // Takes the longest run of cached full blocks that starts `tokens` (at most max_blocks of them),
    // adding a reference to each. Returns their ids; `hashes` receives their chained hashes.
    std::vector<int32_t> match_prefix(const std::vector<int32_t> & tokens, uint64_t salt, uint32_t max_blocks,
                                      std::vector<uint64_t> & hashes);

    // The cached block holding `hash` and exactly `tokens` (a full block), or -1. Takes nothing.
    int32_t find_cached(uint64_t hash, const int32_t * tokens) const;

    // Adds a reference to a block (a cached free one leaves the free list). Precondition: valid id.
    void acquire(int32_t block);

    // A fresh block (evicting the least recently used cached one if no plain free block is left).
    // Precondition: n_free() > 0.
    int32_t allocate();

    // Registers a block that just became full under its chained hash, so later prompts can reuse it.
    void register_full(int32_t block, uint64_t hash, const int32_t * tokens);

    // Drops one reference to each block, last block first; entries < 0 (no block) are skipped.
    void release(const std::vector<int32_t> & blocks);

    struct Stats {
        uint64_t evictions = 0;
        uint32_t cached = 0;  // blocks currently in the prefix cache (held or free)
    };
    Stats stats() const;

    // Every block is free xor held; ref counts equal `holders` (each sequence's block table, where
    // entries < 0 hold nothing); the hash index points at blocks carrying that hash. Returns "" when all hold, else what broke.
    std::string check(const std::vector<const std::vector<int32_t> *> & holders) const;

private:
    struct Block {
        int32_t                         ref    = 0;
        uint64_t                        hash   = 0;  // 0: not in the prefix cache
        std::vector<int32_t>            tokens;      // its token ids while cached
        std::list<int32_t>::iterator    free_it;     // position in free_ when ref == 0
    };

    void take(int32_t b);  // remove a free block from the free list

    uint32_t                              block_size_;
    std::vector<Block>                    blocks_;
    std::list<int32_t>                    free_;  // front: plain free blocks, then cached ones oldest first
    std::unordered_map<uint64_t, int32_t> index_;
    uint64_t                              evictions_ = 0;
};

}  // namespace appliance

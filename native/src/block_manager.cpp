#include "block_manager.h"

#include "hash.h"

#include <cassert>
#include <cstring>

namespace appliance {

BlockManager::BlockManager(uint32_t n_blocks, uint32_t block_size) : block_size_(block_size), blocks_(n_blocks) {
    assert(n_blocks > 0 && block_size > 0);
    for (uint32_t b = 0; b < n_blocks; ++b) {
        blocks_[b].free_it = free_.insert(free_.end(), static_cast<int32_t>(b));
    }
}

uint64_t BlockManager::hash_block(uint64_t parent, const int32_t * tokens, uint32_t n, uint64_t salt) {
    uint64_t h = mix64(parent, salt);
    for (uint32_t i = 0; i < n; ++i) {
        h = mix64(h, static_cast<uint32_t>(tokens[i]));
    }
    return h == 0 ? 1 : h;  // 0 means "not cached"
}

void BlockManager::take(int32_t b) {
    assert(blocks_[b].ref == 0);
    free_.erase(blocks_[b].free_it);
}

std::vector<int32_t> BlockManager::match_prefix(const std::vector<int32_t> & tokens, uint64_t salt, uint32_t max_blocks,
                                                std::vector<uint64_t> & hashes) {
    std::vector<int32_t> out;
    hashes.clear();
    uint64_t parent = 0;
    for (uint32_t i = 0; i < max_blocks && (i + 1) * static_cast<size_t>(block_size_) <= tokens.size(); ++i) {
        const int32_t * t = tokens.data() + static_cast<size_t>(i) * block_size_;
        const uint64_t  h = hash_block(parent, t, block_size_, salt);
        const int32_t   b = find_cached(h, t);  // -1 also on a hash collision: never serve it
        if (b < 0) {
            break;
        }
        acquire(b);
        out.push_back(b);
        hashes.push_back(h);
        parent = h;
    }
    return out;
}

int32_t BlockManager::find_cached(uint64_t hash, const int32_t * tokens) const {
    auto it = index_.find(hash);
    if (it == index_.end() || std::memcmp(blocks_[it->second].tokens.data(), tokens, block_size_ * sizeof(int32_t)) != 0) {
        return -1;
    }
    return it->second;
}

void BlockManager::acquire(int32_t block) {
    assert(block >= 0 && static_cast<size_t>(block) < blocks_.size());
    if (blocks_[block].ref == 0) {
        take(block);
    }
    ++blocks_[block].ref;
}

int32_t BlockManager::allocate() {
    assert(!free_.empty());
    const int32_t b = free_.front();
    free_.pop_front();
    Block & blk = blocks_[b];
    if (blk.hash != 0) {  // evict it from the prefix cache
        auto it = index_.find(blk.hash);
        if (it != index_.end() && it->second == b) {
            index_.erase(it);
        }
        blk.hash = 0;
        blk.tokens.clear();
        ++evictions_;
    }
    blk.ref = 1;
    return b;
}

void BlockManager::register_full(int32_t block, uint64_t hash, const int32_t * tokens) {
    Block & blk = blocks_[block];
    assert(blk.ref > 0);
    if (blk.hash != 0 || index_.count(hash) != 0) {
        return;  // already cached (this block, or another with the same content)
    }
    blk.hash = hash;
    blk.tokens.assign(tokens, tokens + block_size_);
    index_[hash] = block;
}

void BlockManager::release(const std::vector<int32_t> & blocks) {
    for (auto it = blocks.rbegin(); it != blocks.rend(); ++it) {
        if (*it < 0) {
            continue;
        }
        Block & blk = blocks_[*it];
        assert(blk.ref > 0);
        if (--blk.ref == 0) {
            // cached blocks queue up for eviction (most recent last); plain ones are reused first
            blk.free_it = blk.hash != 0 ? free_.insert(free_.end(), *it) : free_.insert(free_.begin(), *it);
        }
    }
}

BlockManager::Stats BlockManager::stats() const {
    Stats s;
    s.evictions = evictions_;
    s.cached    = static_cast<uint32_t>(index_.size());
    return s;
}

std::string BlockManager::check(const std::vector<const std::vector<int32_t> *> & holders) const {
    std::vector<int32_t> refs(blocks_.size(), 0);
    for (const auto * table : holders) {
        for (int32_t b : *table) {
            if (b < 0) continue;  // a released slot (sliding-window tables)
            if (static_cast<size_t>(b) >= blocks_.size()) return "block id out of range in a block table";
            ++refs[b];
        }
    }
    std::vector<char> in_free(blocks_.size(), 0);
    for (int32_t b : free_) {
        if (in_free[b]) return "block " + std::to_string(b) + " is twice in the free list";
        in_free[b] = 1;
    }
    for (size_t b = 0; b < blocks_.size(); ++b) {
        if (blocks_[b].ref != refs[b]) {
            return "block " + std::to_string(b) + " has ref " + std::to_string(blocks_[b].ref) + " but " +
                   std::to_string(refs[b]) + " holders";
        }
        if ((blocks_[b].ref == 0) != (in_free[b] != 0)) {
            return "block " + std::to_string(b) + " is " + (in_free[b] ? "free but held" : "neither free nor held");
        }
    }
    for (const auto & [h, b] : index_) {
        if (blocks_[b].hash != h) return "prefix index points at block " + std::to_string(b) + " with another hash";
    }
    return "";
}

}  // namespace appliance

#include "scheduler.h"

#include <algorithm>
#include <cassert>

namespace appliance {

namespace {

uint32_t n_held(const std::vector<int32_t> & table) {
    return static_cast<uint32_t>(std::count_if(table.begin(), table.end(), [](int32_t b) { return b >= 0; }));
}

}  // namespace

Scheduler::Scheduler(BlockManager & blocks, BlockManager * swa, const SchedulerConfig & cfg)
    : bm_(blocks), swa_(swa), cfg_(cfg) {
    assert((swa == nullptr) == (cfg.n_swa == 0));
    assert(swa == nullptr || swa->block_size() == blocks.block_size());
}

void Scheduler::add(Sequence * s) {
    s->status = SeqStatus::Waiting;
    waiting_.push_back(s);
}

void Scheduler::release(Sequence & s) {
    bm_.release(s.blocks);
    if (swa_) swa_->release(s.swa_blocks);
    s.blocks.clear();
    s.swa_blocks.clear();
    s.block_hashes.clear();
    s.n_computed = 0;
}

void Scheduler::remove(Sequence * s) {
    waiting_.erase(std::remove(waiting_.begin(), waiting_.end(), s), waiting_.end());
    running_.erase(std::remove(running_.begin(), running_.end(), s), running_.end());
    release(*s);
    s->status = SeqStatus::Finished;
}

void Scheduler::preempt(Sequence * s) {
    running_.erase(std::remove(running_.begin(), running_.end(), s), running_.end());
    release(*s);
    s->status = SeqStatus::Waiting;
    ++s->n_preemptions;
    ++preemptions_;
    waiting_.push_front(s);
}

bool Scheduler::ensure_blocks(Sequence & s, uint32_t n_tokens) {
    const uint32_t bs     = bm_.block_size();
    const uint32_t need   = (n_tokens + bs - 1) / bs;
    const uint32_t need_g = need > s.blocks.size() ? need - static_cast<uint32_t>(s.blocks.size()) : 0;
    // the windowed pool: blocks from the first one the next token sees up to the last one written
    const uint32_t lo     = swa_ ? first_window_block(s.n_computed, cfg_.n_swa, bs) : 0;
    uint32_t       need_s = 0;
    if (swa_) {
        for (uint32_t j = lo; j < need; ++j) {
            need_s += j >= s.swa_blocks.size() || s.swa_blocks[j] < 0;
        }
    }
    if (need_g > bm_.n_free() || (swa_ && need_s > swa_->n_free())) {
        return false;
    }
    while (s.blocks.size() < need) {
        s.blocks.push_back(bm_.allocate());
    }
    if (swa_ && need_s > 0) {
        if (s.swa_blocks.size() < need) s.swa_blocks.resize(need, -1);
        for (uint32_t j = lo; j < need; ++j) {
            if (s.swa_blocks[j] < 0) s.swa_blocks[j] = swa_->allocate();
        }
    }
    return true;
}

uint32_t Scheduler::room(const Sequence & s) const {
    const uint32_t bs     = bm_.block_size();
    const uint32_t room_g = (static_cast<uint32_t>(s.blocks.size()) + bm_.n_free()) * bs;
    if (!swa_) {
        return room_g;
    }
    const uint32_t lo   = first_window_block(s.n_computed, cfg_.n_swa, bs);
    const uint32_t held = s.swa_blocks.size() > lo ? static_cast<uint32_t>(s.swa_blocks.size()) - lo : 0;
    return std::min(room_g, (lo + held + swa_->n_free()) * bs);
}

void Scheduler::slide_window(Sequence & s) {
    if (!swa_) {
        return;
    }
    const uint32_t lo = std::min<uint32_t>(first_window_block(s.n_computed, cfg_.n_swa, bm_.block_size()),
                                           static_cast<uint32_t>(s.swa_blocks.size()));
    for (uint32_t j = 0; j < lo; ++j) {
        if (s.swa_blocks[j] >= 0) {
            swa_->release({s.swa_blocks[j]});  // stays in the prefix cache until evicted
            s.swa_blocks[j] = -1;
        }
    }
}

PrefixHit Scheduler::match_prefix(const std::vector<int32_t> & tokens, uint64_t salt, uint32_t max_blocks) {
    PrefixHit hit;
    hit.blocks    = bm_.match_prefix(tokens, salt, max_blocks, hit.hashes);
    hit.n_matched = static_cast<uint32_t>(hit.blocks.size());
    if (!swa_) {
        return hit;
    }
    // a token right after k cached blocks also needs the windowed layers' blocks it sees
    const uint32_t       bs = bm_.block_size();
    uint32_t             k  = static_cast<uint32_t>(hit.blocks.size());
    std::vector<int32_t> window;  // those blocks, for the k found
    for (; k > 0; --k) {
        window.clear();
        for (uint32_t j = first_window_block(k * bs, cfg_.n_swa, bs); j < k; ++j) {
            window.push_back(swa_->find_cached(hit.hashes[j], tokens.data() + static_cast<size_t>(j) * bs));
            if (window.back() < 0) break;
        }
        if (window.empty() || window.back() >= 0) break;
    }
    if (k == 0) window.clear();
    bm_.release(std::vector<int32_t>(hit.blocks.begin() + k, hit.blocks.end()));
    hit.blocks.resize(k);
    hit.hashes.resize(k);
    hit.swa_blocks.assign(k - window.size(), -1);
    for (int32_t b : window) {
        swa_->acquire(b);
        hit.swa_blocks.push_back(b);
    }
    return hit;
}

void Scheduler::release(PrefixHit & hit) {
    bm_.release(hit.blocks);
    if (swa_) swa_->release(hit.swa_blocks);
    hit = PrefixHit{};
}

std::vector<Scheduled> Scheduler::schedule(std::vector<Sequence *> & out_of_memory) {
    std::vector<Scheduled> out;
    uint32_t budget = cfg_.max_batched_tokens;

    // blocks for the next n tokens of s, or for as many of them as the free blocks allow
    auto fit = [this](Sequence & s, uint32_t & n) {
        if (ensure_blocks(s, s.n_computed + n)) return true;
        const uint32_t r = room(s);
        if (r <= s.n_computed) return false;
        n = std::min(n, r - s.n_computed);
        return ensure_blocks(s, s.n_computed + n);
    };

    // running sequences first (decodes, or the next chunk of a long prompt), oldest first
    for (size_t i = 0; i < running_.size() && budget > 0;) {
        Sequence * s = running_[i];
        uint32_t   n = std::min<uint32_t>(static_cast<uint32_t>(s->tokens.size()) - s->n_computed, budget);
        assert(n > 0);
        bool fits = fit(*s, n);
        while (!fits && running_.back() != s) {
            preempt(running_.back());  // the newest gives way
            fits = fit(*s, n);
        }
        if (!fits) {
            if (running_.size() == 1) {  // alone and still too big: the cache can never hold it
                running_.erase(running_.begin() + static_cast<std::ptrdiff_t>(i));
                release(*s);
                out_of_memory.push_back(s);
            } else {
                preempt(s);
            }
            continue;
        }
        out.push_back({s, n});
        budget -= n;
        ++i;
    }

    // then waiting sequences, in arrival order, as far as budget, slots and blocks allow
    while (!waiting_.empty() && budget > 0 && running_.size() < cfg_.max_seqs) {
        Sequence * s = waiting_.front();
        if (s->blocks.empty()) {
            // reuse cached full blocks of its prefix; at least one token must run to give logits
            const uint32_t max_blocks = (static_cast<uint32_t>(s->tokens.size()) - 1) / bm_.block_size();
            PrefixHit      hit        = match_prefix(s->tokens, s->salt, max_blocks);
            prefix_lookups_ += std::min<uint32_t>(max_blocks, hit.n_matched + 1);  // up to the first miss
            prefix_hits_ += hit.blocks.size();
            s->blocks       = std::move(hit.blocks);
            s->swa_blocks   = std::move(hit.swa_blocks);
            s->block_hashes = std::move(hit.hashes);
            s->n_computed   = static_cast<uint32_t>(s->blocks.size()) * bm_.block_size();
            if (!s->scheduled_once) {
                s->n_prompt_cached = std::min(s->n_computed, s->n_prompt);
            }
        }
        uint32_t n = std::min<uint32_t>(static_cast<uint32_t>(s->tokens.size()) - s->n_computed, budget);
        if (!fit(*s, n)) {
            const bool alone = running_.empty() && bm_.n_free() + n_held(s->blocks) == bm_.n_blocks() &&
                               (!swa_ || swa_->n_free() + n_held(s->swa_blocks) == swa_->n_blocks());
            if (alone) {
                waiting_.pop_front();  // even an empty cache cannot hold its next token
                release(*s);
                out_of_memory.push_back(s);
                continue;
            }
            release(*s);  // give the prefix blocks back until there is room
            break;
        }
        waiting_.pop_front();
        s->status         = SeqStatus::Running;
        s->scheduled_once = true;
        running_.push_back(s);
        out.push_back({s, n});
        budget -= n;
    }
    return out;
}

std::vector<const std::vector<int32_t> *> Scheduler::holders() const {
    std::vector<const std::vector<int32_t> *> out;
    for (const Sequence * s : running_) out.push_back(&s->blocks);
    for (const Sequence * s : waiting_) out.push_back(&s->blocks);
    return out;
}

std::vector<const std::vector<int32_t> *> Scheduler::swa_holders() const {
    std::vector<const std::vector<int32_t> *> out;
    for (const Sequence * s : running_) out.push_back(&s->swa_blocks);
    for (const Sequence * s : waiting_) out.push_back(&s->swa_blocks);
    return out;
}

}  // namespace appliance

#include "scheduler.h"

#include <algorithm>
#include <cassert>

namespace appliance {

void Scheduler::add(Sequence * s) {
    s->status = SeqStatus::Waiting;
    waiting_.push_back(s);
}

void Scheduler::release(Sequence & s) {
    bm_.release(s.blocks);
    s.blocks.clear();
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
    const uint32_t bs   = bm_.block_size();
    const uint32_t need = (n_tokens + bs - 1) / bs;
    if (need <= s.blocks.size()) {
        return true;
    }
    if (need - s.blocks.size() > bm_.n_free()) {
        return false;
    }
    while (s.blocks.size() < need) {
        s.blocks.push_back(bm_.allocate());
    }
    return true;
}

std::vector<Scheduled> Scheduler::schedule(std::vector<Sequence *> & out_of_memory) {
    std::vector<Scheduled> out;
    uint32_t budget = cfg_.max_batched_tokens;

    // running sequences first (decodes, or the next chunk of a long prompt), oldest first
    for (size_t i = 0; i < running_.size() && budget > 0;) {
        Sequence * s = running_[i];
        const uint32_t n = std::min<uint32_t>(static_cast<uint32_t>(s->tokens.size()) - s->n_computed, budget);
        assert(n > 0);
        bool fits = ensure_blocks(*s, s->n_computed + n);
        while (!fits && running_.back() != s) {
            preempt(running_.back());  // the newest gives way
            fits = ensure_blocks(*s, s->n_computed + n);
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
            s->blocks     = bm_.match_prefix(s->tokens, s->salt, max_blocks, s->block_hashes);
            s->n_computed = static_cast<uint32_t>(s->blocks.size()) * bm_.block_size();
            if (!s->scheduled_once) {
                s->n_prompt_cached = std::min(s->n_computed, s->n_prompt);
            }
        }
        uint32_t n = std::min<uint32_t>(static_cast<uint32_t>(s->tokens.size()) - s->n_computed, budget);
        if (!ensure_blocks(*s, s->n_computed + n)) {
            // take the chunk that fits in the blocks left, if any
            const uint32_t room = (static_cast<uint32_t>(s->blocks.size()) + bm_.n_free()) * bm_.block_size();
            n = room > s->n_computed ? std::min(n, room - s->n_computed) : 0;
            if (n == 0 || !ensure_blocks(*s, s->n_computed + n)) {
                if (running_.empty() && bm_.n_free() + static_cast<uint32_t>(s->blocks.size()) == bm_.n_blocks()) {
                    waiting_.pop_front();  // even an empty cache cannot hold its next token
                    release(*s);
                    out_of_memory.push_back(s);
                    continue;
                }
                release(*s);  // give the prefix blocks back until there is room
                break;
            }
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

}  // namespace appliance

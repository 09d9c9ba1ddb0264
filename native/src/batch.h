// One forward pass's worth of tokens, possibly from many sequences, and where each sequence's
// positions live in the paged KV cache.
#pragma once

#include <cstdint>
#include <vector>

namespace appliance {

// A sequence as the model runner sees it: its block tables.
struct SeqView {
    const std::vector<int32_t> * blocks = nullptr;  // block ids, position p lives in blocks[p / block_size]
    uint32_t                     block_size = 0;
    const std::vector<int32_t> * swa_blocks = nullptr;  // the same for sliding-window layers (their own pool)
    int32_t                      lora_slot  = 0;        // the runner's LoRA bank slot of its adapter (0: none)

    // precondition: p / block_size < blocks->size()
    int64_t cell(int32_t p) const {
        return static_cast<int64_t>((*blocks)[p / block_size]) * block_size + p % block_size;
    }
    // precondition: swa_blocks holds a block for p (p is inside the window of a token in the pass)
    int64_t cell_swa(int32_t p) const {
        return static_cast<int64_t>((*swa_blocks)[p / block_size]) * block_size + p % block_size;
    }
};

struct Batch {
    std::vector<int32_t> tokens;   // token id per entry
    std::vector<int32_t> pos;      // its position in its sequence
    std::vector<int32_t> seq;      // index into views
    std::vector<int32_t> out_ids;  // entries whose logits are wanted, ascending
    std::vector<int32_t> hidden_rows;  // partial passes: each entry's row of the hidden store
    std::vector<SeqView> views;

    uint32_t size() const { return static_cast<uint32_t>(tokens.size()); }
    void     add(int32_t token, int32_t p, int32_t s, bool output) {
        if (output) out_ids.push_back(static_cast<int32_t>(tokens.size()));
        tokens.push_back(token);
        pos.push_back(p);
        seq.push_back(s);
    }
    void clear() {
        tokens.clear();
        pos.clear();
        seq.clear();
        out_ids.clear();
        hidden_rows.clear();
        views.clear();
    }
};

}  // namespace appliance

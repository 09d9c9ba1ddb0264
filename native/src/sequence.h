// One request as the engine tracks it: its tokens, how many of them the KV cache holds, its block
// table, its sampler and limits.
#pragma once

#include "constraint.h"
#include "sampler.h"

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace appliance {

enum class SeqStatus { Waiting, Running, Finished };

// How a request decodes: every layer, self-speculatively (a cheap draft verified by the full model:
// the same output), or with confidence-based early exit (faster, may differ from full depth).
enum class ExitMode : uint8_t { Off, Lossless, Adaptive };

struct Sequence {
    Sequence(int64_t id_, std::vector<int32_t> prompt, uint64_t salt_, const SamplingParams & sp, int32_t n_vocab)
        : id(id_), tokens(std::move(prompt)), n_prompt(static_cast<uint32_t>(tokens.size())), salt(salt_), sampler(sp, n_vocab) {}

    int64_t              id;
    std::vector<int32_t> tokens;              // prompt, then generated tokens
    uint32_t             n_prompt;
    uint32_t             n_computed = 0;      // leading tokens whose K/V are in the cache
    std::vector<int32_t> blocks;              // block table: position p lives in blocks[p / block_size]
    std::vector<int32_t> swa_blocks;          // the sliding-window layers' block table (models with such
                                              // layers): -1 where the window has moved past the block
    std::vector<uint64_t> block_hashes;       // chained hashes of the leading full blocks
    uint64_t             salt;                // model + tenant + adapter: keys the prefix cache
    int64_t              adapter   = 0;       // the engine's adapter id (0: none)
    int32_t              lora_slot = 0;       // its slot in the runner's LoRA bank (0: none)
    uint32_t             max_tokens = 256;
    bool                 stop_at_eog = true;
    Sampler              sampler;
    std::unique_ptr<Constraint> constraint;   // a grammar or choices every sampled token keeps to (nullptr: none)
    SeqStatus            status = SeqStatus::Waiting;
    std::string          finish_reason;       // "stop", "length" once finished
    uint32_t             n_prompt_cached = 0; // prompt tokens the prefix cache served at first schedule
    bool                 scheduled_once = false;
    uint32_t             n_preemptions = 0;
    ExitMode             exit_mode = ExitMode::Off;
    float                exit_threshold = -1.0f;  // adaptive: < 0 uses the calibrated threshold of each exit layer
    bool                 logprobs = false;        // score each emitted token (Request::logprobs)
    uint32_t             draft_len = 4;           // lossless: positions drafted per round, adapted to acceptance

    uint32_t n_generated() const { return static_cast<uint32_t>(tokens.size()) - n_prompt; }
};

}  // namespace appliance

// How attention reads one KV pool in a pass: the first n_kv cells of the pool directly (the mask
// picking each token's cells), or, when the sequences' blocks lie scattered far apart in the pool
// (a long-running server whose prefix cache has spread them out), their visible cells gathered into
// n_kv consecutive columns. Scanning masked-out cells costs every query row; gathering costs one
// copy per visible cell, so the cheaper of the two is chosen per pass.
#pragma once

#include "batch.h"
#include "ggml.h"

#include <cstdint>
#include <vector>

namespace appliance {

enum class GatherPolicy : uint8_t { Auto, Never, Always };

struct AttnSpan {
    bool                 gather = false;
    uint32_t             n_kv   = 0;  // columns attention reads (padded)
    std::vector<int32_t> rows;        // gather: the pool cell of each column
    std::vector<int32_t> base;        // gather: per view, the first position it sees
    std::vector<int32_t> off;         // gather: per view, the column of that position
};

// Plans the span over one pool: the windowed layers' (n_swa > 0: a token at p sees p - n_swa + 1 .. p,
// in the views' swa tables) or the global layers' (n_swa == 0: 0 .. p). rows_per_token: query rows
// each token adds to the attention (its heads).
// Preconditions: every view holds blocks for the positions its tokens see; n_cells > 0.
// policy: Auto picks the cheaper way; Never and Always are for tests and measurements.
void plan_span(const Batch & batch, uint32_t n_swa, uint32_t n_cells, uint32_t rows_per_token, GatherPolicy policy,
               AttnSpan & out);

// The mask of that span: [n_kv, n_tokens], 0 where token i may attend, -inf elsewhere.
void fill_mask(const Batch & batch, uint32_t n_swa, const AttnSpan & span, std::vector<ggml_fp16_t> & mask);

}  // namespace appliance

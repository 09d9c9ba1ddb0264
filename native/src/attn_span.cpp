#include "attn_span.h"

#include <algorithm>
#include <cmath>

namespace appliance {

namespace {

// attention looks at a multiple of this many columns, so the graph keeps its shape across steps
constexpr uint32_t kKvPad = 256;

// copying a visible cell's K and V (and reading them as F32) costs about as much as scanning this many
// masked cells in one query row (measured order of magnitude on x86-64: ~100 ns against ~1.5 ns)
constexpr uint64_t kGatherCost = 64;

uint32_t padded(uint64_t n) { return static_cast<uint32_t>(std::max<uint64_t>(kKvPad, GGML_PAD(n, kKvPad))); }

int64_t cell_of(const SeqView & v, int32_t p, bool windowed) { return windowed ? v.cell_swa(p) : v.cell(p); }

// the first position a token at p sees
int32_t first_seen(int32_t p, uint32_t n_swa) {
    return n_swa > 0 ? std::max<int32_t>(0, p - static_cast<int32_t>(n_swa) + 1) : 0;
}

}  // namespace

void plan_span(const Batch & batch, uint32_t n_swa, uint32_t n_cells, uint32_t rows_per_token, GatherPolicy policy,
               AttnSpan & out) {
    const bool   windowed = n_swa > 0;
    const size_t n_views  = batch.views.size();
    // per view: the positions its tokens see, [lo, hi]
    std::vector<int32_t> lo(n_views, INT32_MAX), hi(n_views, -1);
    for (uint32_t i = 0; i < batch.size(); ++i) {
        const int32_t j = batch.seq[i];
        lo[j]           = std::min(lo[j], first_seen(batch.pos[i], n_swa));
        hi[j]           = std::max(hi[j], batch.pos[i]);
    }
    // the direct span: up to the last cell any token sees, block by block
    int64_t  max_cell = 0;
    uint64_t visible  = 0;
    for (size_t j = 0; j < n_views; ++j) {
        if (hi[j] < 0) continue;
        const SeqView & v  = batch.views[j];
        const int32_t   bs = static_cast<int32_t>(v.block_size);
        for (int32_t p = lo[j]; p <= hi[j]; p = (p / bs + 1) * bs) {
            const int64_t c = cell_of(v, std::min((p / bs + 1) * bs - 1, hi[j]), windowed);
            GGML_ASSERT(c >= 0 && c < n_cells);  // the blocks it sees are held
            max_cell = std::max(max_cell, c);
        }
        visible += static_cast<uint64_t>(hi[j] - lo[j] + 1);
    }
    const uint32_t n_direct = std::min(n_cells, padded(static_cast<uint64_t>(max_cell) + 1));
    const uint32_t n_gather = padded(visible);
    const uint64_t rows     = static_cast<uint64_t>(batch.size()) * rows_per_token;
    const bool     cheaper  = n_gather < n_direct && kGatherCost * n_gather < rows * (n_direct - n_gather);
    out.gather              = policy == GatherPolicy::Always || (policy == GatherPolicy::Auto && cheaper);
    out.rows.clear();
    if (!out.gather) {
        out.n_kv = n_direct;
        return;
    }
    out.n_kv = n_gather;
    out.base.assign(n_views, 0);
    out.off.assign(n_views, 0);
    for (size_t j = 0; j < n_views; ++j) {
        out.base[j] = hi[j] < 0 ? 0 : lo[j];
        out.off[j]  = static_cast<int32_t>(out.rows.size());
        for (int32_t p = lo[j]; p <= hi[j]; ++p) {
            out.rows.push_back(static_cast<int32_t>(cell_of(batch.views[j], p, windowed)));
        }
    }
    out.rows.resize(n_gather, out.rows.front());  // padding columns: any cell, masked out
}

void fill_mask(const Batch & batch, uint32_t n_swa, const AttnSpan & span, std::vector<ggml_fp16_t> & mask) {
    const bool        windowed = n_swa > 0;
    const uint32_t    n        = batch.size();
    const ggml_fp16_t keep     = ggml_fp32_to_fp16(0.0f);
    const ggml_fp16_t drop     = ggml_fp32_to_fp16(-INFINITY);
    mask.assign(static_cast<size_t>(span.n_kv) * n, drop);
    for (uint32_t i = 0; i < n; ++i) {
        const int32_t   j   = batch.seq[i];
        const SeqView & v   = batch.views[j];
        const int32_t   p1  = batch.pos[i];
        ggml_fp16_t *   row = mask.data() + static_cast<size_t>(i) * span.n_kv;
        const int32_t   p0  = first_seen(p1, n_swa);
        if (span.gather) {
            std::fill(row + span.off[j] + (p0 - span.base[j]), row + span.off[j] + (p1 - span.base[j]) + 1, keep);
        } else {
            for (int32_t p = p0; p <= p1; ++p) {
                row[cell_of(v, p, windowed)] = keep;
            }
        }
    }
}

}  // namespace appliance

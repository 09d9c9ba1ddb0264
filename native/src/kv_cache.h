// The KV cache's storage. Its bookkeeping (which block of cells holds which positions of which
// sequence) lives in BlockManager and each sequence's block table.
#pragma once

#include "ggml-backend.h"
#include "ggml.h"

#include <cstdint>
#include <vector>

namespace appliance {

struct Model;

// Storage: per layer one K and one V tensor of shape [n_embd_gqa, n_cells], F16, V not transposed
// (the layout flash attention reads), in one buffer per device (each layer's K/V where its weights
// are: Model::layer_device). Sliding-window layers
// have a pool of their own, of n_cells_swa cells (they keep only the window).
class KvStorage {
public:
    // n_cells_swa: cells of the sliding-window layers (ignored when the model has none)
    KvStorage(const Model & m, uint32_t n_cells, uint32_t n_cells_swa);
    ~KvStorage();
    KvStorage(const KvStorage &) = delete;
    KvStorage & operator=(const KvStorage &) = delete;

    ggml_tensor * k(uint32_t il) const { return k_[il]; }  // [n_embd_k_gqa, n_cells]
    ggml_tensor * v(uint32_t il) const { return v_[il]; }  // [n_embd_v_gqa, n_cells]
    uint32_t      n_cells() const { return n_cells_; }          // global layers
    uint32_t      n_cells_swa() const { return n_cells_swa_; }  // sliding-window layers (0: none)
    size_t        bytes() const;

private:
    uint32_t                   n_cells_;
    uint32_t                   n_cells_swa_;
    std::vector<ggml_context *>         ctxs_;
    std::vector<ggml_backend_buffer_t>  bufs_;
    std::vector<ggml_tensor *> k_, v_;
};

}  // namespace appliance

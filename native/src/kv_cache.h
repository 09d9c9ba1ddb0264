// The KV cache, split llama.cpp-style into storage (tensors) and bookkeeping (which cell holds
// which position of which sequence).
#pragma once

#include "ggml-backend.h"
#include "ggml.h"

#include <cstdint>
#include <vector>

namespace appliance {

struct Model;

// Storage: per layer one K and one V tensor of shape [n_embd_gqa, n_cells], F16, V not transposed
// (the layout flash attention reads), all in one buffer on the model's device.
class KvStorage {
public:
    KvStorage(const Model & m, uint32_t n_cells);
    ~KvStorage();
    KvStorage(const KvStorage &) = delete;
    KvStorage & operator=(const KvStorage &) = delete;

    ggml_tensor * k(uint32_t il) const { return k_[il]; }  // [n_embd_k_gqa, n_cells]
    ggml_tensor * v(uint32_t il) const { return v_[il]; }  // [n_embd_v_gqa, n_cells]
    uint32_t      n_cells() const { return n_cells_; }
    size_t        bytes() const;

private:
    uint32_t                   n_cells_;
    ggml_context *             ctx_ = nullptr;
    ggml_backend_buffer_t      buf_ = nullptr;
    std::vector<ggml_tensor *> k_, v_;
};

// Bookkeeping: for each cell the position and sequence it holds (-1 when empty).
class KvCells {
public:
    explicit KvCells(uint32_t n_cells) : pos_(n_cells, -1), seq_(n_cells, -1) {}

    uint32_t size() const { return static_cast<uint32_t>(pos_.size()); }
    bool     empty(uint32_t c) const { return pos_[c] < 0; }
    int32_t  pos(uint32_t c) const { return pos_[c]; }
    int32_t  seq(uint32_t c) const { return seq_[c]; }
    // one past the highest occupied cell: attention only needs to look at [0, used_end)
    uint32_t used_end() const;
    uint32_t n_used() const;

    // precondition: c < size(), pos >= 0, seq >= 0
    void set(uint32_t c, int32_t pos, int32_t seq);
    void free(uint32_t c);
    void free_all();

private:
    std::vector<int32_t> pos_;
    std::vector<int32_t> seq_;
};

}  // namespace appliance

#include "kv_cache.h"

#include "error.h"
#include "model.h"


namespace appliance {

KvStorage::KvStorage(const Model & m, uint32_t n_cells, uint32_t n_cells_swa)
    : n_cells_(n_cells), n_cells_swa_(m.hp.has_swa() ? n_cells_swa : 0) {
    const HParams & hp = m.hp;
    APPL_REQUIRE(n_cells > 0, InvalidArgument, "KV cache needs at least one cell");
    APPL_REQUIRE(!hp.has_swa() || n_cells_swa > 0, InvalidArgument, "the sliding-window KV pool needs at least one cell");

    ggml_init_params params = {ggml_tensor_overhead() * 2 * hp.n_layer, nullptr, /*no_alloc=*/true};
    ctx_ = ggml_init(params);
    for (uint32_t il = 0; il < hp.n_layer; ++il) {
        const uint32_t cells = hp.is_swa(il) ? n_cells_swa_ : n_cells;
        ggml_tensor *  k     = ggml_new_tensor_2d(ctx_, GGML_TYPE_F16, hp.n_embd_k_gqa(), cells);  // [n_embd_k_gqa, cells]
        ggml_tensor *  v     = ggml_new_tensor_2d(ctx_, GGML_TYPE_F16, hp.n_embd_v_gqa(), cells);  // [n_embd_v_gqa, cells]
        ggml_format_name(k, "cache_k_l%u", il);
        ggml_format_name(v, "cache_v_l%u", il);
        k_.push_back(k);
        v_.push_back(v);
    }
    buf_ = ggml_backend_alloc_ctx_tensors_from_buft(ctx_, ggml_backend_dev_buffer_type(m.device));
    if (buf_ == nullptr) {
        ggml_free(ctx_);
        throw RuntimeFailure("cannot allocate the KV cache (" + std::to_string(n_cells) + " cells, " +
                             std::to_string(n_cells_swa_) + " for sliding-window layers)");
    }
    // empty cells are masked out, but flash attention still multiplies by their V: keep them finite
    ggml_backend_buffer_clear(buf_, 0);
}

KvStorage::~KvStorage() {
    ggml_backend_buffer_free(buf_);
    ggml_free(ctx_);
}

size_t KvStorage::bytes() const { return ggml_backend_buffer_get_size(buf_); }

}  // namespace appliance

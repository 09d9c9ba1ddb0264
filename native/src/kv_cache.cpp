#include "kv_cache.h"

#include "error.h"
#include "model.h"


namespace appliance {

KvStorage::KvStorage(const Model & m, uint32_t n_cells, uint32_t n_cells_swa)
    : n_cells_(n_cells), n_cells_swa_(m.hp.has_swa() ? n_cells_swa : 0) {
    const HParams & hp = m.hp;
    APPL_REQUIRE(n_cells > 0, InvalidArgument, "KV cache needs at least one cell");
    APPL_REQUIRE(!hp.has_swa() || n_cells_swa > 0, InvalidArgument, "the sliding-window KV pool needs at least one cell");

    // each layer's K/V where its weights are (m.layer_device: all on the model's device unless
    // [model] gpu_layers keeps some layers on the CPU); one context and buffer per device
    std::vector<ggml_backend_dev_t> devs;
    std::vector<ggml_context *>     ctxs;
    auto ctx_for = [&](ggml_backend_dev_t dev) {
        for (size_t i = 0; i < devs.size(); ++i) {
            if (devs[i] == dev) return ctxs[i];
        }
        ggml_init_params params = {ggml_tensor_overhead() * 2 * hp.n_layer, nullptr, /*no_alloc=*/true};
        devs.push_back(dev);
        ctxs.push_back(ggml_init(params));
        return ctxs.back();
    };
    for (uint32_t il = 0; il < hp.n_layer; ++il) {
        ggml_context * ctx   = ctx_for(il < m.layer_device.size() ? m.layer_device[il] : m.device);
        const uint32_t cells = hp.is_swa(il) ? n_cells_swa_ : n_cells;
        ggml_tensor *  k     = ggml_new_tensor_2d(ctx, GGML_TYPE_F16, hp.n_embd_k_gqa(), cells);  // [n_embd_k_gqa, cells]
        ggml_tensor *  v     = ggml_new_tensor_2d(ctx, GGML_TYPE_F16, hp.n_embd_v_gqa(), cells);  // [n_embd_v_gqa, cells]
        ggml_format_name(k, "cache_k_l%u", il);
        ggml_format_name(v, "cache_v_l%u", il);
        k_.push_back(k);
        v_.push_back(v);
    }
    ctxs_ = ctxs;
    for (size_t i = 0; i < devs.size(); ++i) {
        ggml_backend_buffer_t buf = ggml_backend_alloc_ctx_tensors_from_buft(ctxs[i], ggml_backend_dev_buffer_type(devs[i]));
        if (buf == nullptr) {
            for (ggml_backend_buffer_t b : bufs_) ggml_backend_buffer_free(b);
            for (ggml_context * c : ctxs_) ggml_free(c);
            throw RuntimeFailure("cannot allocate the KV cache (" + std::to_string(n_cells) + " cells, " +
                                 std::to_string(n_cells_swa_) + " for sliding-window layers) on " +
                                 ggml_backend_dev_name(devs[i]));
        }
        // empty cells are masked out, but flash attention still multiplies by their V: keep them finite
        ggml_backend_buffer_clear(buf, 0);
        bufs_.push_back(buf);
    }
}

KvStorage::~KvStorage() {
    for (ggml_backend_buffer_t b : bufs_) ggml_backend_buffer_free(b);
    for (ggml_context * c : ctxs_) ggml_free(c);
}

size_t KvStorage::bytes() const {
    size_t total = 0;
    for (ggml_backend_buffer_t b : bufs_) total += ggml_backend_buffer_get_size(b);
    return total;
}

}  // namespace appliance

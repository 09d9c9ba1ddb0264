// A loaded model: hyper-parameters, weight tensors and the buffers that hold them.
// Weights stay memory-mapped from the GGUF file where the CPU reads them in place; matrices the CPU
// backend can repack for faster kernels (ggml's "extra" buffer types) are copied there instead,
// exactly as llama.cpp places them. On a GPU device all weights are uploaded to device memory.
#pragma once

#include "gguf_file.h"
#include "hparams.h"

#include "ggml-backend.h"
#include "ggml.h"

#include <memory>
#include <string>
#include <vector>

namespace appliance {

struct ArchSpec;

struct LayerWeights {
    ggml_tensor * attn_norm = nullptr;       // [n_embd]
    ggml_tensor * wq = nullptr;              // [n_embd, n_embd_q]
    ggml_tensor * wk = nullptr;              // [n_embd, n_embd_k_gqa]
    ggml_tensor * wv = nullptr;              // [n_embd, n_embd_v_gqa]
    ggml_tensor * wo = nullptr;              // [n_embd_q, n_embd]
    ggml_tensor * bq = nullptr;              // [n_embd_q]      (qwen2)
    ggml_tensor * bk = nullptr;              // [n_embd_k_gqa]  (qwen2)
    ggml_tensor * bv = nullptr;              // [n_embd_v_gqa]  (qwen2)
    ggml_tensor * q_norm = nullptr;          // [head_dim]      (qwen3, gemma3)
    ggml_tensor * k_norm = nullptr;          // [head_dim]      (qwen3, gemma3)
    ggml_tensor * attn_post_norm = nullptr;  // [n_embd]        (gemma3)
    ggml_tensor * ffn_norm = nullptr;        // [n_embd]
    ggml_tensor * ffn_gate = nullptr;        // [n_embd, n_ff]
    ggml_tensor * ffn_up = nullptr;          // [n_embd, n_ff]
    ggml_tensor * ffn_down = nullptr;        // [n_ff, n_embd]
    ggml_tensor * ffn_post_norm = nullptr;   // [n_embd]        (gemma3)
};

struct ModelParams {
    bool use_gpu   = true;   // put weights and compute on the first GPU device if ggml has one
    bool use_repack = true;  // let the CPU backend repack matrices for its fastest kernels
    // llama.cpp's -ngl: how many of the last layers (their weights and K/V) live on the GPU; more than
    // n_layer also puts the embeddings, output norm and head there; < 0: everything (the default)
    int gpu_layers = -1;
};

struct Model {
    HParams          hp;
    const ArchSpec * spec = nullptr;

    ggml_tensor * tok_embd    = nullptr;  // [n_embd, n_vocab]
    ggml_tensor * output_norm = nullptr;  // [n_embd]
    ggml_tensor * output      = nullptr;  // [n_embd, n_vocab] (tok_embd when tied)
    ggml_tensor * rope_freqs  = nullptr;  // [n_rot/2] optional (llama 3 rope scaling)
    std::vector<LayerWeights> layers;

    std::unique_ptr<GgufFile>          file;
    ggml_backend_dev_t                 device = nullptr;  // where the graph runs (GPU or CPU)
    std::vector<ggml_backend_dev_t>    layer_device;      // per layer: where its weights and K/V live
    bool                               output_on_device = true;  // embeddings, output norm, head on `device`
    std::vector<ggml_backend_buffer_t> buffers;
    size_t                             weight_bytes = 0;
    bool                               use_repack   = true;

    Model() = default;
    ~Model();
    Model(const Model &) = delete;
    Model & operator=(const Model &) = delete;

    // Throws ModelFormatError for anything wrong with the file.
    static std::unique_ptr<Model> load(const std::string & path, const ModelParams & params);

    // layers whose weights are on the GPU (0 on the CPU)
    uint32_t n_gpu_layers() const;
};

// Which device each layer goes to for `gpu_layers` (llama.cpp's -ngl: the last ones on the GPU), and
// whether the non-layer weights go there too (gpu_layers > n_layer, or < 0). `gpu` may be nullptr.
std::vector<ggml_backend_dev_t> place_layers(uint32_t n_layer, int gpu_layers, ggml_backend_dev_t gpu,
                                             ggml_backend_dev_t cpu, bool * output_on_gpu);

// The buffer type a matrix like `w` that mat-mul reads should live in on the model's device: a CPU
// repack type when one takes it (and the model was loaded with use_repack), else the device's own.
ggml_backend_buffer_type_t matmul_buft(const Model & m, ggml_tensor * w);

// Looks up tensors by name while an architecture declares its weights: checks each one's shape
// and type, remembers which op reads it (for buffer placement), and at the end refuses files that
// carry tensors nobody asked for (they would be silently ignored otherwise).
class TensorLoader {
public:
    TensorLoader(const GgufFile & file, ggml_backend_dev_t cpu_dev);

    enum class Use { Elementwise, MatMul, GetRows };

    // nullptr when optional and absent; ModelFormatError on a missing required tensor, a shape or type mismatch
    ggml_tensor * get(const std::string & name, std::vector<int64_t> shape, Use use, bool required = true);
    ggml_tensor * get_layer(uint32_t il, const std::string & suffix, std::vector<int64_t> shape, Use use,
                            bool required = true);

    struct Entry {
        ggml_tensor * t;
        bool          matmul;
        bool          get_rows;
    };
    const std::vector<Entry> & entries() const { return entries_; }

    void check_all_used() const;

private:
    const GgufFile &   file_;
    ggml_backend_dev_t cpu_dev_;
    std::vector<Entry> entries_;
};

}  // namespace appliance

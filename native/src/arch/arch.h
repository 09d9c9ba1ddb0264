// The supported model architectures. Each one lives in its own file and supplies three things:
// its extra hyper-parameters, its weight tensors and its decoder layer (build_pass in graph.h
// strings the layers together, so every architecture can exit early).
#pragma once

#include <cstdint>
#include <string>

struct ggml_tensor;

namespace appliance {

class GgufFile;
class GraphBuilder;
class TensorLoader;
struct HParams;
struct Model;

struct ArchSpec {
    const char * name;
    void (*load_hparams)(HParams & hp, const GgufFile & f);
    void (*load_tensors)(Model & m, TensorLoader & tl);
    // one decoder layer: x [n_embd, n_tokens] -> [n_embd, n_tokens]; the last layer (il == n_layer - 1)
    // keeps only the output tokens' rows -> [n_embd, n_outputs]
    ggml_tensor * (*build_layer)(GraphBuilder & g, uint32_t il, ggml_tensor * x);
};

extern const ArchSpec kArchLlama;
extern const ArchSpec kArchQwen2;
extern const ArchSpec kArchQwen3;
extern const ArchSpec kArchGemma3;

// nullptr for an architecture we do not support
const ArchSpec * find_arch(const std::string & name);
// "llama, qwen2, qwen3, gemma3", for error messages
std::string supported_archs();

// Declares the weights every decoder here shares: token embedding, output norm, (tied) output head,
// and per layer the attention norm, q/k/v/o projections, the ffn norm and gate/up/down.
void load_common_tensors(Model & m, TensorLoader & tl);

// Per-head RMS norm weights on q and k (Qwen3, Gemma 3): blk.N.attn_{q,k}_norm.weight [head_dim].
void load_qk_norms(Model & m, TensorLoader & tl);

// A layer of a pre-norm Llama-style decoder: RMS norm -> attention (q/k biases and per-head q/k
// norms when the layer has them) -> residual -> RMS norm -> SwiGLU FFN -> residual. Llama, Qwen2 and
// Qwen3 differ only in those optional weights and their RoPE mode.
ggml_tensor * build_prenorm_layer(GraphBuilder & g, uint32_t il, ggml_tensor * x);

}  // namespace appliance

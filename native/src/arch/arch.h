// The supported model architectures. Each one lives in its own file and supplies three things:
// its extra hyper-parameters, its weight tensors and its forward graph.
#pragma once

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
    // builds the forward pass and returns the logits of the selected outputs: [n_vocab, n_outputs]
    ggml_tensor * (*build_graph)(GraphBuilder & g);
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

// The forward pass of a pre-norm Llama-style decoder: RMS norm -> attention (q/k biases and per-head
// q/k norms when the layer has them) -> residual -> RMS norm -> SwiGLU FFN -> residual. Llama, Qwen2
// and Qwen3 differ only in those optional weights and their RoPE mode.
ggml_tensor * build_prenorm_decoder(GraphBuilder & g);

}  // namespace appliance

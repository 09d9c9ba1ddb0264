#include "model.h"

#include "arch/arch.h"
#include "error.h"

#include "cpu_backend.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>

namespace appliance {

namespace {

std::string shape_str(const int64_t * ne, int n) {
    std::string s = "[";
    for (int i = 0; i < n; ++i) {
        s += (i ? ", " : "") + std::to_string(ne[i]);
    }
    return s + "]";
}

// Would `dev` run `op` reading `w` if `w` lived in a buffer of type `buft`? (the test llama.cpp uses)
bool op_supported(ggml_backend_dev_t dev, ggml_backend_buffer_type_t buft, ggml_tensor * w, TensorLoader::Use use) {
    ggml_init_params params = {ggml_tensor_overhead() * 8, nullptr, /*no_alloc=*/true};
    ggml_context *   ctx    = ggml_init(params);
    ggml_tensor *    op     = nullptr;
    if (use == TensorLoader::Use::MatMul) {
        ggml_tensor * b = ggml_new_tensor_4d(ctx, GGML_TYPE_F32, w->ne[0], 512, w->ne[2], w->ne[3]);
        op = ggml_mul_mat(ctx, w, b);
    } else {
        ggml_tensor * b = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, 512);
        op = ggml_get_rows(ctx, w, b);
    }
    ggml_backend_buffer_t saved = w->buffer;
    w->buffer = ggml_backend_buft_alloc_buffer(buft, 0);
    const bool ok = ggml_backend_dev_supports_op(dev, op);
    ggml_backend_buffer_free(w->buffer);
    w->buffer = saved;
    ggml_free(ctx);
    return ok;
}

std::vector<ggml_backend_buffer_type_t> cpu_extra_bufts(ggml_backend_dev_t cpu_dev) {
    std::vector<ggml_backend_buffer_type_t> out;
    ggml_backend_reg_t reg = ggml_backend_dev_backend_reg(cpu_dev);
    auto fn = (ggml_backend_dev_get_extra_bufts_t) ggml_backend_reg_get_proc_address(reg, "ggml_backend_dev_get_extra_bufts");
    if (fn != nullptr) {
        for (ggml_backend_buffer_type_t * p = fn(cpu_dev); p && *p; ++p) {
            out.push_back(*p);
        }
    }
    return out;
}

// Allocates one buffer of `buft` for `tensors` and copies their bytes from the mapped file.
ggml_backend_buffer_t upload(ggml_backend_buffer_type_t buft, const std::vector<ggml_tensor *> & tensors, const GgufFile & f) {
    const size_t align = ggml_backend_buft_get_alignment(buft);
    size_t       total = 0;
    for (ggml_tensor * t : tensors) {
        total += GGML_PAD(ggml_backend_buft_get_alloc_size(buft, t), align);
    }
    ggml_backend_buffer_t buf = ggml_backend_buft_alloc_buffer(buft, std::max<size_t>(total, 1));
    if (buf == nullptr) {
        throw RuntimeFailure("cannot allocate " + std::to_string(total >> 20) + " MiB for weights in " + ggml_backend_buft_name(buft));
    }
    ggml_backend_buffer_set_usage(buf, GGML_BACKEND_BUFFER_USAGE_WEIGHTS);
    char * base = static_cast<char *>(ggml_backend_buffer_get_base(buf));
    size_t off  = 0;
    for (ggml_tensor * t : tensors) {
        if (ggml_backend_tensor_alloc(buf, t, base + off) != GGML_STATUS_SUCCESS) {
            ggml_backend_buffer_free(buf);
            throw RuntimeFailure(std::string("cannot place tensor ") + ggml_get_name(t));
        }
        ggml_backend_tensor_set(t, f.tensor_data(t), 0, ggml_nbytes(t));
        off += GGML_PAD(ggml_backend_buft_get_alloc_size(buft, t), align);
    }
    return buf;
}

// "blk.N.*" -> N; -1 for the tensors outside the layers
int layer_of(const ggml_tensor * t) {
    const char * name = ggml_get_name(t);
    if (std::strncmp(name, "blk.", 4) != 0) return -1;
    return std::atoi(name + 4);
}

// A CUDA (or other GPU) build on a machine without that GPU: its registry is there with no device.
// Said once per process, in one line, since everything then runs on the CPU.
void note_missing_gpu() {
    static std::once_flag once;
    std::call_once(once, [] {
        for (size_t i = 0; i < ggml_backend_reg_count(); ++i) {
            ggml_backend_reg_t reg = ggml_backend_reg_get(i);
            if (ggml_backend_reg_dev_count(reg) == 0 && std::strcmp(ggml_backend_reg_name(reg), "CPU") != 0) {
                std::fprintf(stderr, "appliance: this build has ggml's %s backend but it finds no GPU: running on the CPU\n",
                             ggml_backend_reg_name(reg));
                return;
            }
        }
    });
}

}  // namespace

std::vector<ggml_backend_dev_t> place_layers(uint32_t n_layer, int gpu_layers, ggml_backend_dev_t gpu,
                                             ggml_backend_dev_t cpu, bool * output_on_gpu) {
    const bool     all     = gpu_layers < 0 || static_cast<uint32_t>(gpu_layers) > n_layer;
    const uint32_t n_gpu   = gpu == nullptr ? 0 : all ? n_layer : static_cast<uint32_t>(gpu_layers);
    std::vector<ggml_backend_dev_t> out(n_layer, cpu);
    for (uint32_t il = n_layer - n_gpu; il < n_layer; ++il) out[il] = gpu;
    *output_on_gpu = gpu != nullptr && all;
    return out;
}

uint32_t Model::n_gpu_layers() const {
    ggml_backend_dev_t cpu = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
    return static_cast<uint32_t>(std::count_if(layer_device.begin(), layer_device.end(),
                                               [cpu](ggml_backend_dev_t d) { return d != cpu; }));
}

ggml_backend_buffer_type_t matmul_buft(const Model & m, ggml_tensor * w) {
    ggml_backend_dev_t cpu_dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
    if (m.device == cpu_dev && m.use_repack) {
        for (ggml_backend_buffer_type_t buft : cpu_extra_bufts(cpu_dev)) {
            if (op_supported(cpu_dev, buft, w, TensorLoader::Use::MatMul)) {
                return buft;
            }
        }
    }
    return ggml_backend_dev_buffer_type(m.device);
}

// ---------------------------------------------------------------------------------------------
// TensorLoader

TensorLoader::TensorLoader(const GgufFile & file, ggml_backend_dev_t cpu_dev) : file_(file), cpu_dev_(cpu_dev) {}

ggml_tensor * TensorLoader::get(const std::string & name, std::vector<int64_t> shape, Use use, bool required) {
    const std::string where = "model file '" + file_.path() + "': tensor '" + name + "'";
    ggml_tensor * t = file_.tensor(name);
    if (t == nullptr) {
        if (required) {
            throw ModelFormatError("model file '" + file_.path() + "': missing tensor '" + name + "'");
        }
        return nullptr;
    }
    const int n_expected = static_cast<int>(shape.size());
    shape.resize(GGML_MAX_DIMS, 1);
    if (!std::equal(shape.begin(), shape.end(), t->ne)) {
        throw ModelFormatError(where + " has shape " + shape_str(t->ne, ggml_n_dims(t)) + ", expected " +
                               shape_str(shape.data(), n_expected));
    }
    switch (use) {
        case Use::Elementwise:
            if (t->type != GGML_TYPE_F32) {
                throw ModelFormatError(where + " must be F32, found " + ggml_type_name(t->type));
            }
            break;
        case Use::MatMul:
        case Use::GetRows:
            if (!op_supported(cpu_dev_, ggml_backend_dev_buffer_type(cpu_dev_), t, use)) {
                throw ModelFormatError(where + " has type " + ggml_type_name(t->type) + ", which cannot be used as " +
                                       (use == Use::MatMul ? "a weight matrix" : "an embedding table"));
            }
            break;
    }
    auto it = std::find_if(entries_.begin(), entries_.end(), [t](const Entry & e) { return e.t == t; });
    if (it == entries_.end()) {
        entries_.push_back({t, false, false});
        it = entries_.end() - 1;
    }
    it->matmul   |= use == Use::MatMul;
    it->get_rows |= use == Use::GetRows;
    return t;
}

ggml_tensor * TensorLoader::get_layer(uint32_t il, const std::string & suffix, std::vector<int64_t> shape, Use use,
                                      bool required) {
    return get("blk." + std::to_string(il) + "." + suffix, std::move(shape), use, required);
}

void TensorLoader::check_all_used() const {
    for (int64_t i = 0; i < file_.n_tensors(); ++i) {
        ggml_tensor * t = file_.tensor_at(i);
        auto it = std::find_if(entries_.begin(), entries_.end(), [t](const Entry & e) { return e.t == t; });
        if (it == entries_.end()) {
            throw ModelFormatError("model file '" + file_.path() + "': unexpected tensor '" + ggml_get_name(t) +
                                   "' (not part of this architecture as supported here)");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Model

Model::~Model() {
    for (ggml_backend_buffer_t b : buffers) {
        ggml_backend_buffer_free(b);
    }
}

std::unique_ptr<Model> Model::load(const std::string & path, const ModelParams & params) {
    auto m  = std::make_unique<Model>();
    m->file = std::make_unique<GgufFile>(path);
    const GgufFile & f = *m->file;

    const auto arch = f.get_str("general.architecture");
    if (!arch) {
        throw ModelFormatError("model file '" + path + "': missing metadata key 'general.architecture'");
    }
    m->spec = find_arch(*arch);
    if (m->spec == nullptr) {
        throw ModelFormatError("model file '" + path + "': unsupported architecture '" + *arch +
                               "' (supported: " + supported_archs() + ")");
    }
    m->hp = read_common_hparams(f, *arch);
    m->spec->load_hparams(m->hp, f);

    ggml_tensor * embd = f.tensor("token_embd.weight");
    if (embd == nullptr) {
        throw ModelFormatError("model file '" + path + "': missing tensor 'token_embd.weight'");
    }
    m->hp.n_vocab = static_cast<uint32_t>(embd->ne[1]);

    ggml_backend_dev_t cpu_dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
    if (cpu_dev == nullptr) {
        throw RuntimeFailure("ggml has no CPU backend");
    }
    ggml_backend_dev_t gpu_dev = nullptr;
    if (params.use_gpu && params.gpu_layers != 0) {
        gpu_dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_GPU);
        if (gpu_dev == nullptr) note_missing_gpu();
    }
    m->device       = gpu_dev ? gpu_dev : cpu_dev;
    m->use_repack   = params.use_repack;
    m->layer_device = place_layers(m->hp.n_layer, params.gpu_layers, gpu_dev, cpu_dev, &m->output_on_device);
    if (gpu_dev == nullptr) m->output_on_device = true;  // the device is the CPU

    TensorLoader tl(f, cpu_dev);
    m->spec->load_tensors(*m, tl);
    tl.check_all_used();

    // place the weights
    std::map<ggml_backend_buffer_type_t, std::vector<ggml_tensor *>> uploads;
    std::vector<ggml_tensor *> mapped;
    {
        // on the GPU: the offloaded layers (and the rest with them when all are); the others as on the CPU
        auto on_gpu = [&](const ggml_tensor * t) {
            const int il = layer_of(t);
            if (gpu_dev == nullptr) return false;
            if (il < 0 || static_cast<uint32_t>(il) >= m->layer_device.size()) return m->output_on_device;
            return m->layer_device[il] == gpu_dev;
        };
        const auto extra = params.use_repack ? cpu_extra_bufts(cpu_dev) : std::vector<ggml_backend_buffer_type_t>{};
        for (const auto & e : tl.entries()) {
            if (on_gpu(e.t)) {
                uploads[ggml_backend_dev_buffer_type(gpu_dev)].push_back(e.t);
                continue;
            }
            ggml_backend_buffer_type_t chosen = nullptr;
            if (e.matmul && !e.get_rows) {
                for (ggml_backend_buffer_type_t buft : extra) {
                    if (op_supported(cpu_dev, buft, e.t, TensorLoader::Use::MatMul)) {
                        chosen = buft;
                        break;
                    }
                }
            }
            if (chosen) {
                uploads[chosen].push_back(e.t);
            } else {
                mapped.push_back(e.t);
            }
        }
    }
    for (auto & [buft, tensors] : uploads) {
        m->buffers.push_back(upload(buft, tensors, f));
        m->weight_bytes += ggml_backend_buffer_get_size(m->buffers.back());
    }
    if (!mapped.empty()) {
        ggml_backend_buffer_t buf = cpu_buffer_from_ptr(f.map_base(), f.map_size());
        ggml_backend_buffer_set_usage(buf, GGML_BACKEND_BUFFER_USAGE_WEIGHTS);
        m->buffers.push_back(buf);
        for (ggml_tensor * t : mapped) {
            if (ggml_backend_tensor_alloc(buf, t, const_cast<uint8_t *>(f.tensor_data(t))) != GGML_STATUS_SUCCESS) {
                throw RuntimeFailure(std::string("cannot map tensor ") + ggml_get_name(t));
            }
            m->weight_bytes += ggml_nbytes(t);
        }
    }
    return m;
}

}  // namespace appliance

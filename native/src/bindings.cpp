// Python bindings: argument conversion, boundary checks and GIL release only; the logic lives in
// the core's classes.
#include "arch/arch.h"
#include "batch_engine.h"
#include "context.h"
#include "cpu_backend.h"
#include "error.h"
#include "log.h"
#include "model.h"
#include "sampler.h"
#include "vocab.h"

#include "ggml-backend.h"

#include <algorithm>

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

namespace py = pybind11;
using namespace appliance;

namespace {

std::vector<int32_t> as_tokens(const py::handle & obj) {
    auto arr = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(obj);
    if (!arr || arr.ndim() != 1) {
        throw InvalidArgument("tokens must be a 1-D sequence of integers");
    }
    std::vector<int32_t> out(arr.size());
    const int64_t * p = arr.data();
    for (py::ssize_t i = 0; i < arr.size(); ++i) {
        if (p[i] < INT32_MIN || p[i] > INT32_MAX) {
            throw InvalidArgument("token id " + std::to_string(p[i]) + " at index " + std::to_string(i) + " is out of range");
        }
        out[i] = static_cast<int32_t>(p[i]);
    }
    return out;
}

SamplingParams sampling_params(float temperature, int32_t top_k, float top_p, float min_p, float repeat_penalty,
                               int32_t repeat_last_n, uint64_t seed) {
    SamplingParams p;
    p.temperature    = temperature;
    p.top_k          = top_k;
    p.top_p          = top_p;
    p.min_p          = min_p;
    p.repeat_penalty = repeat_penalty;
    p.repeat_last_n  = repeat_last_n;
    p.seed           = seed;
    return p;
}

py::dict timings_dict(const Timings & t) {
    py::dict d;
    d["n_passes"]   = t.n_passes;
    d["n_tokens"]   = t.n_tokens;
    d["build_us"]   = t.build_us;
    d["inputs_us"]  = t.inputs_us;
    d["compute_us"] = t.compute_us;
    d["output_us"]  = t.output_us;
    return d;
}

py::array_t<float> logits_array(const Context & ctx, uint32_t first, uint32_t count) {
    py::array_t<float> out({static_cast<py::ssize_t>(count), static_cast<py::ssize_t>(ctx.n_vocab())});
    for (uint32_t i = 0; i < count; ++i) {
        std::memcpy(out.mutable_data(i, 0), ctx.logits(first + i), ctx.n_vocab() * sizeof(float));
    }
    return out;
}

uint32_t output_index(const Context & ctx, int64_t i) {
    const int64_t n = ctx.n_outputs();
    if (n == 0) {
        throw InvalidArgument("no logits yet: call decode() first");
    }
    if (i < -n || i >= n) {
        throw InvalidArgument("output index " + std::to_string(i) + " out of range for " + std::to_string(n) + " outputs");
    }
    return static_cast<uint32_t>(i < 0 ? n + i : i);
}

}  // namespace

PYBIND11_MODULE(_native, m) {
    m.doc() = "appliance native core: GGUF models on our own ggml graphs";
    install_log();

    auto base_value_error = py::handle(PyExc_ValueError);
    static py::exception<ModelFormatError> model_format_error(m, "ModelFormatError", base_value_error);
    static py::exception<ContextOverflowError> context_overflow_error(m, "ContextOverflowError", base_value_error);
    py::register_exception_translator([](std::exception_ptr p) {
        try {
            if (p) std::rethrow_exception(p);
        } catch (const ModelFormatError & e) {
            py::set_error(model_format_error, e.what());
        } catch (const ContextOverflowError & e) {
            py::set_error(context_overflow_error, e.what());
        }
    });

    m.def("supported_architectures", []() { return supported_archs(); },
          "Comma-separated names of the model architectures the core runs.");
    m.def("system_info", []() {
        py::dict d;
        std::vector<std::string> feats = cpu_features();
        auto has = [&](const char * name) { return std::find(feats.begin(), feats.end(), std::string(name) + "=1") != feats.end(); };
        d["avx2"]   = has("AVX2");
        d["avx512"] = has("AVX512");
        d["f16c"]   = has("F16C");
        d["fma"]    = has("FMA");
        d["cpu_features"] = feats;
        py::list devs;
        for (size_t i = 0; i < ggml_backend_dev_count(); ++i) {
            ggml_backend_dev_t dev = ggml_backend_dev_get(i);
            devs.append(py::make_tuple(ggml_backend_dev_name(dev), ggml_backend_dev_description(dev)));
        }
        d["devices"] = devs;
        return d;
    }, "CPU features ggml was built for and the devices it sees.");

    py::class_<Model>(m, "Model", "A GGUF model loaded for the native engine (weights memory-mapped).")
        .def(py::init([](const std::string & path, bool use_gpu, bool use_repack) {
                 ModelParams p;
                 p.use_gpu    = use_gpu;
                 p.use_repack = use_repack;
                 py::gil_scoped_release release;
                 return Model::load(path, p);
             }),
             py::arg("path"), py::kw_only(), py::arg("use_gpu") = true, py::arg("use_repack") = true)
        .def_property_readonly("path", [](const Model & mm) { return mm.file->path(); })
        .def_property_readonly("arch", [](const Model & mm) { return mm.hp.arch; })
        .def_property_readonly("n_vocab", [](const Model & mm) { return mm.hp.n_vocab; })
        .def_property_readonly("n_ctx_train", [](const Model & mm) { return mm.hp.n_ctx_train; })
        .def_property_readonly("n_embd", [](const Model & mm) { return mm.hp.n_embd; })
        .def_property_readonly("n_layer", [](const Model & mm) { return mm.hp.n_layer; })
        .def_property_readonly("n_head", [](const Model & mm) { return mm.hp.n_head; })
        .def_property_readonly("n_head_kv", [](const Model & mm) { return mm.hp.n_head_kv; })
        .def_property_readonly("head_dim", [](const Model & mm) { return mm.hp.head_dim_k; })
        .def_property_readonly("n_swa", [](const Model & mm) { return mm.hp.n_swa; })
        .def_property_readonly("swa_layers", [](const Model & mm) {
            std::vector<bool> v(mm.hp.n_layer);
            for (uint32_t il = 0; il < mm.hp.n_layer; ++il) v[il] = mm.hp.is_swa(il);
            return v;
        })
        .def_property_readonly("weight_bytes", [](const Model & mm) { return mm.weight_bytes; })
        .def_property_readonly("device", [](const Model & mm) { return std::string(ggml_backend_dev_name(mm.device)); });

    py::class_<Context>(m, "Context", "One token sequence and its KV cache, run on a model.")
        .def(py::init([](const Model & model, uint32_t n_ctx, uint32_t n_ubatch, int n_threads) {
                 ContextParams p;
                 p.n_ctx     = n_ctx;
                 p.n_ubatch  = n_ubatch;
                 p.n_threads = n_threads;
                 py::gil_scoped_release release;
                 return std::make_unique<Context>(model, p);
             }),
             py::arg("model"), py::kw_only(), py::arg("n_ctx") = 4096, py::arg("n_ubatch") = 512, py::arg("n_threads") = 2,
             py::keep_alive<1, 2>())
        .def("decode", [](Context & c, const py::handle & tokens, bool all_logits) {
                 std::vector<int32_t> t = as_tokens(tokens);
                 if (t.empty()) throw InvalidArgument("decode needs at least one token");
                 py::gil_scoped_release release;
                 c.decode(t.data(), static_cast<uint32_t>(t.size()), all_logits);
             },
             py::arg("tokens"), py::kw_only(), py::arg("all_logits") = false,
             "Append tokens to the sequence and run them; keeps the last token's logits (or all).")
        .def("truncate", &Context::truncate, py::arg("n_keep"), "Forget positions >= n_keep.")
        .def("logits", [](const Context & c, int64_t i) { return logits_array(c, output_index(c, i), 1).attr("reshape")(-1); },
             py::arg("i") = -1, "Logits (float32[n_vocab]) of output i of the last decode.")
        .def("all_logits", [](const Context & c) { return logits_array(c, 0, c.n_outputs()); },
             "Logits of every output of the last decode, float32[n_outputs, n_vocab].")
        .def_property_readonly("n_past", &Context::n_past)
        .def_property_readonly("n_ctx", &Context::n_ctx)
        .def_property_readonly("n_vocab", &Context::n_vocab)
        .def_property_readonly("n_outputs", &Context::n_outputs)
        .def_property("n_threads", &Context::n_threads, &Context::set_n_threads)
        .def_property_readonly("kv_bytes", &Context::kv_bytes)
        .def("timings", [](const Context & c) { return timings_dict(c.timings()); },
             "Cumulative time of forward passes by phase, in microseconds.")
        .def_property_readonly("compute_bytes", &Context::compute_bytes);

    py::class_<BatchEngine>(m, "BatchEngine",
                            "Continuous batching over a paged KV cache with a prefix cache. Not thread-safe: "
                            "one thread submits, steps and cancels.")
        .def(py::init([](const Model & model, uint32_t kv_cache_mb, uint32_t n_blocks, uint32_t block_size,
                         uint32_t max_batched_tokens, uint32_t max_seqs, int n_threads, std::vector<int32_t> eog_tokens,
                         std::string model_key) {
                 BatchEngineParams p;
                 p.kv_cache_mb        = kv_cache_mb;
                 p.n_blocks           = n_blocks;
                 p.block_size         = block_size;
                 p.max_batched_tokens = max_batched_tokens;
                 p.max_seqs           = max_seqs;
                 p.n_threads          = n_threads;
                 p.eog_tokens         = std::move(eog_tokens);
                 p.model_key          = std::move(model_key);
                 py::gil_scoped_release release;
                 return std::make_unique<BatchEngine>(model, p);
             }),
             py::arg("model"), py::kw_only(), py::arg("kv_cache_mb") = 256, py::arg("n_blocks") = 0, py::arg("block_size") = 16,
             py::arg("max_batched_tokens") = 512, py::arg("max_seqs") = 16, py::arg("n_threads") = 2,
             py::arg("eog_tokens") = std::vector<int32_t>{}, py::arg("model_key") = "", py::keep_alive<1, 2>())
        .def("submit", [](BatchEngine & e, const py::handle & prompt, uint32_t max_tokens, float temperature, int32_t top_k,
                          float top_p, float min_p, float repeat_penalty, int32_t repeat_last_n, uint64_t seed,
                          bool stop_at_eog, std::string tenant) {
                 Request r;
                 r.prompt                  = as_tokens(prompt);
                 r.max_tokens              = max_tokens;
                 r.sampling = sampling_params(temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed);
                 r.stop_at_eog             = stop_at_eog;
                 r.tenant                  = std::move(tenant);
                 return e.submit(r);
             },
             py::arg("prompt"), py::kw_only(), py::arg("max_tokens") = 256, py::arg("temperature") = 0.8f,
             py::arg("top_k") = 40, py::arg("top_p") = 0.95f, py::arg("min_p") = 0.05f, py::arg("repeat_penalty") = 1.0f,
             py::arg("repeat_last_n") = 64, py::arg("seed") = 0, py::arg("stop_at_eog") = true, py::arg("tenant") = "",
             "Queue a request (prompt token ids); returns its id.")
        .def("cancel", &BatchEngine::cancel, py::arg("id"), "Drop a request now, freeing its KV blocks.")
        .def("step", [](BatchEngine & e) {
                 std::vector<Event> events;
                 {
                     py::gil_scoped_release release;
                     events = e.step();
                 }
                 py::list out;
                 for (const Event & ev : events) {
                     out.append(py::make_tuple(ev.id, ev.tokens, ev.finish_reason, ev.n_prompt, ev.n_prompt_cached));
                 }
                 return out;
             },
             "Run one scheduling step and batched forward pass: [(id, new_tokens, finish_reason, n_prompt, "
             "n_prompt_cached)], finish_reason '' while the request runs.")
        .def_property_readonly("idle", &BatchEngine::idle)
        .def_property_readonly("max_seq_len", &BatchEngine::max_seq_len)
        .def("stats", [](const BatchEngine & e) {
                 const auto s = e.stats();
                 py::dict d;
                 d["n_blocks"]             = s.n_blocks;
                 d["n_free_blocks"]        = s.n_free_blocks;
                 d["block_size"]           = s.block_size;
                 d["n_waiting"]            = s.n_waiting;
                 d["n_running"]            = s.n_running;
                 d["n_preemptions"]        = s.n_preemptions;
                 d["prefix_hits"]          = s.prefix_hits;
                 d["prefix_lookups"]       = s.prefix_lookups;
                 d["prefix_evictions"]     = s.prefix_evictions;
                 d["prefix_cached_blocks"] = s.prefix_cached_blocks;
                 d["n_steps"]              = s.n_steps;
                 d["n_tokens_run"]         = s.n_tokens_run;
                 d["kv_bytes"]             = s.kv_bytes;
                 d["kv_bytes_per_token"]   = s.kv_bytes_per_token;
                 return d;
             })
        .def("save_prefix", [](BatchEngine & e, const py::handle & tokens, const std::string & tenant, const std::string & path) {
                 std::vector<int32_t> t = as_tokens(tokens);
                 py::gil_scoped_release release;
                 return e.save_prefix(t, tenant, path);
             },
             py::arg("tokens"), py::kw_only(), py::arg("tenant") = "", py::arg("path"),
             "Write the cached K/V of the full blocks that start `tokens` (for `tenant`) to `path`; returns the tokens saved.")
        .def("load_prefix", [](BatchEngine & e, const std::string & path) {
                 py::gil_scoped_release release;
                 return e.load_prefix(path);
             },
             py::arg("path"), "Read a saved prefix into the prefix cache; returns the tokens loaded.")
        .def("timings", [](const BatchEngine & e) { return timings_dict(e.timings()); },
             "Cumulative time of forward passes by phase, in microseconds.")
        .def("check_invariants", &BatchEngine::check_invariants,
             "Block-pool invariants: '' when every block is free or held and ref counts match.");

    py::class_<Sampler>(m, "Sampler", "Picks next tokens from a context's logits.")
        .def(py::init([](int32_t n_vocab, float temperature, int32_t top_k, float top_p, float min_p, float repeat_penalty,
                         int32_t repeat_last_n, uint64_t seed) {
                 const SamplingParams p = sampling_params(temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed);
                 return std::make_unique<Sampler>(p, n_vocab);
             }),
             py::arg("n_vocab"), py::kw_only(), py::arg("temperature") = 0.8f, py::arg("top_k") = 40, py::arg("top_p") = 0.95f,
             py::arg("min_p") = 0.05f, py::arg("repeat_penalty") = 1.0f, py::arg("repeat_last_n") = 64, py::arg("seed") = 0)
        .def("sample", [](Sampler & s, const Context & c, const std::vector<int32_t> & history, int64_t i) {
                 const float * logits = c.logits(output_index(c, i));
                 if (static_cast<uint32_t>(c.n_vocab()) == 0) throw InvalidArgument("empty vocabulary");
                 py::gil_scoped_release release;
                 return s.sample(logits, history);
             },
             py::arg("context"), py::arg("history") = std::vector<int32_t>{}, py::arg("i") = -1,
             "Next token from output i of the context's last decode; history feeds the repetition penalty.");

    py::class_<Vocab>(m, "Vocab", "Tokenizer and chat templates of a GGUF model, through libllama.")
        .def(py::init([](const std::string & path) {
                 py::gil_scoped_release release;
                 return std::make_unique<Vocab>(path);
             }),
             py::arg("path"))
        .def("tokenize", &Vocab::tokenize, py::arg("text"), py::kw_only(), py::arg("add_special") = true,
             py::arg("parse_special") = false)
        .def("token_to_piece", [](const Vocab & v, int32_t t, bool special) { return py::bytes(v.token_to_piece(t, special)); },
             py::arg("token"), py::kw_only(), py::arg("special") = false, "Raw bytes of one token (may split a UTF-8 character).")
        .def("detokenize", [](const Vocab & v, const std::vector<int32_t> & tokens, bool remove_special, bool unparse_special) {
                 return py::bytes(v.detokenize(tokens, remove_special, unparse_special));
             },
             py::arg("tokens"), py::kw_only(), py::arg("remove_special") = false, py::arg("unparse_special") = false)
        .def_property_readonly("n_tokens", &Vocab::n_tokens)
        .def_property_readonly("bos", &Vocab::bos)
        .def_property_readonly("eos", &Vocab::eos)
        .def_property_readonly("eot", &Vocab::eot)
        .def_property_readonly("add_bos", &Vocab::add_bos)
        .def("is_eog", &Vocab::is_eog, py::arg("token"))
        .def_property_readonly("chat_template", &Vocab::chat_template)
        .def("apply_chat_template", &Vocab::apply_chat_template, py::arg("template"), py::arg("messages"), py::kw_only(),
             py::arg("add_assistant") = true);
}

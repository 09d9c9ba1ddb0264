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
#include <cstdio>

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

Head parse_head(const std::string & head) {
    if (head == "full") return Head::Full;
    if (head == "shortlist") return Head::Shortlist;
    if (head == "none") return Head::None;
    throw InvalidArgument("head must be 'full', 'shortlist' or 'none', got '" + head + "'");
}

ExitMode parse_exit_mode(const std::string & mode) {
    if (mode == "off") return ExitMode::Off;
    if (mode == "lossless") return ExitMode::Lossless;
    if (mode == "adaptive") return ExitMode::Adaptive;
    throw InvalidArgument("exit_mode must be 'off', 'lossless' or 'adaptive', got '" + mode + "'");
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
    d["n_gathered"] = t.n_gathered;
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
        py::list backends, gpus;
        for (size_t i = 0; i < ggml_backend_reg_count(); ++i) {
            backends.append(std::string(ggml_backend_reg_name(ggml_backend_reg_get(i))));
        }
        for (size_t i = 0; i < ggml_backend_dev_count(); ++i) {
            ggml_backend_dev_t dev = ggml_backend_dev_get(i);
            if (ggml_backend_dev_type(dev) != GGML_BACKEND_DEVICE_TYPE_GPU) continue;
            size_t mem_free = 0, mem_total = 0;
            ggml_backend_dev_memory(dev, &mem_free, &mem_total);
            py::dict g;
            g["name"]        = std::string(ggml_backend_dev_name(dev));
            g["description"] = std::string(ggml_backend_dev_description(dev));
            g["memory_total"] = mem_total;
            g["memory_free"]  = mem_free;
            gpus.append(g);
        }
        d["backends"] = backends;  // ggml's backend registries ("CPU", "CUDA", ...)
        d["gpus"]     = gpus;      // GPU devices: name, description, memory_total/free (bytes)
        return d;
    }, "CPU features ggml was built for, its backends and the devices it sees.");

    py::class_<Model>(m, "Model", "A GGUF model loaded for the native engine (weights memory-mapped).")
        .def(py::init([](const std::string & path, bool use_gpu, bool use_repack, int gpu_layers) {
                 ModelParams p;
                 p.use_gpu    = use_gpu;
                 p.use_repack = use_repack;
                 p.gpu_layers = gpu_layers;
                 py::gil_scoped_release release;
                 return Model::load(path, p);
             }),
             py::arg("path"), py::kw_only(), py::arg("use_gpu") = true, py::arg("use_repack") = true,
             py::arg("gpu_layers") = -1)
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
        .def_property_readonly("device", [](const Model & mm) { return std::string(ggml_backend_dev_name(mm.device)); })
        .def_property_readonly("gpu_layers", &Model::n_gpu_layers, "Layers whose weights and K/V are on the GPU.")
        .def_property_readonly("output_on_device", [](const Model & mm) { return mm.output_on_device; },
                               "Whether the embeddings, output norm and head are on `device`.");

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
        .def("set_shortlist", [](Context & c, const py::handle & tokens) {
                 std::vector<int32_t> t = as_tokens(tokens);
                 py::gil_scoped_release release;
                 c.set_shortlist(t);
             },
             py::arg("tokens"), "Set the shortlisted output head (distinct token ids) that probe_exits uses.")
        .def("run_pass", [](Context & c, const py::handle & tokens, uint32_t l_begin, uint32_t l_end, const std::string & head,
                            bool keep_hidden, bool fill_kv) {
                 std::vector<int32_t> t = as_tokens(tokens);
                 PassSpec p{l_begin, l_end, parse_head(head), keep_hidden, fill_kv};
                 if (l_begin >= std::min(l_end, c.n_layer()) && (l_begin == 0 || p.head == Head::None)) {
                     throw InvalidArgument("the pass runs no layer and no head");
                 }
                 py::gil_scoped_release release;
                 c.run_pass(t, p);
             },
             py::arg("tokens"), py::kw_only(), py::arg("l_begin") = 0, py::arg("l_end") = UINT32_MAX, py::arg("head") = "full",
             py::arg("keep_hidden") = false, py::arg("fill_kv") = false,
             "One pass over layers [l_begin, l_end) with head 'full', 'shortlist' or 'none' at positions n_past.., "
             "not advancing the sequence (for costing the parts of early exit).")
        .def("probe_exits", [](Context & c, const py::handle & tokens, std::vector<uint32_t> exit_layers) {
                 std::vector<int32_t> t = as_tokens(tokens);
                 std::vector<int32_t> full, top;
                 std::vector<float>   conf;
                 {
                     py::gil_scoped_release release;
                     c.probe_exits(t, exit_layers, full, top, conf);
                 }
                 const py::ssize_t n = static_cast<py::ssize_t>(t.size()), x = static_cast<py::ssize_t>(exit_layers.size());
                 py::array_t<int32_t> a_full(n), a_top({n, x});
                 py::array_t<float>   a_conf({n, x});
                 std::copy(full.begin(), full.end(), a_full.mutable_data());
                 std::copy(top.begin(), top.end(), a_top.mutable_data());
                 std::copy(conf.begin(), conf.end(), a_conf.mutable_data());
                 return py::make_tuple(a_full, a_top, a_conf);
             },
             py::arg("tokens"), py::arg("exit_layers"),
             "Run tokens as a new sequence; returns (full_top int32[n], exit_top int32[n, n_exits], exit_conf "
             "float32[n, n_exits]): the full model's pick and the shortlisted head's pick and confidence after each "
             "exit layer, per position.")
        .def_property_readonly("n_past", &Context::n_past)
        .def_property_readonly("n_ctx", &Context::n_ctx)
        .def_property_readonly("n_vocab", &Context::n_vocab)
        .def_property_readonly("n_outputs", &Context::n_outputs)
        .def_property("n_threads", &Context::n_threads, &Context::set_n_threads)
        .def_property_readonly("kv_bytes", &Context::kv_bytes)
        .def("timings", [](const Context & c) { return timings_dict(c.timings()); },
             "Cumulative time of forward passes by phase, in microseconds.")
        .def_property_readonly("compute_bytes", &Context::compute_bytes);

    py::class_<Event>(m, "Event", "What one step produced for one request.")
        .def_readonly("id", &Event::id)
        .def_readonly("tokens", &Event::tokens, "new tokens (several when drafted tokens were accepted)")
        .def_readonly("finish_reason", &Event::finish_reason, "'' while running; 'stop', 'length' or 'oom'")
        .def_readonly("n_prompt", &Event::n_prompt)
        .def_readonly("n_prompt_cached", &Event::n_prompt_cached, "prompt tokens served from the prefix cache")
        .def_readonly("layers_run", &Event::layers_run, "layer evaluations spent this step (drafts included)")
        .def_readonly("n_drafted", &Event::n_drafted, "lossless: positions drafted this step")
        .def_readonly("n_accepted", &Event::n_accepted, "lossless: drafted tokens the full model agreed with")
        .def_readonly("exit_layers", &Event::exit_layers, "per new token: after how many layers it was decided")
        .def_readonly("logprobs", &Event::logprobs,
                      "per new token when the request asked: its log-probability at temperature 1 (else empty)")
        .def_readonly("entropies", &Event::entropies,
                      "per new token when the request asked: the entropy in nats of the distribution it came from")
        .def_readonly("margins", &Event::margins,
                      "per new token when the request asked: its logit minus the best other logit it could have "
                      "been (only tokens the grammar allows, when there is one); inf when it was the only choice");

    // registered before BatchEngine, whose constructor takes one
    py::class_<Vocab> vocab_class(m, "Vocab", "Tokenizer and chat templates of a GGUF model, through libllama.");

    py::class_<BatchEngine>(m, "BatchEngine",
                            "Continuous batching over a paged KV cache with a prefix cache. Not thread-safe: "
                            "one thread submits, steps and cancels.")
        .def(py::init([](const Model & model, uint32_t kv_cache_mb, uint32_t n_blocks, uint32_t n_blocks_swa, uint32_t block_size,
                         uint32_t max_batched_tokens, uint32_t max_seqs, int n_threads, std::vector<int32_t> eog_tokens,
                         std::string model_key, std::vector<uint32_t> exit_layers, std::vector<float> exit_thresholds,
                         uint32_t draft_exit_layer, uint32_t draft_max, bool always_draft, const std::string & gather_kv,
                         const Vocab * vocab) {
                 BatchEngineParams p;
                 p.kv_cache_mb        = kv_cache_mb;
                 p.n_blocks           = n_blocks;
                 p.n_blocks_swa       = n_blocks_swa;
                 p.block_size         = block_size;
                 p.max_batched_tokens = max_batched_tokens;
                 p.max_seqs           = max_seqs;
                 p.n_threads          = n_threads;
                 p.eog_tokens         = std::move(eog_tokens);
                 p.model_key          = std::move(model_key);
                 p.exit_layers        = std::move(exit_layers);
                 p.exit_thresholds    = std::move(exit_thresholds);
                 p.draft_exit_layer   = draft_exit_layer;
                 p.draft_max          = draft_max;
                 p.always_draft       = always_draft;
                 if (gather_kv == "auto") p.gather_kv = GatherPolicy::Auto;
                 else if (gather_kv == "never") p.gather_kv = GatherPolicy::Never;
                 else if (gather_kv == "always") p.gather_kv = GatherPolicy::Always;
                 else throw InvalidArgument("gather_kv must be 'auto', 'never' or 'always', got '" + gather_kv + "'");
                 py::gil_scoped_release release;
                 return std::make_unique<BatchEngine>(model, p, vocab);
             }),
             py::arg("model"), py::kw_only(), py::arg("kv_cache_mb") = 256, py::arg("n_blocks") = 0, py::arg("n_blocks_swa") = 0,
             py::arg("block_size") = 16,
             py::arg("max_batched_tokens") = 512, py::arg("max_seqs") = 16, py::arg("n_threads") = 2,
             py::arg("eog_tokens") = std::vector<int32_t>{}, py::arg("model_key") = "",
             py::arg("exit_layers") = std::vector<uint32_t>{}, py::arg("exit_thresholds") = std::vector<float>{},
             py::arg("draft_exit_layer") = 0, py::arg("draft_max") = 8, py::arg("always_draft") = false,
             py::arg("gather_kv") = "auto", py::arg("vocab") = py::none(),
             py::keep_alive<1, 2>(), py::keep_alive<1, 18>(),
             "vocab: the model's Vocab, needed by requests with a grammar (the engine keeps it alive).")
        .def("submit", [](BatchEngine & e, const py::handle & prompt, uint32_t max_tokens, float temperature, int32_t top_k,
                          float top_p, float min_p, float repeat_penalty, int32_t repeat_last_n, uint64_t seed,
                          bool stop_at_eog, std::string tenant, const std::string & exit_mode, float exit_threshold,
                          bool logprobs, int64_t adapter, std::string grammar,
                          std::vector<std::vector<int32_t>> choices) {
                 if (adapter < 0) throw InvalidArgument("adapter must be an id from load_adapter, or 0 for none");
                 Request r;
                 r.adapter        = adapter;
                 r.logprobs       = logprobs;
                 r.exit_mode      = parse_exit_mode(exit_mode);
                 r.exit_threshold = exit_threshold;
                 r.prompt                  = as_tokens(prompt);
                 r.max_tokens              = max_tokens;
                 r.sampling = sampling_params(temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed);
                 r.stop_at_eog             = stop_at_eog;
                 r.tenant                  = std::move(tenant);
                 r.grammar                 = std::move(grammar);
                 r.choices                 = std::move(choices);
                 return e.submit(r);
             },
             py::arg("prompt"), py::kw_only(), py::arg("max_tokens") = 256, py::arg("temperature") = 0.8f,
             py::arg("top_k") = 40, py::arg("top_p") = 0.95f, py::arg("min_p") = 0.05f, py::arg("repeat_penalty") = 1.0f,
             py::arg("repeat_last_n") = 64, py::arg("seed") = 0, py::arg("stop_at_eog") = true, py::arg("tenant") = "",
             py::arg("exit_mode") = "off", py::arg("exit_threshold") = -1.0f, py::arg("logprobs") = false,
             py::arg("adapter") = 0, py::arg("grammar") = "", py::arg("choices") = std::vector<std::vector<int32_t>>{},
             "Queue a request (prompt token ids); returns its id. exit_mode: 'off', 'lossless' (self-speculative, "
             "same output) or 'adaptive' (confidence-based early exit; exit_threshold < 0 uses the calibrated ones). "
             "logprobs: score every new token (Event.logprobs, Event.entropies; one pass over the vocabulary each). "
             "adapter: a LoRA adapter id from load_adapter, 0 for the base model. "
             "grammar: GBNF (root rule 'root') every new token must follow, '' for none; needs the engine's vocab; "
             "ValueError naming the problem when libllama cannot parse it. "
             "choices: or the output is exactly one of these token sequences (each as the model writes it "
             "after the prompt), then ends; margins then compare the answers (ValueError for an empty one or "
             "a token outside the vocabulary).")
        .def("load_adapter", [](BatchEngine & e, const std::string & path, float scale) {
                 py::gil_scoped_release release;
                 return e.load_adapter(path, scale);
             },
             py::arg("path"), py::kw_only(), py::arg("scale") = 1.0f,
             "Load a llama.cpp LoRA GGUF adapter onto the model (checked against it: ModelFormatError names the "
             "offending key or tensor); returns its id (>= 1, never reused). Its term is scale * alpha / rank * B(A x).")
        .def("unload_adapter", [](BatchEngine & e, int64_t id) {
                 py::gil_scoped_release release;
                 return e.unload_adapter(id);
             },
             py::arg("id"),
             "Unload an adapter. True: freed now. False: deferred, because waiting or running requests use it; "
             "new requests naming it are refused from now on and it is freed when the last of them finishes or is "
             "cancelled. ValueError for an unknown id.")
        .def("adapters", [](const BatchEngine & e) {
                 py::list out;
                 for (const AdapterInfo & a : e.adapters()) {
                     py::dict d;
                     d["id"]           = a.id;
                     d["path"]         = a.path;
                     d["scale"]        = a.scale;
                     d["alpha"]        = a.alpha;
                     d["rank"]         = a.rank;
                     d["n_weights"]    = a.n_weights;
                     char hex[17];
                     std::snprintf(hex, sizeof(hex), "%016llx", static_cast<unsigned long long>(a.content_hash));
                     d["content_hash"] = std::string(hex);
                     d["file_bytes"]   = a.file_bytes;
                     d["n_requests"]   = a.n_requests;
                     d["unloading"]    = a.unloading;
                     out.append(d);
                 }
                 return out;
             },
             "The loaded adapters, by id: id, path, scale, alpha, rank, n_weights, content_hash (hex), file_bytes, "
             "n_requests (waiting or running), unloading (a deferred unload).")
        .def("cancel", &BatchEngine::cancel, py::arg("id"), "Drop a request now, freeing its KV blocks.")
        .def("step", [](BatchEngine & e) {
                 py::gil_scoped_release release;
                 return e.step();
             },
             "Run one scheduling step and batched forward pass (several with early exit): the Events it produced.")
        .def("set_shortlist", [](BatchEngine & e, const py::handle & tokens) {
                 std::vector<int32_t> t = as_tokens(tokens);
                 py::gil_scoped_release release;
                 e.set_shortlist(t);
             },
             py::arg("tokens"), "Set the shortlisted output head early exit uses (distinct token ids).")
        .def_property_readonly("shortlist", &BatchEngine::shortlist)
        .def_property_readonly("idle", &BatchEngine::idle)
        .def_property_readonly("max_seq_len", &BatchEngine::max_seq_len)
        .def("stats", [](const BatchEngine & e) {
                 const auto s = e.stats();
                 py::dict d;
                 d["n_blocks"]             = s.n_blocks;
                 d["n_free_blocks"]        = s.n_free_blocks;
                 d["n_blocks_swa"]         = s.n_blocks_swa;
                 d["n_free_blocks_swa"]    = s.n_free_blocks_swa;
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
                 d["kv_bytes_per_token_swa"] = s.kv_bytes_per_token_swa;
                 d["spec_steps"]           = s.spec_steps;
                 d["plain_decode_steps"]   = s.plain_decode_steps;
                 d["drafted"]              = s.drafted;
                 d["accepted"]             = s.accepted;
                 d["adaptive_tokens"]      = s.adaptive_tokens;
                 d["spec_acceptance"]      = s.spec_acceptance;
                 auto pass_table = [](const std::vector<std::pair<uint32_t, double>> & t) {
                     py::dict out;
                     for (const auto & [rows, us] : t) out[py::int_(rows)] = us;
                     return out;
                 };
                 d["spec_draft_us"]  = pass_table(s.spec_draft_us);
                 d["spec_verify_us"] = pass_table(s.spec_verify_us);
                 d["spec_plain_us"]  = pass_table(s.spec_plain_us);
                 py::dict choices;
                 for (const auto & [n, c] : s.spec_choices) {
                     py::dict x;
                     x["drafting"]           = c.spec;
                     x["cap"]                = c.cap;
                     x["spec_us_per_token"]  = c.spec_us_per_token;
                     x["plain_us_per_token"] = c.plain_us_per_token;
                     x["why"]                = std::string(c.why);
                     choices[py::int_(n)]    = x;
                 }
                 d["spec_choices"] = choices;
                 d["exits_per_layer"]      = s.exits_per_layer;
                 d["n_adapters"]           = s.n_adapters;
                 d["adapter_bytes"]        = s.adapter_bytes;
                 return d;
             })
        .def("save_prefix", [](BatchEngine & e, const py::handle & tokens, const std::string & tenant, const std::string & path,
                               int64_t adapter) {
                 std::vector<int32_t> t = as_tokens(tokens);
                 py::gil_scoped_release release;
                 return e.save_prefix(t, tenant, path, adapter);
             },
             py::arg("tokens"), py::kw_only(), py::arg("tenant") = "", py::arg("path"), py::arg("adapter") = 0,
             "Write the cached K/V of the full blocks that start `tokens` (for `tenant`, under `adapter`, 0: none) to "
             "`path`; returns the tokens saved.")
        .def("load_prefix", [](BatchEngine & e, const std::string & path) {
                 py::gil_scoped_release release;
                 return e.load_prefix(path);
             },
             py::arg("path"), "Read a saved prefix into the prefix cache; returns the tokens loaded.")
        .def("timings", [](const BatchEngine & e) { return timings_dict(e.timings()); },
             "Cumulative time of forward passes by phase, in microseconds.")
        .def("check_invariants", &BatchEngine::check_invariants,
             "Block-pool invariants: '' when every block is free or held and ref counts match.");

    vocab_class
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

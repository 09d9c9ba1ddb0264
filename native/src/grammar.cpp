#include "grammar.h"

#include "error.h"
#include "sampler.h"
#include "vocab.h"

#include "ggml.h"
#include "llama.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <mutex>
#include <utility>
#include <vector>
#include <unistd.h>

namespace appliance {

namespace {

// Why libllama refused a grammar. Its parser writes the reason straight to stderr, the rest of its
// complaints go to the log callback, and it returns nullptr. So a refused grammar is parsed once more
// with fd 2 pointing at a temporary file and a log callback that keeps the lines; afterwards the
// previous callback gets those lines and stderr what the file caught, so no output is lost (a line
// another thread logs meanwhile is only delayed).
struct LogLines {
    std::mutex                                        mu;
    std::vector<std::pair<ggml_log_level, std::string>> lines;
};

void keep_line(ggml_log_level level, const char * text, void * user) {
    auto *                      keep = static_cast<LogLines *>(user);
    std::lock_guard<std::mutex> lock(keep->mu);
    keep->lines.emplace_back(level, text != nullptr ? text : "");
}

std::string parse_error(const llama_vocab * vocab, const std::string & gbnf, const std::string & root) {
    static std::mutex           mu;
    std::lock_guard<std::mutex> lock(mu);
    ggml_log_callback           prev_llama = nullptr, prev_ggml = nullptr;
    void *                      prev_llama_ud = nullptr, * prev_ggml_ud = nullptr;
    llama_log_get(&prev_llama, &prev_llama_ud);
    ggml_log_get(&prev_ggml, &prev_ggml_ud);
    static LogLines keep;  // static: a thread that fetched the callback just before it is put back may still call it
    {
        std::lock_guard<std::mutex> lines_lock(keep.mu);
        keep.lines.clear();
    }
    llama_log_set(keep_line, &keep);  // ggml's too

    std::FILE * tmp   = std::tmpfile();
    int         saved = -1;
    std::fflush(stderr);
    if (tmp != nullptr) {
        saved = dup(STDERR_FILENO);
        if (saved >= 0 && dup2(fileno(tmp), STDERR_FILENO) < 0) {
            close(saved);
            saved = -1;
        }
    }
    llama_sampler * s = llama_sampler_init_grammar(vocab, gbnf.c_str(), root.c_str());
    std::fflush(stderr);
    if (saved >= 0) {
        dup2(saved, STDERR_FILENO);
        close(saved);
    }
    llama_log_set(prev_llama, prev_llama_ud);
    ggml_log_set(prev_ggml, prev_ggml_ud);
    if (s != nullptr) llama_sampler_free(s);

    std::string text;
    if (tmp != nullptr) {
        std::rewind(tmp);
        char   buf[4096];
        size_t got;
        while ((got = std::fread(buf, 1, sizeof buf, tmp)) > 0) text.append(buf, got);
        std::fclose(tmp);
        std::fwrite(text.data(), 1, text.size(), stderr);
    }
    std::lock_guard<std::mutex> lines_lock(keep.mu);
    for (const auto & [level, line] : keep.lines) {
        if (prev_llama != nullptr) prev_llama(level, line.c_str(), prev_llama_ud);
        text += "\n" + line;
    }

    // the parser's own reason first (after its prefix), then the lines libllama logged
    const std::string parse_key = "error parsing grammar: ";
    for (const char * key : {"error parsing grammar: ", "grammar does not contain", "left recursion", "undefined rule"}) {
        size_t at = text.find(key);
        if (at == std::string::npos) continue;
        if (key == parse_key) {
            at += parse_key.size();
        } else {
            const size_t nl = text.rfind('\n', at);
            at = nl == std::string::npos ? 0 : nl + 1;
        }
        std::string line = text.substr(at, text.find('\n', at) - at);
        if (line.size() > 200) line = line.substr(0, 200) + "...";
        return line;
    }
    return "";
}

}  // namespace

Grammar::Grammar(const Vocab & vocab, const std::string & gbnf, const std::string & root)
    : n_tokens_(vocab.n_tokens()) {
    APPL_REQUIRE(!gbnf.empty(), InvalidArgument, "grammar is empty");
    APPL_REQUIRE(gbnf.find('\0') == std::string::npos, InvalidArgument, "grammar contains a NUL character");
    smpl_ = llama_sampler_init_grammar(vocab.raw(), gbnf.c_str(), root.c_str());
    if (smpl_ == nullptr) {
        const std::string why = parse_error(vocab.raw(), gbnf, root);
        throw InvalidArgument("invalid grammar (GBNF): " + (why.empty() ? std::string("libllama cannot parse it") : why));
    }
}

Grammar::~Grammar() {
    if (smpl_ != nullptr) llama_sampler_free(smpl_);
}

bool Grammar::allows(int32_t token) {
    if (token < 0 || token >= n_tokens_) return false;
    llama_token_data       d{token, 0.0f, 0.0f};
    llama_token_data_array a{&d, 1, -1, false};
    llama_sampler_apply(smpl_, &a);
    return std::isfinite(d.logit);
}

int32_t Grammar::mask(float * logits, int32_t n, const int32_t * ids) {
    std::vector<llama_token_data> cands;
    std::vector<int32_t>          at;  // index into logits of each candidate
    for (int32_t i = 0; i < n; ++i) {
        const int32_t tok = ids != nullptr ? ids[i] : i;
        if (logits[i] == -INFINITY) continue;
        if (tok < 0 || tok >= n_tokens_) {  // padding rows past the tokenizer's vocabulary
            logits[i] = -INFINITY;
            continue;
        }
        cands.push_back(llama_token_data{tok, logits[i], 0.0f});
        at.push_back(i);
    }
    llama_token_data_array a{cands.data(), cands.size(), -1, false};
    llama_sampler_apply(smpl_, &a);
    int32_t allowed = 0;
    for (size_t c = 0; c < cands.size(); ++c) {
        if (cands[c].logit == -INFINITY) {
            logits[at[c]] = -INFINITY;
        } else {
            ++allowed;
        }
    }
    return allowed;
}

float Grammar::runner_up(const float * logits, int32_t n, int32_t chosen) {
    APPL_REQUIRE(n > 0 && chosen >= 0 && chosen < n, InvalidArgument, "row size or token out of range");
    // The best m tokens by logit, best first, checked in growing slices (16, 64, 256): the first
    // allowed one is the answer, since every token after it has a logit no larger. The grammar
    // checks each candidate's text against its stacks, so few candidates are far cheaper than many.
    const int32_t m = std::min<int32_t>(n, 256);
    auto by_logit = [&](int32_t a, int32_t b) { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); };
    order_.resize(static_cast<size_t>(n));
    for (int32_t i = 0; i < n; ++i) order_[i] = i;
    if (m < n) std::nth_element(order_.begin(), order_.begin() + m, order_.end(), by_logit);
    std::sort(order_.begin(), order_.begin() + m, by_logit);
    std::vector<llama_token_data> cands;
    for (int32_t lo = 0, hi = std::min(m, 16); lo < m; lo = hi, hi = std::min(m, hi * 4)) {
        cands.clear();
        for (int32_t j = lo; j < hi; ++j) {
            const int32_t i = order_[j];
            if (i != chosen && i < n_tokens_ && logits[i] != -INFINITY) cands.push_back(llama_token_data{i, logits[i], 0.0f});
        }
        if (cands.empty()) continue;
        llama_token_data_array a{cands.data(), cands.size(), -1, false};
        llama_sampler_apply(smpl_, &a);
        for (const llama_token_data & c : cands) {  // still best first
            if (c.logit != -INFINITY) return logits[c.id];
        }
    }
    if (m == n) return -INFINITY;
    row_.assign(logits, logits + n);  // none of the best m: look at every token (rare)
    row_[chosen] = -INFINITY;
    for (int32_t j = 0; j < m; ++j) row_[order_[j]] = -INFINITY;
    return mask(row_.data(), n) > 0 ? *std::max_element(row_.begin(), row_.end()) : -INFINITY;
}

void Grammar::accept(int32_t token) {
    // libllama aborts on an end-of-generation token the grammar does not allow, and throws for other
    // tokens it cannot take: check first
    APPL_REQUIRE(allows(token), RuntimeFailure, "token " + std::to_string(token) + " is not allowed by the grammar");
    try {
        llama_sampler_accept(smpl_, token);
    } catch (const std::exception & e) {
        throw RuntimeFailure(std::string("grammar: ") + e.what());
    }
}

int32_t Grammar::sample(Sampler & sampler, const float * logits, const std::vector<int32_t> & history) {
    const int32_t tok = sampler.sample(logits, history);
    if (allows(tok)) return tok;
    const int32_t          n = sampler.n_vocab();
    const SamplingParams & p = sampler.params();
    // The draw only ever sees the k best tokens (greedy: 1, top-k: k). Without a penalty reordering
    // them, when k of the best M tokens are allowed, those are the masked row's k best too: masking M
    // candidates then gives exactly the draw masking all of them would (the same total order by logit,
    // then id, as the sampler's), at a fraction of the cost on a large vocabulary.
    const int32_t k = p.temperature <= 0.0f ? 1 : p.top_k;
    const bool    penalized = p.repeat_penalty != 1.0f && p.repeat_last_n > 0;
    if (k > 0 && !penalized) {
        const int32_t m = std::min(n, std::max<int32_t>(256, 4 * k));
        if (m < n) {
            order_.resize(static_cast<size_t>(n));
            for (int32_t i = 0; i < n; ++i) order_[i] = i;
            std::nth_element(order_.begin(), order_.begin() + m, order_.end(), [&](int32_t a, int32_t b) {
                return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
            });
            row_.assign(static_cast<size_t>(n), -INFINITY);
            for (int32_t j = 0; j < m; ++j) row_[order_[j]] = logits[order_[j]];
            if (mask(row_.data(), n) >= k) return sampler.sample(row_.data(), history);
        }
    }
    row_.assign(logits, logits + n);
    if (mask(row_.data(), n) == 0) return -1;
    return sampler.sample(row_.data(), history);
}

}  // namespace appliance

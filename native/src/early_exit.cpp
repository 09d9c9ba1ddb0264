// Early exit in the continuous-batching engine: the decode steps of the two modes. A step takes one
// of them when every scheduled sequence decodes a single token in that mode (prefill chunks and
// mixed batches run the ordinary full-depth step).
//
// lossless (self-speculative): the draft runs layers [0, E) and the shortlisted head, one pass per
//   drafted position, keeping each position's layer-E hidden state; one verification pass then runs
//   layers [E, n_layer) and the full head over all drafted positions at once, and the longest run the
//   full model agrees with is kept, plus the full model's own token at the first disagreement. The
//   first E layers' K/V of the kept positions are exactly what a full-depth pass writes (same token,
//   same position), so nothing goes stale; the rest is overwritten later. With E = n_layer the draft
//   is the full network with a cheap head and verification is the full head alone.
// adaptive (CALM): a token runs to the first exit layer, where the shortlisted head gives a
//   confidence (the top softmax probability over the shortlist); above the layer's threshold the
//   token is emitted from there and the K/V of the layers it skipped are filled from its hidden state,
//   otherwise it runs on to the next exit layer, and finally through the full network and head.
// A request with a constraint (a grammar or choices, constraint.h): lossless drafts ignore it and
//   verification samples under it, so the output is full depth's under it (drafts it rules out are
//   simply not accepted); adaptive exits weigh only the shortlisted tokens it allows (none: on to
//   the next layer).
#include "batch_engine.h"

#include "clock.h"
#include "error.h"
#include "model.h"

#include <algorithm>
#include <cmath>

namespace appliance {

void BatchEngine::check_exit_params() const {
    const uint32_t L = model_.hp.n_layer;
    const auto &   e = params_.exit_layers;
    APPL_REQUIRE(L <= 0xffff, InvalidArgument, "early exit supports at most 65535 layers");
    APPL_REQUIRE(e.size() == params_.exit_thresholds.size(), InvalidArgument,
                 "exit_layers and exit_thresholds must have the same length");
    for (size_t i = 0; i < e.size(); ++i) {
        APPL_REQUIRE(e[i] >= 1 && e[i] < L, InvalidArgument,
                     "exit layer " + std::to_string(e[i]) + " is outside [1, " + std::to_string(L - 1) + "]");
        APPL_REQUIRE(i == 0 || e[i] > e[i - 1], InvalidArgument, "exit_layers must be ascending");
        const float t = params_.exit_thresholds[i];
        APPL_REQUIRE(t >= 0.0f && t <= 1.0f, InvalidArgument, "exit thresholds must be in [0, 1]");
    }
    APPL_REQUIRE(params_.draft_exit_layer <= L, InvalidArgument,
                 "draft_exit_layer must be in [0, " + std::to_string(L) + "]");
    APPL_REQUIRE(params_.draft_max >= 1 && params_.draft_max <= 64, InvalidArgument, "draft_max must be in [1, 64]");
}

ExitMode BatchEngine::exit_mode_for(const std::vector<Scheduled> & plan) const {
    if (runner_.shortlist() == nullptr) return ExitMode::Off;
    const ExitMode mode = plan.front().seq->exit_mode;
    for (const Scheduled & sc : plan) {
        const Sequence & s = *sc.seq;
        const bool decode = sc.n_tokens == 1 && s.n_computed + 1 == s.tokens.size();
        if (!decode || s.exit_mode != mode) return ExitMode::Off;
    }
    return mode;
}

int32_t BatchEngine::sample_shortlist(Sequence & s, const float * row, TokenScore * sc) {
    // spread the shortlist's logits over the vocabulary (everything else impossible) so the request's
    // own sampler (penalties, temperature, seed) decides, then clear them again
    const std::vector<int32_t> & ids = runner_.shortlist()->tokens();
    if (vocab_row_.size() != model_.hp.n_vocab) vocab_row_.assign(model_.hp.n_vocab, -INFINITY);
    for (size_t i = 0; i < ids.size(); ++i) vocab_row_[ids[i]] = row[i];
    const int32_t tok = s.sampler.sample(vocab_row_.data(), s.tokens);
    if (sc != nullptr) *sc = score(s, vocab_row_.data(), model_.hp.n_vocab, tok);
    for (int32_t id : ids) vocab_row_[id] = -INFINITY;
    return tok;
}

namespace {

// each sequence's drafted positions take hidden rows [j * stride, j * stride + k)
uint32_t draft_stride(uint32_t draft_max, uint32_t n_hidden_rows, uint32_t n) {
    return std::max<uint32_t>(1, std::min(draft_max, n_hidden_rows / n));
}

}  // namespace

std::vector<uint32_t> BatchEngine::draft_lengths(const std::vector<Scheduled> & plan) const {
    const uint32_t        n      = static_cast<uint32_t>(plan.size());
    const uint32_t        stride = draft_stride(params_.draft_max, runner_.n_hidden_rows(), n);
    std::vector<uint32_t> ks;
    for (const Scheduled & sc : plan) {
        const Sequence & s    = *sc.seq;
        const uint32_t   left = s.max_tokens - std::min(s.max_tokens, s.n_generated());
        ks.push_back(std::max<uint32_t>(1, std::min({s.draft_len, stride, left, max_seq_len() - s.n_computed})));
    }
    return ks;
}

void BatchEngine::observe_acceptance(const float * row, int32_t tok) {
    // only where a plain step sees what the draft would: the draft is the whole network and the
    // shortlisted head, whose logits are the full head's at the shortlisted ids
    if (params_.draft_exit_layer != 0 && params_.draft_exit_layer != model_.hp.n_layer) return;
    const std::vector<int32_t> & ids  = runner_.shortlist()->tokens();
    int32_t                      best = ids[0];
    for (int32_t id : ids) best = row[id] > row[best] ? id : best;
    spec_.record_acceptance(best == tok ? 1 : 0, 1);
}

void BatchEngine::step_lossless(const std::vector<Scheduled> & plan, std::vector<Event> & events, uint32_t cap) {
    const uint32_t               L       = model_.hp.n_layer;
    const uint32_t               E       = params_.draft_exit_layer == 0 ? L : params_.draft_exit_layer;
    const uint32_t               n_vocab = model_.hp.n_vocab;
    const std::vector<int32_t> & ids     = runner_.shortlist()->tokens();
    const uint32_t               n_short = static_cast<uint32_t>(ids.size());
    const uint32_t               n       = static_cast<uint32_t>(plan.size());
    const uint32_t stride = draft_stride(params_.draft_max, runner_.n_hidden_rows(), n);
    const std::vector<uint32_t> planned = draft_lengths(plan);

    struct Draft {
        Sequence *           s;
        uint32_t             k;   // positions drafted (and verified)
        uint32_t             p0;  // first position: the sequence's last, not yet computed, token
        std::vector<int32_t> toks;
    };
    std::vector<Draft> d;
    uint32_t           K = 0;
    batch_.clear();
    for (size_t j = 0; j < plan.size(); ++j) {
        Sequence & s = *plan[j].seq;
        uint32_t   k = std::max<uint32_t>(1, std::min(planned[j], cap));
        while (k > 1 && !sched_.grow(s, s.n_computed + k)) --k;  // the scheduler gave blocks for one
        d.push_back({&s, k, s.n_computed, {}});
        K = std::max(K, k);
        batch_.views.push_back(view(s));
    }
    const std::vector<SeqView> views = batch_.views;
    auto input = [](const Draft & dr, uint32_t i) { return i == 0 ? dr.s->tokens.back() : dr.toks[i - 1]; };

    // draft: pass i runs position p0 + i of every sequence still drafting
    const PassSpec draft{0, E, Head::Shortlist, /*keep_hidden=*/true, /*fill_kv=*/false};
    for (uint32_t i = 0; i < K; ++i) {
        batch_.clear();
        batch_.views = views;
        for (uint32_t j = 0; j < n; ++j) {
            if (i >= d[j].k) continue;
            batch_.add(input(d[j], i), static_cast<int32_t>(d[j].p0 + i), static_cast<int32_t>(j), true);
            batch_.hidden_rows.push_back(static_cast<int32_t>(j * stride + i));
        }
        const uint64_t t_pass = now_us();
        runner_.run(batch_, logits_, draft);
        spec_.record_pass(SpecPolicy::Pass::Draft, batch_.size(), now_us() - t_pass);
        uint32_t row = 0;
        for (uint32_t j = 0; j < n; ++j) {
            if (i >= d[j].k) continue;
            const int32_t tok = ids[argmax(logits_.data() + static_cast<size_t>(row++) * n_short, static_cast<int32_t>(n_short))];
            d[j].toks.push_back(tok);
            if (eog_.count(tok) != 0) d[j].k = i + 1;  // nothing to draft after the end
        }
    }

    // verify: layers [E, L) and the full head over every drafted position at once
    batch_.clear();
    batch_.views = views;
    for (uint32_t j = 0; j < n; ++j) {
        for (uint32_t i = 0; i < d[j].k; ++i) {
            batch_.add(input(d[j], i), static_cast<int32_t>(d[j].p0 + i), static_cast<int32_t>(j), true);
            batch_.hidden_rows.push_back(static_cast<int32_t>(j * stride + i));
        }
    }
    const uint64_t t_verify = now_us();
    runner_.run(batch_, logits_, PassSpec{E, L, Head::Full, false, false});
    spec_.record_pass(SpecPolicy::Pass::Verify, batch_.size(), now_us() - t_verify);
    ++n_steps_;
    ++spec_steps_;

    // keep the agreeing run, then the full model's own token
    size_t row = 0;
    for (Draft & dr : d) {
        Sequence &   s   = *dr.s;
        const size_t evi = events.size();
        events.push_back(Event{s.id, {}, "", s.n_prompt, s.n_prompt_cached});
        events[evi].layers_run = dr.k * L;
        events[evi].n_drafted  = dr.k;
        drafted_ += dr.k;
        bool     alive    = true;
        uint32_t accepted = 0, compared = 0;
        for (uint32_t i = 0; i < dr.k && alive; ++i) {
            const float * lrow = logits_.data() + (row + i) * n_vocab;
            const int32_t tok  = sample(s, lrow);
            s.n_computed += 1;  // position p0 + i held an accepted token: its K/V stand
            events[evi].exit_layers.push_back(static_cast<uint16_t>(L));
            ++compared;
            const bool agree = tok == dr.toks[i];
            accepted += agree ? 1 : 0;
            alive = emit(s, tok, events, score(s, lrow, n_vocab, tok));  // s is gone when this is false
            if (!agree) break;
        }
        row += dr.k;
        events[evi].n_accepted = accepted;
        accepted_ += accepted;
        spec_.record_acceptance(accepted, compared);
        if (alive) {
            advanced(s);
            // all accepted: longer (a step's cap does not shorten the sequence's own length)
            s.draft_len = accepted == dr.k ? std::min(std::max(s.draft_len, dr.k + 2), stride)
                                           : std::max<uint32_t>(1, accepted + 1);
        }
    }
}

void BatchEngine::step_adaptive(const std::vector<Scheduled> & plan, std::vector<Event> & events) {
    const uint32_t               L       = model_.hp.n_layer;
    const uint32_t               n_vocab = model_.hp.n_vocab;
    const std::vector<int32_t> & ids     = runner_.shortlist()->tokens();
    const uint32_t               n_short = static_cast<uint32_t>(ids.size());
    const uint32_t               n       = static_cast<uint32_t>(plan.size());

    batch_.clear();
    for (const Scheduled & sc : plan) batch_.views.push_back(view(*sc.seq));
    const std::vector<SeqView> views = batch_.views;
    std::vector<uint32_t>      layers(n, 0);
    std::vector<uint32_t>      active(n);
    for (uint32_t j = 0; j < n; ++j) active[j] = j;

    auto run_active = [&](const PassSpec & pass) {
        batch_.clear();
        batch_.views = views;
        for (uint32_t j : active) {
            const Sequence & s = *plan[j].seq;
            batch_.add(s.tokens.back(), static_cast<int32_t>(s.n_computed), static_cast<int32_t>(j), true);
            batch_.hidden_rows.push_back(static_cast<int32_t>(j));
        }
        runner_.run(batch_, logits_, pass);
        const uint32_t l_end = std::min(pass.l_end, L);
        for (uint32_t j : active) layers[j] += l_end - pass.l_begin;
    };
    auto decide = [&](uint32_t j, int32_t tok, uint32_t at, TokenScore sc) {
        Sequence & s = *plan[j].seq;
        s.n_computed += 1;
        advanced(s);
        events.push_back(Event{s.id, {}, "", s.n_prompt, s.n_prompt_cached});
        events.back().layers_run = layers[j];
        events.back().exit_layers.push_back(static_cast<uint16_t>(at));
        exits_per_layer_[at] += 1;
        ++adaptive_tokens_;
        emit(s, tok, events, sc);
    };

    std::vector<float> masked;  // a constrained sequence's shortlist row
    uint32_t           begin = 0;
    for (size_t x = 0; x < params_.exit_layers.size() && !active.empty(); ++x) {
        const uint32_t e = params_.exit_layers[x];
        run_active(PassSpec{begin, e, Head::Shortlist, /*keep_hidden=*/true, /*fill_kv=*/true});
        std::vector<uint32_t> stay;
        for (size_t r = 0; r < active.size(); ++r) {
            const uint32_t j   = active[r];
            Sequence &     s   = *plan[j].seq;
            const float *  row = logits_.data() + r * n_short;
            if (s.constraint) {  // only the tokens the constraint allows: the confidence and the draw are theirs
                masked.assign(row, row + n_short);
                if (s.constraint->mask(masked.data(), static_cast<int32_t>(n_short), ids.data()) == 0) {
                    stay.push_back(j);  // none shortlisted: the full head decides
                    continue;
                }
                row = masked.data();
            }
            const float    thr = s.exit_threshold >= 0.0f ? s.exit_threshold : params_.exit_thresholds[x];
            if (softmax_stats(row, static_cast<int32_t>(n_short)).top_prob() > thr) {
                TokenScore    sc;
                const int32_t tok = sample_shortlist(s, row, &sc);
                decide(j, tok, e, sc);
            } else {
                stay.push_back(j);
            }
        }
        active.swap(stay);
        begin = e;
    }
    if (!active.empty()) {
        run_active(PassSpec{begin, L, Head::Full, false, false});
        const std::vector<uint32_t> last = active;
        for (size_t r = 0; r < last.size(); ++r) {
            Sequence & s = *plan[last[r]].seq;
            const float * lrow = logits_.data() + r * n_vocab;
            const int32_t tok  = sample(s, lrow);
            decide(last[r], tok, L, score(s, lrow, n_vocab, tok));
        }
    }
    ++n_steps_;
}

}  // namespace appliance

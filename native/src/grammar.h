// Grammar-constrained decoding: libllama's grammar sampler (GBNF, as llama.cpp writes grammars and as
// llama_cpp.llama_grammar converts JSON Schema) over the model's vocabulary. One Grammar follows one
// sequence: mask() rules out the tokens it cannot take next (end-of-generation tokens stay allowed only
// once the grammar is complete: libllama's grammar sampler decides that), accept() advances it past
// the token the sequence emitted.
#pragma once

#include "constraint.h"

#include <cstdint>
#include <string>
#include <vector>

struct llama_sampler;

namespace appliance {

class Sampler;
class Vocab;

class Grammar final : public Constraint {
public:
    // Throws InvalidArgument naming the problem (libllama's parser message) for a grammar that does
    // not parse, lacks the `root` rule, is left-recursive or references an undefined rule.
    Grammar(const Vocab & vocab, const std::string & gbnf, const std::string & root = "root");
    ~Grammar() override;
    Grammar(const Grammar &)             = delete;
    Grammar & operator=(const Grammar &) = delete;

    // whether `token` may come next
    bool    allows(int32_t token) override;
    // logits[i] = -inf for every i in [0, n) the grammar rules out next; with `ids`, logits[i] is the
    // logit of token ids[i] (a shortlisted head's row). Entries already -inf are not looked at.
    // Returns how many stay allowed.
    int32_t mask(float * logits, int32_t n, const int32_t * ids = nullptr) override;
    // The largest logit of a token the grammar allows next, other than `chosen` (-inf when none is):
    // the runner-up a constrained draw beat. Looks at the best few hundred tokens first.
    float   runner_up(const float * logits, int32_t n, int32_t chosen) override;
    // Advances past `token`, which must be allowed. Throws RuntimeFailure otherwise.
    void    accept(int32_t token) override;

    // Draws with `sampler` from a row over the vocabulary, restricted to what the grammar allows: the
    // unrestricted draw is kept when the grammar allows it (one check, the common case, as llama.cpp's
    // common sampler does; greedy gives exactly the argmax of the masked row, and a kept draw has the
    // masked distribution's probability), otherwise the draw is made again from the masked row (where
    // the draw sees only the best k tokens, only the best few hundred are looked at when that gives
    // the same draw). -1 when the grammar allows no token of the row.
    int32_t sample(Sampler & sampler, const float * logits, const std::vector<int32_t> & history) override;

private:
    llama_sampler *    smpl_     = nullptr;
    int32_t            n_tokens_ = 0;
    std::vector<float>   row_;    // scratch: the masked row
    std::vector<int32_t> order_;  // scratch: token ids by logit
};

}  // namespace appliance

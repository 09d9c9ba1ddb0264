// What a sequence may generate next, beyond its sampler: a GBNF grammar (grammar.h) or a fixed set of
// answers (choices.h). One Constraint follows one sequence: mask() rules out the tokens it cannot take
// next, sample() draws under it, runner_up() names the best token it would have allowed instead of
// the chosen one (the margin a confidence rule reads), accept() advances it past the emitted token.
#pragma once

#include <cstdint>
#include <vector>

namespace appliance {

class Sampler;

class Constraint {
public:
    virtual ~Constraint() = default;

    // whether `token` may come next
    virtual bool    allows(int32_t token) = 0;
    // logits[i] = -inf for every i in [0, n) ruled out next; with `ids`, logits[i] is the logit of
    // token ids[i] (a shortlisted head's row). Entries already -inf stay so. Returns how many stay allowed.
    virtual int32_t mask(float * logits, int32_t n, const int32_t * ids = nullptr) = 0;
    // The largest logit of a token allowed next other than `chosen` (-inf when none is).
    virtual float   runner_up(const float * logits, int32_t n, int32_t chosen) = 0;
    // Advances past `token`, which must be allowed. Throws RuntimeFailure otherwise.
    virtual void    accept(int32_t token) = 0;
    // Draws with `sampler` from a row over the vocabulary, restricted to what is allowed; -1 when
    // nothing of the row is.
    virtual int32_t sample(Sampler & sampler, const float * logits, const std::vector<int32_t> & history) = 0;
    // Nothing may follow: the output is whole (the sequence ends without another forward pass).
    virtual bool    complete() const { return false; }
};

}  // namespace appliance

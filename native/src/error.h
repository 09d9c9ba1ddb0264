// Errors the core raises. The bindings map each to a Python exception class.
#pragma once

#include <stdexcept>
#include <string>

namespace appliance {

// A model file that cannot be used: not GGUF, truncated, unknown architecture, a tensor with the
// wrong shape or type, unsupported hyper-parameters.
struct ModelFormatError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// A request that does not fit: prompt longer than the context, a full KV cache.
struct ContextOverflowError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// Bad arguments from the caller (n_threads <= 0, token id out of range, ...).
struct InvalidArgument : std::invalid_argument {
    using std::invalid_argument::invalid_argument;
};

// ggml failed at run time (allocation, compute).
struct RuntimeFailure : std::runtime_error {
    using std::runtime_error::runtime_error;
};

}  // namespace appliance

// Precondition check that throws instead of aborting the process.
#define APPL_REQUIRE(cond, exc, msg)          \
    do {                                      \
        if (!(cond)) {                        \
            throw exc(std::string(msg));      \
        }                                     \
    } while (0)

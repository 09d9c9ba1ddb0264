// What the native fuzz harnesses share: the input as a file (a memfd, so every loader reads it through
// its ordinary path-based API), the models they load once, quiet ggml/libllama logs, and a check that
// only the exceptions a loader documents escape it (anything else aborts: a finding).
#pragma once

#include "error.h"

#include "ggml.h"
#include "llama.h"

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <sys/mman.h>
#include <unistd.h>

namespace fuzz {

// The input as a file at path(); the descriptor is reused across executions (truncated and rewritten).
class InputFile {
public:
    InputFile() {
        fd_ = ::memfd_create("fuzz-input", MFD_CLOEXEC);
        if (fd_ < 0) {
            std::perror("memfd_create");
            std::abort();
        }
        path_ = "/proc/self/fd/" + std::to_string(fd_);
    }
    const std::string & write(const uint8_t * data, size_t size) {
        if (::ftruncate(fd_, 0) != 0 || ::pwrite(fd_, data, size, 0) != static_cast<ssize_t>(size)) {
            std::perror("memfd write");
            std::abort();
        }
        return path_;
    }

private:
    int         fd_ = -1;
    std::string path_;
};

inline void quiet_logs() {
    auto drop = [](ggml_log_level, const char *, void *) {};
    if (std::getenv("APPLIANCE_FUZZ_VERBOSE") == nullptr) {
        llama_log_set(drop, nullptr);
        ggml_log_set(drop, nullptr);
    }
}

// a file next to the seeds (APPLIANCE_FUZZ_DIR, made by native/fuzz/seeds.py)
inline std::string fuzz_file(const char * name) {
    const char * dir = std::getenv("APPLIANCE_FUZZ_DIR");
    if (dir == nullptr) {
        std::fprintf(stderr, "set APPLIANCE_FUZZ_DIR to the directory native/fuzz/seeds.py wrote\n");
        std::exit(2);
    }
    return std::string(dir) + "/" + name;
}

// Runs fn; the loader's documented errors (bad file, bad argument) are expected outcomes, any other
// exception escaping is a finding and aborts with its message.
template <typename F>
void expect_clean_errors(F && fn) {
    try {
        fn();
    } catch (const appliance::ModelFormatError &) {
    } catch (const appliance::InvalidArgument &) {
    } catch (const std::exception & e) {
        std::fprintf(stderr, "unexpected exception escaped the loader: %s\n", e.what());
        std::abort();
    }
}

}  // namespace fuzz

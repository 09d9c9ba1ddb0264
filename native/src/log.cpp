#include "log.h"

#include "ggml.h"
#include "llama.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace appliance {

namespace {

void log_cb(ggml_log_level level, const char * text, void * user) {
    const bool verbose = user != nullptr;
    if (verbose || level == GGML_LOG_LEVEL_ERROR) {
        std::fputs(text, stderr);
    }
}

}  // namespace

void install_log() {
    const char * env     = std::getenv("APPLIANCE_NATIVE_LOG");
    void *       verbose = (env != nullptr && std::strcmp(env, "debug") == 0) ? reinterpret_cast<void *>(1) : nullptr;
    llama_log_set(log_cb, verbose);  // also sets ggml's
    ggml_log_set(log_cb, verbose);
}

}  // namespace appliance

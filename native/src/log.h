// Routes ggml's and libllama's log output: errors to stderr by default, everything when the
// environment sets APPLIANCE_NATIVE_LOG=debug.
#pragma once

namespace appliance {

void install_log();

}  // namespace appliance

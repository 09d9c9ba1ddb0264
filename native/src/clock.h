// Monotonic time for the engine's own timings.
#pragma once

#include <chrono>
#include <cstdint>

namespace appliance {

inline uint64_t now_us() {
    return static_cast<uint64_t>(
        std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now().time_since_epoch()).count());
}

}  // namespace appliance

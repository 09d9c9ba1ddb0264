// 64-bit hashing shared by the prefix cache's block hashes and adapter identities.
#pragma once

#include <cstdint>

namespace appliance {

// splitmix64's finaliser over a running combination of h and v
inline uint64_t mix64(uint64_t h, uint64_t v) {
    h ^= v + 0x9e3779b97f4a7c15ull + (h << 6) + (h >> 2);
    h ^= h >> 30;
    h *= 0xbf58476d1ce4e5b9ull;
    h ^= h >> 27;
    h *= 0x94d049bb133111ebull;
    h ^= h >> 31;
    return h;
}

}  // namespace appliance

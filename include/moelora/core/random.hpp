/// \file
/// \brief Counter-based random numbers that give the same values on the host and on the device.
#pragma once

#include <cstdint>

#include "moelora/core/half_types.hpp"

namespace moelora {

/// A uniform float in [0, 1) from (seed, stream, index) by a SplitMix64-style mix: a pure function,
/// so initialisers produce bit-identical factors on every backend and in any order.
MOELORA_HOST_DEVICE inline float uniform01(std::uint64_t seed, std::uint64_t stream, std::uint64_t index) {
  std::uint64_t z = seed ^ (stream * 0xd1b54a32d192ed03ull) ^ (index * 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  z ^= z >> 31;
  return static_cast<float>(z >> 40) * (1.0f / 16777216.0f);  // 24 random bits
}

}  // namespace moelora

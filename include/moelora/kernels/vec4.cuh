/// \file
/// \brief Four consecutive elements of a bf16, fp16 or fp32 array as fp32, with one 8- or 16-byte
/// vector access (the pointer must be aligned to it), for the element-wise kernels.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstring>

#include "moelora/kernels/common.cuh"

namespace moelora::kernels {

/// Four consecutive elements as fp32 (a 16-byte or 8-byte vector load).
template <class T>
__device__ __forceinline__ void load4(const T* p, float (&out)[4]) {
  if constexpr (sizeof(T) == 4) {
    const float4 v = *reinterpret_cast<const float4*>(p);
    out[0] = v.x, out[1] = v.y, out[2] = v.z, out[3] = v.w;
  } else {
    const uint2 raw = *reinterpret_cast<const uint2*>(p);
    T e[4];
    std::memcpy(e, &raw, sizeof(raw));
    for (int j = 0; j < 4; ++j) out[j] = to_float(e[j]);
  }
}
/// Four fp32 values rounded to T (to nearest even) and stored with one vector store.
template <class T>
__device__ __forceinline__ void store4(T* p, const float (&in)[4]) {
  if constexpr (sizeof(T) == 4) {
    *reinterpret_cast<float4*>(p) = make_float4(in[0], in[1], in[2], in[3]);
  } else {
    T e[4];
    for (int j = 0; j < 4; ++j) e[j] = from_float<T>(in[j]);
    uint2 raw;
    std::memcpy(&raw, e, sizeof(raw));
    *reinterpret_cast<uint2*>(p) = raw;
  }
}

}  // namespace moelora::kernels

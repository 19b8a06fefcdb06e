/// \file
/// \brief Warp-level tensor-core primitives of the LoRA kernels: `ldmatrix` fragment loads from
/// shared memory and the `mma.sync.m16n8k16` multiply-add with fp32 accumulators (16-bit operands,
/// bf16 or fp16), in the register layouts of the PTX ISA.
///
/// With g = lane / 4 and c = lane % 4:
/// - A operand (16 × 16, row m, column k): registers {(m g, k 2c..2c+1), (m g+8, k 2c..), (m g, k 8+2c..),
///   (m g+8, k 8+2c..)}, two 16-bit values each, the lower k in the low half;
/// - B operand (16 × 8, row k, column n): registers {(k 2c..2c+1, n g), (k 8+2c.., n g)};
/// - accumulator (16 × 8 fp32): {(m g, n 2c), (m g, n 2c+1), (m g+8, n 2c), (m g+8, n 2c+1)}.
/// Shared-memory tiles are row-major with a row stride `ld` (elements) that is a multiple of 8, so
/// every `ldmatrix` row address is 16-byte aligned.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "moelora/kernels/common.cuh"

namespace moelora::kernels {

/// One A operand, or the B operands of two neighbouring 8-column tiles (tile j: r[2j], r[2j+1]).
struct Frag {
  std::uint32_t r[4];
};

/// Accumulators of one 16 × 8 fp32 tile.
struct Acc {
  float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
};

/// Four 8 × 8 16-bit matrices; lanes 8i..8i+7 give the row addresses of matrix i.
__device__ __forceinline__ void ldmatrix_x4(Frag& f, const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(f.r[0]), "=r"(f.r[1]), "=r"(f.r[2]), "=r"(f.r[3])
               : "r"(smem_address(row)));
}
/// The same, each matrix transposed.
__device__ __forceinline__ void ldmatrix_x4_trans(Frag& f, const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(f.r[0]), "=r"(f.r[1]), "=r"(f.r[2]), "=r"(f.r[3])
               : "r"(smem_address(row)));
}

/// A operand from the 16 × 16 block at `tile` of a row-major (m, k) tile.
template <class T>
__device__ __forceinline__ void load_a(Frag& f, const T* tile, int ld) {
  const int lane = static_cast<int>(threadIdx.x) % 32;
  ldmatrix_x4(f, tile + (lane % 16) * ld + (lane / 16) * 8);
}
/// A operand from the 16 × 16 block at `tile` of a row-major (k, m) tile (A stored transposed).
template <class T>
__device__ __forceinline__ void load_a_trans(Frag& f, const T* tile, int ld) {
  const int lane = static_cast<int>(threadIdx.x) % 32;
  ldmatrix_x4_trans(f, tile + (lane % 8 + (lane / 16) * 8) * ld + ((lane / 8) % 2) * 8);
}
/// B operands of 16 k × 16 n (two n tiles) from a row-major (n, k) tile.
template <class T>
__device__ __forceinline__ void load_b_nk(Frag& f, const T* tile, int ld) {
  const int lane = static_cast<int>(threadIdx.x) % 32;
  ldmatrix_x4(f, tile + (lane % 8 + (lane / 16) * 8) * ld + ((lane / 8) % 2) * 8);
}
/// B operands of 16 k × 16 n (two n tiles) from a row-major (k, n) tile.
template <class T>
__device__ __forceinline__ void load_b_kn(Frag& f, const T* tile, int ld) {
  const int lane = static_cast<int>(threadIdx.x) % 32;
  ldmatrix_x4_trans(f, tile + (lane % 16) * ld + (lane / 16) * 8);
}

/// acc += a · b for n tile `j` (0 or 1) of `b`, with 16-bit operands of type T.
template <class T>
__device__ __forceinline__ void mma(Acc& acc, const Frag& a, const Frag& b, int j) {
  static_assert(std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, __half>, "16-bit operands only");
  if constexpr (std::is_same_v<T, __nv_bfloat16>)
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(acc.c[0]), "+f"(acc.c[1]), "+f"(acc.c[2]), "+f"(acc.c[3])
        : "r"(a.r[0]), "r"(a.r[1]), "r"(a.r[2]), "r"(a.r[3]), "r"(b.r[2 * j]), "r"(b.r[2 * j + 1]));
  else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(acc.c[0]), "+f"(acc.c[1]), "+f"(acc.c[2]), "+f"(acc.c[3])
        : "r"(a.r[0]), "r"(a.r[1]), "r"(a.r[2]), "r"(a.r[3]), "r"(b.r[2 * j]), "r"(b.r[2 * j + 1]));
}

/// Stores the 16 × 8 tile `acc` at (row0, col0) of a row-major fp32 matrix (row stride `ld`, even).
__device__ __forceinline__ void store_acc(float* out, int ld, int row0, int col0, const Acc& acc) {
  const int lane = static_cast<int>(threadIdx.x) % 32;
  float* p = out + (row0 + lane / 4) * ld + col0 + (lane % 4) * 2;
  *reinterpret_cast<float2*>(p) = make_float2(acc.c[0], acc.c[1]);
  *reinterpret_cast<float2*>(p + 8 * ld) = make_float2(acc.c[2], acc.c[3]);
}
}  // namespace moelora::kernels

// The one translation unit of the moelora_cutlass library: the sm90 grouped GEMM of the CUDA bases
// (moelora/cuda/cutlass/sm90_grouped_gemm.hpp), its 8 CUTLASS kernels and host wrapper.
#include "moelora/cuda/cutlass/sm90_grouped_gemm.cuh"

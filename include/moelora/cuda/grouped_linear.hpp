/// \file
/// \brief GroupedLinear<CudaBackend>: the base on the GPU. Construct it with a cuBLAS handle:
/// `GroupedLinear<CudaBackend>(handle, E, in, out, dtype[, GemmStrategy])`; the GEMM strategies (the
/// sync-free sm90 grouped GEMM, and cuBLAS with its host sync for device counts) are described in
/// `cuda/grouped_gemm.hpp`.
#pragma once

#if !defined(__CUDACC__)
#error "moelora/cuda/grouped_linear.hpp needs nvcc"
#endif

#include "moelora/base/grouped_linear.hpp"
#include "moelora/cuda/grouped_gemm.hpp"

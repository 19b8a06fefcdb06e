// The SVD-based initialisers on the CUDA backend (cuSOLVER SVDs, GPU quantizers), checked against
// exact fp64 singular values on the host. The doctest main (and the no-GPU skip) is in test_gpu.cu.
#include <doctest/doctest.h>

#include "cases/init_cases.hpp"
#include "support/cuda_harness.cuh"

MOELORA_INIT_CASES(CudaHarness);

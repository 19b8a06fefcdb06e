/// \file
/// \brief Umbrella header: everything that compiles with the current compiler (the CUDA backend and
/// base only under nvcc).
#pragma once

#include "moelora/base/grouped_linear.hpp"
#include "moelora/base/quantized_grouped_linear.hpp"
#include "moelora/concepts.hpp"
#include "moelora/core/config.hpp"
#include "moelora/core/dtype.hpp"
#include "moelora/core/error.hpp"
#include "moelora/core/tensor.hpp"
#include "moelora/core/warnings.hpp"
#include "moelora/core/write_mode.hpp"
#include "moelora/grouped_lora.hpp"
#include "moelora/host/backend.hpp"
#include "moelora/host/linalg.hpp"
#include "moelora/host/quantize.hpp"
#include "moelora/init/svd_init.hpp"
#include "moelora/moe/permutation.hpp"
#include "moelora/moe/routing.hpp"
#include "moelora/moe/swiglu.hpp"
#include "moelora/optim/adamw.hpp"
#include "moelora/parallel/amax_sync.hpp"
#include "moelora/policies/policy_set.hpp"

#if defined(__CUDACC__)
#include "moelora/cuda/backend.hpp"
#include "moelora/cuda/grouped_linear.hpp"
#include "moelora/cuda/linalg.hpp"
#include "moelora/cuda/moe.hpp"
#include "moelora/cuda/quantize.hpp"
#endif

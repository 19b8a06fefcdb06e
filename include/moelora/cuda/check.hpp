/// \file
/// \brief Checks of CUDA runtime and cuBLAS status codes, turned into moelora::Error.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include "moelora/core/error.hpp"

/// Throws ErrorCode::cuda naming the call and CUDA's message unless `call` returns cudaSuccess.
#define MOELORA_CUDA_CHECK(call)                                                                         \
  do {                                                                                                   \
    const cudaError_t moelora_status_ = (call);                                                          \
    if (moelora_status_ != cudaSuccess)                                                                  \
      ::moelora::detail::raise(::moelora::ErrorCode::cuda, #call, " failed: ", cudaGetErrorName(moelora_status_), \
                               " (", cudaGetErrorString(moelora_status_), ")");                          \
  } while (0)

/// Throws ErrorCode::cuda if the last kernel launch failed (bad configuration, missing image, ...).
#define MOELORA_CUDA_CHECK_LAUNCH(what) MOELORA_CUDA_CHECK((static_cast<void>(what), cudaGetLastError()))

/// Throws ErrorCode::cublas naming the call and the status unless `call` returns CUBLAS_STATUS_SUCCESS.
#define MOELORA_CUBLAS_CHECK(call)                                                                        \
  do {                                                                                                    \
    const cublasStatus_t moelora_status_ = (call);                                                        \
    if (moelora_status_ != CUBLAS_STATUS_SUCCESS)                                                         \
      ::moelora::detail::raise(::moelora::ErrorCode::cublas, #call, " failed: ",                          \
                               cublasGetStatusName(moelora_status_), " (", cublasGetStatusString(moelora_status_), ")"); \
  } while (0)

/// Throws ErrorCode::cusolver naming the call and the status unless `call` returns
/// CUSOLVER_STATUS_SUCCESS (the status enum has no string function: its value is printed).
#define MOELORA_CUSOLVER_CHECK(call)                                                                        \
  do {                                                                                                      \
    const auto moelora_status_ = (call);                                                                    \
    if (moelora_status_ != CUSOLVER_STATUS_SUCCESS)                                                         \
      ::moelora::detail::raise(::moelora::ErrorCode::cusolver, #call, " failed with cusolverStatus_t ",     \
                               static_cast<int>(moelora_status_));                                          \
  } while (0)

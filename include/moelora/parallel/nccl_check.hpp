/// \file
/// \brief MOELORA_NCCL_CHECK: NCCL status codes turned into moelora::Error.
#pragma once

#include <nccl.h>

#include "moelora/core/error.hpp"

/// Throws ErrorCode::nccl naming the call, the status and NCCL's last message unless `call`
/// returns ncclSuccess.
#define MOELORA_NCCL_CHECK(call)                                                                     \
  do {                                                                                               \
    const ncclResult_t moelora_status_ = (call);                                                     \
    if (moelora_status_ != ncclSuccess)                                                              \
      ::moelora::detail::raise(::moelora::ErrorCode::nccl, #call, " failed: ",                      \
                               ncclGetErrorString(moelora_status_), " (", ncclGetLastError(nullptr), ")"); \
  } while (0)

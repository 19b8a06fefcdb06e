/// \file
/// \brief The host backend's `loss::mse_loss` (loss/mse.hpp); completes before it returns.
#pragma once

#include "moelora/core/dtype.hpp"
#include "moelora/host/backend.hpp"
#include "moelora/loss/mse.hpp"

namespace moelora::loss {

/// MSE loss and gradient over host memory (see loss/mse.hpp).
inline void mse_loss(const MseLossArgs& a, HostStream /*stream*/) {
  validate(a);
  const float k = mse_grad_factor(a.weight, a.loss_scale ? *a.loss_scale : 1.0f);
  double sum = 0.0;
  dispatch_dtype(a.dtype, [&](auto tag) {
    using T = host_type_t<tag.value>;
    const auto* y = static_cast<const T*>(a.y);
    const auto* t = static_cast<const T*>(a.target);
    auto* dy = static_cast<T*>(a.dy);
    for (std::int64_t i = 0; i < a.count; ++i) {
      const float yi = static_cast<float>(y[i]), ti = static_cast<float>(t[i]);
      const double d = static_cast<double>(yi) - static_cast<double>(ti);
      sum += d * d;
      dy[i] = T(mse_grad(yi, ti, k));
    }
  });
  if (a.loss_sum) *a.loss_sum += static_cast<double>(a.weight) * sum;
}

}  // namespace moelora::loss

// A user-written grouped base under GroupedLoRA: anything that satisfies moelora::GroupedLinearBase
// can be wrapped. This one is a grouped linear with a per-expert bias, y_t = W_e x_t + c_e, written
// with plain loops on the host backend.
#include <cstdio>
#include <vector>

#include "moelora/moelora.hpp"

using namespace moelora;

/// W `[E, out, in]` and bias `[E, out]`, fp32, host memory.
class BiasedExperts {
 public:
  using backend_type = HostBackend;

  BiasedExperts(std::int64_t experts, std::int64_t in, std::int64_t out)
      : experts_(experts), in_(in), out_(out), w_(experts * out * in), bias_(experts * out) {
    for (std::size_t i = 0; i < w_.size(); ++i) w_[i] = 0.01f * static_cast<float>(static_cast<int>(i % 13) - 6);
    for (std::size_t i = 0; i < bias_.size(); ++i) bias_[i] = 0.5f;
  }
  std::int64_t num_experts() const { return experts_; }
  std::int64_t in_features() const { return in_; }
  std::int64_t out_features() const { return out_; }
  DType dtype() const { return DType::fp32; }

  /// y_t = W_e x_t + c_e
  void forward(ConstTensorRef x, const ExpertSegments& segments, TensorRef y, HostStream) const {
    const auto* xs = static_cast<const float*>(x.data);
    auto* ys = static_cast<float*>(y.data);
    for (std::int64_t e = 0; e < experts_; ++e)
      for (std::int64_t t = segments.host_offsets[e]; t < segments.host_offsets[e + 1]; ++t)
        for (std::int64_t n = 0; n < out_; ++n) {
          float acc = bias_[e * out_ + n];
          for (std::int64_t k = 0; k < in_; ++k) acc += w_[(e * out_ + n) * in_ + k] * xs[t * in_ + k];
          ys[t * out_ + n] = acc;
        }
  }
  /// dx_t = W_eᵀ dy_t (the bias is frozen too: no gradient)
  void backward_input(ConstTensorRef dy, const ExpertSegments& segments, TensorRef dx, HostStream) const {
    const auto* dys = static_cast<const float*>(dy.data);
    auto* dxs = static_cast<float*>(dx.data);
    for (std::int64_t e = 0; e < experts_; ++e)
      for (std::int64_t t = segments.host_offsets[e]; t < segments.host_offsets[e + 1]; ++t)
        for (std::int64_t k = 0; k < in_; ++k) {
          float acc = 0.0f;
          for (std::int64_t n = 0; n < out_; ++n) acc += w_[(e * out_ + n) * in_ + k] * dys[t * out_ + n];
          dxs[t * in_ + k] = acc;
        }
  }

 private:
  std::int64_t experts_, in_, out_;
  std::vector<float> w_, bias_;
};

static_assert(GroupedLinearBase<BiasedExperts>, "BiasedExperts must satisfy the base concept");

int main() {
  GroupedLoRA<BiasedExperts, policy::StaticExperts<4>> layer(BiasedExperts(4, 32, 16));
  AdapterConfig config;
  config.rank = 4;
  config.lora_dtype = "bf16";
  layer.add_adapter("custom", config, {});

  const std::vector<std::int64_t> counts{3, 0, 5, 2};
  std::vector<float> x(10 * 32, 0.25f), y(10 * 16), dy(10 * 16, 1.0f), dx(10 * 32);
  layer.forward(tensor_ref(static_cast<const float*>(x.data()), {10, 32}), expert_counts(counts.data(), 4),
                tensor_ref(y.data(), {10, 16}), {});
  layer.backward(tensor_ref(static_cast<const float*>(x.data()), {10, 32}), expert_counts(counts.data(), 4),
                 tensor_ref(static_cast<const float*>(dy.data()), {10, 16}), tensor_ref(dx.data(), {10, 32}), {});
  const auto grad_b = static_cast<const float*>(layer.adapter("custom").grad_b.data);
  std::printf("y[0, 0] = %.4f (base with bias, B = 0)   dB[0, 0, 0] = %.4f   dx[0, 0] = %.4f\n", y[0], grad_b[0], dx[0]);
  return 0;
}

/// \file
/// \brief Test support: host tensors of exactly representable values, random data and counts, and
/// the fp64 reference of the LoRA layer (the oracle every backend is checked against).
#pragma once

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include "moelora/core/dtype.hpp"
#include "moelora/core/tensor.hpp"

namespace moelora::testing {

/// A host tensor whose fp32 `values` are exactly representable in `dtype`.
struct HostTensor {
  DType dtype = DType::fp32;
  Shape shape;
  std::vector<float> values;

  HostTensor() = default;
  HostTensor(DType d, Shape s, float fill = 0.0f) : dtype(d), shape(s), values(static_cast<std::size_t>(s.numel()), fill) {}

  [[nodiscard]] std::size_t size() const { return values.size(); }
  float& operator[](std::size_t i) { return values[i]; }
  float operator[](std::size_t i) const { return values[i]; }

  /// The tensor's bytes in its dtype.
  [[nodiscard]] std::vector<std::byte> encode() const {
    std::vector<std::byte> bytes(values.size() * dtype_size(dtype));
    dispatch_dtype(dtype, [&](auto tag) {
      using T = host_type_t<tag.value>;
      for (std::size_t i = 0; i < values.size(); ++i) {
        const T v(values[i]);
        std::memcpy(bytes.data() + i * sizeof(T), &v, sizeof(T));
      }
    });
    return bytes;
  }
  /// Reads `bytes` (the tensor's dtype) into `values`.
  void decode(const std::vector<std::byte>& bytes) {
    dispatch_dtype(dtype, [&](auto tag) {
      using T = host_type_t<tag.value>;
      for (std::size_t i = 0; i < values.size(); ++i) {
        T v;
        std::memcpy(&v, bytes.data() + i * sizeof(T), sizeof(T));
        values[i] = static_cast<float>(v);
      }
    });
  }
};

/// Rounds `v` to `dtype` (as fp32).
inline float round_as(DType dtype, float v) {
  return dispatch_dtype(dtype, [&](auto tag) { return round_to<tag.value>(v); });
}

/// A random engine seeded from std::random_device; the seed is reported with any failure.
struct Rng {
  std::uint64_t seed;
  std::mt19937_64 engine;
  Rng() : seed((static_cast<std::uint64_t>(std::random_device{}()) << 32) | std::random_device{}()), engine(seed) {}
  explicit Rng(std::uint64_t s) : seed(s), engine(s) {}
  float normal(float stddev = 1.0f) { return std::normal_distribution<float>(0.0f, stddev)(engine); }
  double uniform() { return std::uniform_real_distribution<double>(0.0, 1.0)(engine); }
  std::int64_t integer(std::int64_t lo, std::int64_t hi) { return std::uniform_int_distribution<std::int64_t>(lo, hi)(engine); }
};

inline HostTensor random_tensor(Rng& rng, DType dtype, Shape shape, float stddev = 1.0f) {
  HostTensor t(dtype, shape);
  for (float& v : t.values) v = round_as(dtype, rng.normal(stddev));
  return t;
}

/// How rows are spread over experts.
enum class Spread { uniform, skewed, one_expert };

/// tokens_per_expert summing to `rows`: uniform; skewed (Zipf-like weights in a random order with
/// about a quarter of the experts empty); or every row on one random expert.
inline std::vector<std::int64_t> make_counts(Rng& rng, std::int64_t experts, std::int64_t rows, Spread spread) {
  std::vector<std::int64_t> counts(static_cast<std::size_t>(experts), 0);
  if (spread == Spread::one_expert) {
    counts[static_cast<std::size_t>(rng.integer(0, experts - 1))] = rows;
    return counts;
  }
  std::vector<double> weights(static_cast<std::size_t>(experts));
  for (std::size_t e = 0; e < weights.size(); ++e)
    weights[e] = spread == Spread::uniform ? 1.0 : (rng.uniform() < 0.25 ? 0.0 : 1.0 / std::pow(double(e + 1), 1.1));
  if (spread == Spread::skewed) std::shuffle(weights.begin(), weights.end(), rng.engine);
  double total = std::accumulate(weights.begin(), weights.end(), 0.0);
  if (total == 0.0) weights[0] = total = 1.0;
  std::int64_t given = 0;
  double cumulative = 0.0;
  for (std::size_t e = 0; e < weights.size(); ++e) {
    cumulative += weights[e];
    const auto upto = static_cast<std::int64_t>(std::llround(static_cast<double>(rows) * cumulative / total));
    counts[e] = std::max<std::int64_t>(0, std::min(rows, upto) - given);
    given += counts[e];
  }
  counts.back() += rows - given;
  return counts;
}

inline std::vector<std::int64_t> offsets_of(const std::vector<std::int64_t>& counts) {
  std::vector<std::int64_t> offsets(counts.size() + 1, 0);
  std::partial_sum(counts.begin(), counts.end(), offsets.begin() + 1);
  return offsets;
}

/// ‖a − b‖ / ‖b‖ in fp64 (‖a − b‖ when b = 0); NaN anywhere gives +inf.
inline double relative_error(const std::vector<float>& a, const std::vector<double>& b) {
  REQUIRE(a.size() == b.size());
  double diff = 0.0, norm = 0.0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (!std::isfinite(a[i])) return std::numeric_limits<double>::infinity();
    diff += (a[i] - b[i]) * (a[i] - b[i]);
    norm += b[i] * b[i];
  }
  return norm > 0.0 ? std::sqrt(diff / norm) : std::sqrt(diff);
}
inline double relative_error(const std::vector<float>& a, const std::vector<float>& b) {
  return relative_error(a, std::vector<double>(b.begin(), b.end()));
}

/// Elements of `a` further from `b` than one bf16 unit in the last place (at most |b| · 2⁻⁷): for
/// results rounded to bf16 from fp32 sums added in another order.
inline std::size_t beyond_one_bf16_ulp(const std::vector<float>& a, const std::vector<float>& b) {
  REQUIRE(a.size() == b.size());
  std::size_t count = 0;
  for (std::size_t i = 0; i < a.size(); ++i) count += !(std::abs(a[i] - b[i]) <= std::ldexp(std::abs(b[i]), -7));
  return count;
}

/// Tolerance of ‖out − ref‖/‖ref‖ for results rounded to `dtype` (the output rounding dominates:
/// bf16 2⁻⁹, fp16 2⁻¹², fp32 accumulation ~1e-6).
inline double tolerance(DType dtype) {
  switch (dtype) {
    case DType::bf16: return 1e-2;
    case DType::fp16: return 2e-3;
    case DType::fp32: break;
  }
  return 2e-5;
}

/// One adapter as the oracle sees it: factors as exact values, the factor dtype, scale.
struct RefAdapter {
  const HostTensor* a;  // [E, r, in]
  const HostTensor* b;  // [E, out, r]
  float scale;
};

/// The fp64 oracle of GroupedLoRA with the documented roundings: x and dy rounded to the factor
/// dtype, h and round(scale · u) rounded to the factor dtype, everything else exact.
struct Reference {
  std::int64_t experts, in, out;
  const HostTensor* w;  // [E, out, in]
  std::vector<std::int64_t> offsets;

  [[nodiscard]] std::int64_t expert_of(std::int64_t t) const {
    return std::upper_bound(offsets.begin(), offsets.end(), t) - offsets.begin() - 1;
  }
  [[nodiscard]] std::int64_t rows() const { return offsets.back(); }

  /// h [T, r] of one adapter, rounded to its dtype.
  [[nodiscard]] std::vector<double> shrink(const HostTensor& x, const RefAdapter& ad) const {
    const std::int64_t r = ad.a->shape[1];
    std::vector<double> h(static_cast<std::size_t>(rows() * r));
    for (std::int64_t t = 0; t < rows(); ++t) {
      const std::int64_t e = expert_of(t);
      for (std::int64_t j = 0; j < r; ++j) {
        double acc = 0.0;
        for (std::int64_t k = 0; k < in; ++k)
          acc += double(round_as(ad.a->dtype, x[t * in + k])) * (*ad.a)[(e * r + j) * in + k];
        h[t * r + j] = round_as(ad.a->dtype, static_cast<float>(acc));
      }
    }
    return h;
  }

  /// y [T, out] = base(x) + Σ adapters.
  [[nodiscard]] std::vector<double> forward(const HostTensor& x, const std::vector<RefAdapter>& adapters) const {
    std::vector<double> y(static_cast<std::size_t>(rows() * out), 0.0);
    for (std::int64_t t = 0; t < rows(); ++t) {
      const std::int64_t e = expert_of(t);
      for (std::int64_t n = 0; n < out; ++n) {
        double acc = 0.0;
        for (std::int64_t k = 0; k < in; ++k) acc += double((*w)[(e * out + n) * in + k]) * x[t * in + k];
        y[t * out + n] = acc;
      }
    }
    for (const RefAdapter& ad : adapters) {
      const std::int64_t r = ad.a->shape[1];
      const std::vector<double> h = shrink(x, ad);
      for (std::int64_t t = 0; t < rows(); ++t) {
        const std::int64_t e = expert_of(t);
        for (std::int64_t n = 0; n < out; ++n) {
          double acc = 0.0;
          for (std::int64_t j = 0; j < r; ++j) acc += h[t * r + j] * (*ad.b)[(e * out + n) * r + j];
          y[t * out + n] += double(ad.scale) * acc;
        }
      }
    }
    return y;
  }

  struct Grads {
    std::vector<double> a, b;  // [E, r, in], [E, out, r]
  };

  /// dx [T, in] (base part plus every adapter) and each adapter's (dA, dB).
  void backward(const HostTensor& x, const HostTensor& dy, const std::vector<RefAdapter>& adapters,
                std::vector<double>& dx, std::vector<Grads>& grads) const {
    dx.assign(static_cast<std::size_t>(rows() * in), 0.0);
    for (std::int64_t t = 0; t < rows(); ++t) {
      const std::int64_t e = expert_of(t);
      for (std::int64_t k = 0; k < in; ++k) {
        double acc = 0.0;
        for (std::int64_t n = 0; n < out; ++n) acc += double((*w)[(e * out + n) * in + k]) * dy[t * out + n];
        dx[t * in + k] = acc;
      }
    }
    grads.clear();
    for (const RefAdapter& ad : adapters) {
      const DType d = ad.a->dtype;
      const std::int64_t r = ad.a->shape[1];
      const std::vector<double> h = shrink(x, ad);
      Grads g{std::vector<double>(ad.a->size(), 0.0), std::vector<double>(ad.b->size(), 0.0)};
      for (std::int64_t t = 0; t < rows(); ++t) {
        const std::int64_t e = expert_of(t);
        std::vector<double> u(static_cast<std::size_t>(r));
        for (std::int64_t j = 0; j < r; ++j) {
          double acc = 0.0;
          for (std::int64_t n = 0; n < out; ++n)
            acc += double(round_as(d, dy[t * out + n])) * (*ad.b)[(e * out + n) * r + j];
          u[j] = round_as(d, static_cast<float>(double(ad.scale) * acc));
        }
        for (std::int64_t n = 0; n < out; ++n)
          for (std::int64_t j = 0; j < r; ++j)
            g.b[(e * out + n) * r + j] += double(ad.scale) * round_as(d, dy[t * out + n]) * h[t * r + j];
        for (std::int64_t j = 0; j < r; ++j)
          for (std::int64_t k = 0; k < in; ++k) {
            g.a[(e * r + j) * in + k] += u[j] * double(round_as(d, x[t * in + k]));
            dx[t * in + k] += u[j] * (*ad.a)[(e * r + j) * in + k];
          }
      }
      grads.push_back(std::move(g));
    }
  }
};

}  // namespace moelora::testing

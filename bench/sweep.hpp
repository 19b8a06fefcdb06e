/// \file
/// \brief What the tuning sweeps (sweep_lora, sweep_quant) share: choosing variants by name, the
/// markdown table whose last columns are the variants, buffer rotation past the L2, and the
/// summary of each variant's percentages.
#pragma once

#include <CLI/CLI.hpp>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <optional>
#include <string>
#include <vector>

#include "moelora/cuda/check.hpp"

namespace moelora::bench {

/// Prints "- name: what" for each variant.
template <class Variant>
void print_variants(const std::vector<const Variant*>& variants) {
  for (const Variant* v : variants) std::printf("- %s: %s\n", v->name, v->what);
}

/// The options every sweep takes: --variants, --iters, --list.
struct SweepOptions {
  std::vector<std::string> variants;
  int iters = 20;
  bool list = false;

  void add_to(CLI::App& app) {
    app.add_option("--variants", variants, "comma-separated variant names (default: all)")->delimiter(',');
    app.add_option("--iters", iters, "timed iterations per measurement (median)")->check(CLI::PositiveNumber);
    app.add_flag("--list", list, "list the variants and exit");
  }
  /// The variants of `all` (each with `name` and `what`) named by --variants, all without it, in
  /// `all`'s order; none after listing them all, for --list or names that match none.
  template <class Variant, std::size_t N>
  std::vector<const Variant*> chosen(const Variant (&all)[N]) const {
    std::vector<const Variant*> picked, every;
    for (const Variant& v : all) {
      every.push_back(&v);
      if (variants.empty() || std::find(variants.begin(), variants.end(), v.name) != variants.end()) picked.push_back(&v);
    }
    if (!list && !picked.empty()) return picked;
    print_variants(every);
    return {};
  }
};

/// Prints the header of a markdown table: the `leading` columns (with their `alignment` row
/// cells, e.g. "---:"), then one right-aligned column per variant.
template <class Variant>
void print_table_header(const std::vector<std::pair<const char*, const char*>>& leading,
                        const std::vector<const Variant*>& variants) {
  std::printf("|");
  for (const auto& column : leading) std::printf(" %s |", column.first);
  for (const Variant* v : variants) std::printf(" %s |", v->name);
  std::printf("\n|");
  for (const auto& column : leading) std::printf("%s|", column.second);
  for (std::size_t i = 0; i < variants.size(); ++i) std::printf("---:|");
  std::printf("\n");
}

/// Buffer sets of `set_bytes` to rotate through so that consecutive runs touch at least twice the
/// L2's bytes (1 to 8).
inline int rotation_sets(std::size_t set_bytes, std::size_t l2_bytes) {
  return static_cast<int>(std::clamp<std::size_t>((2 * l2_bytes + set_bytes - 1) / set_bytes, 1, 8));
}

/// The device the sweep runs on (device 0) and a non-blocking stream on it; nullopt (after a
/// message naming `program`) without a CUDA device.
struct SweepDevice {
  cudaDeviceProp prop{};
  cudaStream_t stream = nullptr;
};
inline std::optional<SweepDevice> open_device(const char* program) {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::fprintf(stderr, "%s: no CUDA device\n", program);
    return std::nullopt;
  }
  SweepDevice d;
  MOELORA_CUDA_CHECK(cudaGetDeviceProperties(&d.prop, 0));
  MOELORA_CUDA_CHECK(cudaStreamCreateWithFlags(&d.stream, cudaStreamNonBlocking));
  std::printf("%s: %d SMs, L2 %d MB\n", d.prop.name, d.prop.multiProcessorCount, d.prop.l2CacheSize >> 20);
  return d;
}

/// Each variant's percentages (of a floor or of the copy bandwidth), one per table row, and its
/// failed output checks.
class SweepSummary {
 public:
  explicit SweepSummary(std::size_t variants) : percent_(variants), failures_(variants, 0) {}
  void add(std::size_t variant, double percent, bool checked) {
    percent_[variant].push_back(percent);
    if (!checked) ++failures_[variant];
  }
  /// Prints per variant: rows at or above `target` %, min, median and geometric mean %, the
  /// geometric mean ratio to the variant named `baseline` (if chosen), failed checks.
  template <class Variant>
  void print(const std::vector<const Variant*>& variants, double target, const char* baseline) const {
    const auto base = std::find_if(variants.begin(), variants.end(), [&](const Variant* v) { return std::string(v->name) == baseline; });
    std::printf("\n| variant | rows >= %.0f%% | min %% | median %% | geomean %% | geomean vs %s | failed checks |\n", target,
                baseline);
    std::printf("|---|---:|---:|---:|---:|---:|---:|\n");
    for (std::size_t i = 0; i < variants.size(); ++i) {
      std::vector<double> p = percent_[i];
      if (p.empty()) continue;
      double log_sum = 0.0, log_ratio = 0.0;
      for (std::size_t r = 0; r < p.size(); ++r) {
        log_sum += std::log(p[r]);
        if (base != variants.end()) log_ratio += std::log(p[r] / percent_[static_cast<std::size_t>(base - variants.begin())][r]);
      }
      const auto n = static_cast<double>(p.size());
      const auto at_least = std::count_if(p.begin(), p.end(), [&](double x) { return x >= target; });
      std::sort(p.begin(), p.end());
      std::printf("| %s | %lld of %zu | %.1f | %.1f | %.1f | ", variants[i]->name, static_cast<long long>(at_least), p.size(),
                  p.front(), p[p.size() / 2], std::exp(log_sum / n));
      if (base != variants.end()) std::printf("%.3fx", std::exp(log_ratio / n));
      else std::printf("-");
      std::printf(" | %d |\n", failures_[i]);
    }
  }

 private:
  std::vector<std::vector<double>> percent_;
  std::vector<int> failures_;
};

}  // namespace moelora::bench

/// \file
/// \brief Learning-rate schedules: linear warm-up, then constant, linear or cosine decay, as a pure
/// function of the step (host and device).
#pragma once

#include <cmath>
#include <cstdint>
#include <string>
#include <string_view>

#include "moelora/core/dtype.hpp"
#include "moelora/core/error.hpp"

namespace moelora {

/// What follows the warm-up: the base learning rate, or a decay to `min_lr_ratio · lr`.
enum class ScheduleKind : std::uint8_t { constant, linear, cosine };

constexpr std::string_view schedule_kind_name(ScheduleKind k) {
  return k == ScheduleKind::constant ? "constant" : (k == ScheduleKind::linear ? "linear" : "cosine");
}

/// "constant", "linear" or "cosine"; anything else throws ErrorCode::invalid_argument.
inline ScheduleKind parse_schedule_kind(std::string_view name) {
  for (const ScheduleKind k : {ScheduleKind::constant, ScheduleKind::linear, ScheduleKind::cosine})
    if (name == schedule_kind_name(k)) return k;
  detail::raise(ErrorCode::invalid_argument, "learning-rate schedule \"", name,
                "\" is not known; accepted: constant, linear, cosine");
}

/// A learning-rate schedule over the optimizer's step t = 1, 2, ... (the t-th applied update):
/// - warm-up, t ≤ warmup_steps: `lr · t / warmup_steps`;
/// - then `constant`: lr; `linear`: `lr · (ρ + (1 − ρ)(1 − p))`; `cosine`: `lr · (ρ + (1 − ρ) ·
///   (1 + cos πp) / 2)`, with p = (t − warmup_steps) / (total_steps − warmup_steps) clamped to
///   [0, 1] and ρ = min_lr_ratio. After total_steps the rate stays at ρ · lr.
/// Computed in fp64 and rounded once to fp32, identically on the host and the device.
struct LrSchedule {
  ScheduleKind kind = ScheduleKind::constant;
  std::int64_t warmup_steps = 0;  ///< 0: no warm-up
  std::int64_t total_steps = 0;   ///< where the decay ends (> warmup_steps for linear and cosine)
  float min_lr_ratio = 0.0f;      ///< the decay's floor as a fraction of lr, in [0, 1]

  friend bool operator==(const LrSchedule&, const LrSchedule&) = default;
};

/// The learning rate of step `t` (1-based) for base rate `lr`.
MOELORA_HOST_DEVICE inline float scheduled_lr(const LrSchedule& s, float lr, std::int64_t t) {
  const double base = static_cast<double>(lr);
  if (s.warmup_steps > 0 && t <= s.warmup_steps)
    return static_cast<float>(base * static_cast<double>(t) / static_cast<double>(s.warmup_steps));
  if (s.kind == ScheduleKind::constant) return lr;
  double p = static_cast<double>(t - s.warmup_steps) / static_cast<double>(s.total_steps - s.warmup_steps);
  p = p < 0.0 ? 0.0 : (p > 1.0 ? 1.0 : p);
  const double shape = s.kind == ScheduleKind::linear ? 1.0 - p : 0.5 * (1.0 + ::cos(3.14159265358979323846 * p));
  const double floor = static_cast<double>(s.min_lr_ratio);
  return static_cast<float>(base * (floor + (1.0 - floor) * shape));
}

/// Throws ErrorCode::invalid_argument naming the field unless `s` is usable: warmup_steps ≥ 0,
/// min_lr_ratio in [0, 1], and total_steps > warmup_steps for a decaying schedule.
inline void validate_schedule(const LrSchedule& s) {
  MOELORA_REQUIRE(s.warmup_steps >= 0, ErrorCode::invalid_argument, "schedule warmup_steps must be >= 0, got ",
                  s.warmup_steps);
  MOELORA_REQUIRE(s.min_lr_ratio >= 0.0f && s.min_lr_ratio <= 1.0f, ErrorCode::invalid_argument,
                  "schedule min_lr_ratio must be in [0, 1], got ", s.min_lr_ratio);
  MOELORA_REQUIRE(s.kind == ScheduleKind::constant || s.total_steps > s.warmup_steps, ErrorCode::invalid_argument,
                  "a ", schedule_kind_name(s.kind), " schedule needs total_steps > warmup_steps, got total_steps ",
                  s.total_steps, " and warmup_steps ", s.warmup_steps);
}

}  // namespace moelora

// 16-bit conversions, dtype names and parsing, AdapterConfig validation, policies.
#include <doctest/doctest.h>

#include <cmath>
#include <limits>

#include "moelora/moelora.hpp"

using namespace moelora;

TEST_CASE("bfloat16_t rounds to nearest even and keeps NaN and infinity") {
  CHECK(bfloat16_t(1.0f).bits == 0x3f80);
  CHECK(bfloat16_t(-2.5f).bits == 0xc020);
  // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to even (1.0); 1 + 3·2^-8 rounds up to 1 + 2^-6.
  CHECK(static_cast<float>(bfloat16_t(1.0f + std::ldexp(1.0f, -8))) == 1.0f);
  CHECK(static_cast<float>(bfloat16_t(1.0f + 3 * std::ldexp(1.0f, -8))) == 1.0f + std::ldexp(1.0f, -6));
  CHECK(std::isinf(static_cast<float>(bfloat16_t(std::numeric_limits<float>::infinity()))));
  CHECK(std::isnan(static_cast<float>(bfloat16_t(std::numeric_limits<float>::quiet_NaN()))));
  CHECK(std::isinf(static_cast<float>(bfloat16_t(std::numeric_limits<float>::max()))));  // rounds past the top
}

TEST_CASE("half_t rounds to nearest even, with subnormals and overflow to infinity") {
  CHECK(half_t(1.0f).bits == 0x3c00);
  CHECK(half_t(-2.0f).bits == 0xc000);
  CHECK(half_t(65504.0f).bits == 0x7bff);
  CHECK(half_t(65519.0f).bits == 0x7bff);
  CHECK(half_t(65520.0f).bits == 0x7c00);
  CHECK(half_t(std::ldexp(1.0f, -24)).bits == 0x0001);        // smallest subnormal
  CHECK(half_t(std::ldexp(1.0f, -25)).bits == 0x0000);        // half of it: ties to even (0)
  CHECK(half_t(3 * std::ldexp(1.0f, -25)).bits == 0x0002);    // 1.5 ulp: ties to even (2)
  CHECK(static_cast<float>(half_t(1.0f + std::ldexp(1.0f, -11))) == 1.0f);  // tie to even
  CHECK(std::isnan(static_cast<float>(half_t(std::numeric_limits<float>::quiet_NaN()))));
  for (std::uint32_t bits = 0; bits < 0x7c00; bits += 7) {  // every finite positive half round-trips
    half_t h;
    h.bits = static_cast<std::uint16_t>(bits);
    REQUIRE(half_t(static_cast<float>(h)).bits == h.bits);
  }
}

TEST_CASE("lora_dtype spellings normalise; others are rejected with the accepted list") {
  CHECK(parse_dtype("bf16") == DType::bf16);
  CHECK(parse_dtype("bfloat16") == DType::bf16);
  CHECK(parse_dtype("fp16") == DType::fp16);
  CHECK(parse_dtype("float16") == DType::fp16);
  CHECK(parse_dtype("half") == DType::fp16);
  CHECK(parse_dtype("fp32") == DType::fp32);
  CHECK(parse_dtype("float32") == DType::fp32);
  CHECK(parse_dtype("float") == DType::fp32);
  for (const char* bad : {"BF16", "int8", "", "fp64", "bfloat"}) {
    try {
      parse_dtype(bad);
      FAIL("accepted " << bad);
    } catch (const Error& e) {
      CHECK(e.code() == ErrorCode::invalid_argument);
      CHECK(std::string(e.what()).find("bf16, bfloat16, fp16, float16, half, fp32, float32, float") != std::string::npos);
    }
  }
}

TEST_CASE("policies: pinned dtype and init, static expert count") {
  using Base = GroupedLinear<HostBackend>;
  using Pinned = GroupedLoRA<Base, policy::PinnedFactorDType<DType::bf16>, policy::StaticExperts<3>>;
  static_assert(std::is_same_v<Pinned::policies::parallel_mode, policy::NoTensorParallel>);
  static_assert(policy::factor_tp_axis<policy::ColumnParallel>(policy::Factor::b) == policy::TpAxis::rows);
  static_assert(policy::factor_tp_axis<policy::ColumnParallel>(policy::Factor::a) == policy::TpAxis::none);
  static_assert(policy::factor_tp_axis<policy::RowParallel>(policy::Factor::a) == policy::TpAxis::cols);
  static_assert(policy::factor_tp_axis<policy::RowParallel>(policy::Factor::b) == policy::TpAxis::none);

  Pinned layer(Base(3, 8, 8, DType::fp32));
  layer.add_adapter("a", {}, {});
  CHECK(layer.adapter("a").a.dtype == DType::bf16);  // pinned, not the base's fp32
  AdapterConfig conflicting;
  conflicting.lora_dtype = "fp16";
  CHECK_THROWS_WITH_AS(layer.add_adapter("b", conflicting, {}),
                       doctest::Contains("conflicts with the factor dtype bf16 pinned"), Error);
  CHECK_THROWS_WITH_AS(Pinned(Base(4, 8, 8, DType::fp32)), doctest::Contains("StaticExperts policy says 3"), Error);

  using PinnedInit = GroupedLoRA<Base, policy::PinnedInit<InitMethod::kaiming_zeros>>;
  PinnedInit other(Base(2, 8, 8, DType::fp32));
  other.add_adapter("a", {}, {});
  CHECK(other.adapter("a").config.init == InitMethod::kaiming_zeros);
  CHECK(parse_init_method("kaiming_zeros") == InitMethod::kaiming_zeros);
  CHECK_THROWS_WITH_AS(parse_init_method("gaussian"), doctest::Contains("accepted: kaiming_zeros"), Error);
}

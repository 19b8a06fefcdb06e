// Weight quantizers on the host (DESIGN.md §5): scalar codecs and every format against values
// computed by hand from the formulas, the packed layout, fake_quantize == dequantize(quantize()),
// and argument errors.
#include <doctest/doctest.h>

#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "moelora/host/quantize.hpp"
#include "support/testing.hpp"

using namespace moelora;
using namespace moelora::quant;
using moelora::testing::HostTensor;
using moelora::testing::Rng;

namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

std::uint32_t bits(float v) { return std::bit_cast<std::uint32_t>(v); }

QuantSpec spec(Format f, Granularity g = Granularity::per_tensor, AmaxScope a = AmaxScope::shared) { return {f, g, a}; }

/// Quantizes fp32 `w` of `shape` and returns the packed blob.
std::vector<std::byte> pack(const QuantSpec& s, Shape shape, const std::vector<float>& w) {
  FormatQuantizer<HostBackend> q(s);
  std::vector<std::byte> blob(q.packed_bytes(shape[0], shape[1], shape[2]));
  q.quantize(tensor_ref(w.data(), shape), blob.data());
  return blob;
}

/// Q(w) in fp32 through fake_quantize, checked against dequantize(quantize(w)) bit for bit.
std::vector<float> fake(const QuantSpec& s, Shape shape, const std::vector<float>& w) {
  FormatQuantizer<HostBackend> q(s);
  std::vector<float> out(w.size(), kNaN), unpacked(w.size(), kNaN);
  q.fake_quantize(tensor_ref(w.data(), shape), tensor_ref(out.data(), shape));
  const std::vector<std::byte> blob = pack(s, shape, w);
  q.dequantize(blob.data(), shape, 0, shape[0], tensor_ref(unpacked.data(), shape));
  for (std::size_t i = 0; i < w.size(); ++i) REQUIRE(bits(out[i]) == bits(unpacked[i]));
  return out;
}

template <class T>
T section_at(const std::vector<std::byte>& blob, const PackedSection& s, std::size_t index) {
  REQUIRE(s.present());
  REQUIRE((index + 1) * sizeof(T) <= s.bytes);
  T v;
  std::memcpy(&v, blob.data() + s.offset + index * sizeof(T), sizeof(T));
  return v;
}

/// Checks `got` equals `want` bit for bit (so -0 differs from +0), naming the index.
void check_bits(const std::vector<float>& got, const std::vector<float>& want) {
  REQUIRE(got.size() == want.size());
  for (std::size_t i = 0; i < got.size(); ++i) {
    INFO("element ", i, ": got ", got[i], ", want ", want[i]);
    CHECK(bits(got[i]) == bits(want[i]));
  }
}

}  // namespace

TEST_CASE("quant spec names parse, print and round-trip; unknown names list the accepted ones") {
  CHECK(parse_quant_spec("int8") == spec(Format::int8));
  CHECK(parse_quant_spec("int8_channel") == spec(Format::int8, Granularity::per_channel));
  CHECK(parse_quant_spec("int4") == spec(Format::int4));
  CHECK(parse_quant_spec("fp8") == spec(Format::fp8_e4m3));
  CHECK(parse_quant_spec("fp8_e4m3") == spec(Format::fp8_e4m3));
  CHECK(parse_quant_spec("nvfp4") == spec(Format::nvfp4));
  CHECK(parse_quant_spec("nf4") == spec(Format::nf4));
  CHECK(parse_quant_spec("mxfp4") == spec(Format::mxfp4));
  CHECK(parse_quant_spec("nvfp4_per_expert") == spec(Format::nvfp4, Granularity::per_tensor, AmaxScope::per_expert));
  for (const QuantSpec& s : kAllQuantSpecs) {
    CHECK(parse_quant_spec(quant_spec_name(s)) == s);
    QuantSpec per_expert = s;
    per_expert.amax_scope = AmaxScope::per_expert;
    CHECK(parse_quant_spec(quant_spec_name(per_expert)) == per_expert);
  }
  CHECK(quant_spec_name(spec(Format::int8, Granularity::per_channel)) == "int8_channel");
  for (const char* bad : {"INT8", "fp4", "", "int8_tensor", "_per_expert", "nvfp4_per_channel"}) {
    try {
      parse_quant_spec(bad);
      FAIL("accepted " << bad);
    } catch (const Error& e) {
      CHECK(e.code() == ErrorCode::invalid_argument);
      CHECK(std::string(e.what()).find("int8, int8_channel, int4, fp8, fp8_e4m3, nvfp4, nf4, mxfp4") != std::string::npos);
    }
  }
  CHECK_THROWS_AS(FormatQuantizer<HostBackend>(spec(Format::nvfp4, Granularity::per_channel)), Error);
}

TEST_CASE("quant: E4M3 codec: round to nearest even, subnormals, saturation at 448") {
  CHECK(e4m3_encode(1.0f) == 0x38);   // 0 0111 000
  CHECK(e4m3_encode(-1.0f) == 0xb8);
  CHECK(e4m3_encode(448.0f) == 0x7e);  // 0 1111 110, the largest finite
  CHECK(e4m3_encode(500.0f) == 0x7e);  // saturates
  CHECK(e4m3_encode(std::numeric_limits<float>::infinity()) == 0x7e);
  CHECK(e4m3_encode(-1e30f) == 0xfe);
  CHECK(e4m3_encode(1.0625f) == 0x38);  // halfway 1 / 1.125: even mantissa (1)
  CHECK(e4m3_encode(1.1875f) == 0x3a);  // halfway 1.125 / 1.25: even mantissa (1.25)
  CHECK(e4m3_encode(1.07f) == 0x39);
  CHECK(e4m3_encode(0x1p-9f) == 0x01);          // smallest subnormal
  CHECK(e4m3_encode(0x1p-10f) == 0x00);         // half of it: ties to even (0)
  CHECK(e4m3_encode(3 * 0x1p-10f) == 0x02);     // 1.5 units: ties to even (2)
  CHECK(e4m3_encode(15 * 0x1p-10f) == 0x08);    // 7.5 units: ties to even (8 units = 2^-6, code 0x08)
  CHECK(e4m3_encode(0.0f) == 0x00);
  CHECK(e4m3_decode(0x7e) == 448.0f);
  CHECK(e4m3_decode(0x01) == 0x1p-9f);
  CHECK(e4m3_decode(0x08) == 0x1p-6f);
  CHECK(e4m3_decode(0x3a) == 1.25f);
  CHECK(e4m3_decode(0xc4) == -3.0f);  // 1 1000 100: -(1.5 · 2)
  CHECK(std::isnan(e4m3_decode(0x7f)));
  CHECK(std::isnan(e4m3_decode(0xff)));
  for (int c = 0; c < 256; ++c) {
    if ((c & 0x7f) == 0x7f) continue;
    const auto code = static_cast<std::uint8_t>(c);
    CHECK(e4m3_encode(e4m3_decode(code)) == code);
  }
}

TEST_CASE("quant: E2M1 codec: nearest magnitude of {0, .5, 1, 1.5, 2, 3, 4, 6}, ties to the even index, saturating") {
  const float in[] = {0.0f, 0.25f, 0.26f, 0.5f, 0.75f, 1.0f, 1.25f, 1.3f, 1.75f, 2.5f, 2.6f, 3.5f, 5.0f, 5.1f, 6.0f, 100.0f};
  const int want[] = {0, 0, 1, 1, 2, 2, 2, 3, 4, 4, 5, 6, 6, 7, 7, 7};
  for (std::size_t i = 0; i < std::size(in); ++i) {
    INFO(in[i]);
    CHECK(e2m1_encode(in[i]) == want[i]);
    CHECK(e2m1_encode(-in[i]) == (want[i] | 8));
  }
  const float value[] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
  for (int c = 0; c < 8; ++c) {
    CHECK(e2m1_decode(static_cast<std::uint8_t>(c)) == value[c]);
    CHECK(e2m1_decode(static_cast<std::uint8_t>(c | 8)) == -value[c]);
  }
  CHECK(std::signbit(e2m1_decode(8)));  // -0
}

TEST_CASE("quant: E2M1 index: the nearest magnitude by the midpoint search, for every float in [0, 8]") {
  // The midpoint search: a on midpoint k takes the even index of its two neighbours.
  const auto search = [](float a) {
    std::uint32_t index = 0;
    for (int k = 0; k < 7; ++k) index += k % 2 == 0 ? a > e2m1_midpoint(k) : a >= e2m1_midpoint(k);
    return index;
  };
  std::uint64_t mismatches = 0;
  const auto check = [&](std::uint32_t b) { mismatches += e2m1_index(std::bit_cast<float>(b)) != search(std::bit_cast<float>(b)); };
  for (std::uint32_t b = 0; b <= bits(8.0f); ++b) check(b);                  // every float in [0, 8]
  for (std::uint32_t b = bits(8.0f); b < 0x7f800000u; b += 4093) check(b);  // samples above
  check(0x7f800000u);                                                        // +inf
  CHECK(mismatches == 0);
  CHECK(e2m1_encode(kNaN) == 0);
  CHECK(e2m1_encode(-kNaN) == 8);
}

TEST_CASE("quant: NF4 and E8M0 codecs") {
  CHECK(nf4_encode(0.0f) == 7);
  CHECK(nf4_encode(1.0f) == 15);
  CHECK(nf4_encode(-1.0f) == 0);
  const float mid78 = (0.0f + 0.07958029955625534f) * 0.5f;
  CHECK(nf4_encode(mid78) == 7);  // on the midpoint: the lower code
  CHECK(nf4_encode(std::nextafter(mid78, 1.0f)) == 8);
  CHECK(nf4_encode(0.5f) == 12);   // between 0.4407 and 0.5626, midpoint 0.5017
  CHECK(nf4_encode(-0.6f) == 2);   // between -0.6962 and -0.5251, midpoint -0.6106
  CHECK(nf4_value(12) == 0.44070982933044434f);
  CHECK(e8m0_encode_mx(1.0f) == 125);   // 2^(0 − 2) = 2^-2: biased 125
  CHECK(e8m0_encode_mx(6.0f) == 127);   // floor(log2 6) = 2 → 2^0
  CHECK(e8m0_encode_mx(7.99f) == 127);
  CHECK(e8m0_encode_mx(8.0f) == 128);
  CHECK(e8m0_encode_mx(0.0f) == 0);     // clamped at 2^-127
  CHECK(e8m0_decode(127) == 1.0f);
  CHECK(e8m0_decode(125) == 0.25f);
  CHECK(e8m0_decode(0) == std::ldexp(1.0f, -127));
  CHECK(e8m0_inverse(0) == std::ldexp(1.0f, 127));
  CHECK(e8m0_inverse(125) == 4.0f);
}

TEST_CASE("quant: packed layout: sections, dtypes, shapes, 256-byte offsets, bytes per expert") {
  const PackedLayout nv = packed_layout(spec(Format::nvfp4), 1, 768, 2048);
  CHECK(nv.codes.bytes == 786432);
  CHECK(nv.codes.dtype == "U8");
  CHECK(nv.codes.shape == Shape{1, 768, 1024});
  CHECK(nv.scales.offset == 786432);
  CHECK(nv.scales.bytes == 98304);
  CHECK(nv.scales.dtype == "F8_E4M3");
  CHECK(nv.scales.shape == Shape{1, 768, 128});
  CHECK(nv.amax.offset == 786432 + 98304);
  CHECK(nv.amax.shape == Shape{1});
  CHECK(nv.total_bytes == 786432 + 98304 + 4);
  CHECK(nv.sections().size() == 3);

  const PackedLayout i8 = packed_layout(spec(Format::int8), 3, 5, 7);
  CHECK(i8.codes.dtype == "I8");
  CHECK(i8.codes.bytes == 105);
  CHECK(!i8.scales.present());
  CHECK(i8.amax.offset == 256);
  CHECK(i8.total_bytes == 256 + 12);
  const PackedLayout ch = packed_layout(spec(Format::int8, Granularity::per_channel), 3, 5, 7);
  CHECK(ch.scales.shape == Shape{3, 5});
  CHECK(!ch.amax.present());
  const PackedLayout i4 = packed_layout(spec(Format::int4), 2, 3, 129);
  CHECK(i4.codes.shape == Shape{2, 3, 65});
  CHECK(i4.scales.shape == Shape{2, 3, 2});
  CHECK(i4.scales.offset == 512);
  CHECK(packed_layout(spec(Format::mxfp4), 1, 1, 33).scales.dtype == "F8_E8M0");
  CHECK(packed_layout(spec(Format::mxfp4), 1, 1, 33).scales.shape == Shape{1, 1, 2});
  CHECK(packed_layout(spec(Format::nf4), 1, 1, 65).scales.shape == Shape{1, 1, 2});
  CHECK(packed_layout(spec(Format::fp8_e4m3), 1, 1, 1).codes.dtype == "F8_E4M3");
  for (const QuantSpec& s : kAllQuantSpecs)
    for (const PackedSection& sec : packed_layout(s, 3, 7, 301).sections()) CHECK(sec.offset % kPackedAlignment == 0);
  CHECK_THROWS_AS(packed_layout(spec(Format::nf4), 0, 4, 4), Error);
}

TEST_CASE("quant: INT8 per tensor: s = 127 / amax, rint ties to even, shared and per-expert amax") {
  // amax 127: s = 1, codes are the rounded values.
  const std::vector<float> w = {127.0f, 0.5f, 1.5f, -2.5f, -127.0f, 3.49f};
  check_bits(fake(spec(Format::int8), {1, 1, 6}, w), {127.0f, 0.0f, 2.0f, -2.0f, -127.0f, 3.0f});
  const std::vector<std::byte> blob = pack(spec(Format::int8), {1, 1, 6}, w);
  const PackedLayout at = packed_layout(spec(Format::int8), 1, 1, 6);
  CHECK(section_at<std::int8_t>(blob, at.codes, 3) == -2);
  CHECK(section_at<std::int8_t>(blob, at.codes, 4) == -127);
  CHECK(section_at<float>(blob, at.amax, 0) == 127.0f);

  // Expert 0 has amax 2, expert 1 amax 1. Shared: s = 63.5 for both; per expert: 63.5 and 127.
  const std::vector<float> w2 = {2.0f, 1.0f, 0.1f, 1.0f, 0.5f, -0.25f};
  const float s = 63.5f;
  check_bits(fake(spec(Format::int8), {2, 1, 3}, w2),
             {127.0f / s, 64.0f / s, 6.0f / s, 64.0f / s, 32.0f / s, -16.0f / s});  // 63.5 → 64, 31.75 → 32, -15.875 → -16
  check_bits(fake(spec(Format::int8, Granularity::per_tensor, AmaxScope::per_expert), {2, 1, 3}, w2),
             {127.0f / s, 64.0f / s, 6.0f / s, 1.0f, 64.0f / 127.0f, -32.0f / 127.0f});  // 63.5 → 64 (even), -31.75 → -32
  const std::vector<std::byte> per_expert = pack(spec(Format::int8, Granularity::per_tensor, AmaxScope::per_expert), {2, 1, 3}, w2);
  CHECK(section_at<float>(per_expert, packed_layout(spec(Format::int8), 2, 1, 3).amax, 1) == 1.0f);

  // amax < 2^-24: everything is 0 (codes 0, and +0 even for negative inputs).
  check_bits(fake(spec(Format::int8), {1, 2, 2}, {0x1p-25f, -0x1p-25f, 0.0f, 0x1p-26f}), {0.0f, 0.0f, 0.0f, 0.0f});
}

TEST_CASE("quant: INT8 per channel: one scale per output row") {
  const std::vector<float> w = {127.0f, 0.5f, 1.5f,  // row amax 127: s = 1
                                2.0f, -1.0f, 0.0f,   // row amax 2: s = 63.5
                                0.0f, 0.0f, 0.0f};   // zero row: s = 1, all 0
  const QuantSpec s = spec(Format::int8, Granularity::per_channel);
  check_bits(fake(s, {1, 3, 3}, w), {127.0f, 0.0f, 2.0f, 127.0f / 63.5f, -64.0f / 63.5f, 0.0f, 0.0f, 0.0f, 0.0f});
  const std::vector<std::byte> blob = pack(s, {1, 3, 3}, w);
  const PackedLayout at = packed_layout(s, 1, 3, 3);
  CHECK(section_at<float>(blob, at.scales, 0) == 1.0f);
  CHECK(section_at<float>(blob, at.scales, 1) == 63.5f);
  CHECK(section_at<float>(blob, at.scales, 2) == 1.0f);
}

TEST_CASE("quant: INT4 blockwise: blocks of 128, ties to even, a partial block, nibbles of an odd row") {
  // in = 131: block 0 (128 columns, amax 7 → s = 1), block 1 (3 columns, amax 1.75 → s = 4).
  std::vector<float> w(131, 0.0f);
  w[0] = 3.5f, w[1] = 2.5f, w[2] = -7.0f, w[3] = 7.0f, w[4] = -0.5f;
  w[128] = 1.75f, w[129] = -0.375f, w[130] = 0.125f;
  std::vector<float> want(131, 0.0f);
  want[0] = 4.0f, want[1] = 2.0f, want[2] = -7.0f, want[3] = 7.0f, want[4] = 0.0f;  // rint(-0.5) = -0 → code 0 → +0
  want[128] = 1.75f, want[129] = -2.0f / 4.0f, want[130] = 0.0f;  // -1.5 → -2, 0.5 → 0
  check_bits(fake(spec(Format::int4), {1, 1, 131}, w), want);
  const std::vector<std::byte> blob = pack(spec(Format::int4), {1, 1, 131}, w);
  const PackedLayout at = packed_layout(spec(Format::int4), 1, 1, 131);
  CHECK(section_at<std::uint8_t>(blob, at.codes, 0) == 0x24);  // 4 | 2 << 4
  CHECK(section_at<std::uint8_t>(blob, at.codes, 1) == 0x79);  // -7 = 0x9 | 7 << 4
  CHECK(section_at<std::uint8_t>(blob, at.codes, 64) == 0xe7);  // 7 | -2 (0xe) << 4
  CHECK(section_at<std::uint8_t>(blob, at.codes, 65) == 0x00);  // column 130 (0) and no column 131
  CHECK(section_at<float>(blob, at.scales, 0) == 1.0f);
  CHECK(section_at<float>(blob, at.scales, 1) == 4.0f);
  // The largest negative value maps to −7 (s = 7/amax), never to the spare code −8.
  check_bits(fake(spec(Format::int4), {1, 1, 2}, {-3.5f, 1.0f}), {-3.5f, 1.0f});
}

TEST_CASE("quant: FP8 E4M3 per tensor: s = 448 / amax, saturation, shared and per-expert amax") {
  const std::vector<float> w = {448.0f, 1.0625f, 0x1p-10f, -3 * 0x1p-10f, -448.0f, 100.0f};
  check_bits(fake(spec(Format::fp8_e4m3), {1, 1, 6}, w), {448.0f, 1.0f, 0.0f, -0x1p-8f, -448.0f, 96.0f});
  const std::vector<std::byte> blob = pack(spec(Format::fp8_e4m3), {1, 1, 6}, w);
  const PackedLayout at = packed_layout(spec(Format::fp8_e4m3), 1, 1, 6);
  CHECK(section_at<std::uint8_t>(blob, at.codes, 0) == 0x7e);
  CHECK(section_at<std::uint8_t>(blob, at.codes, 4) == 0xfe);
  // Expert 1 (amax 1) with the shared amax 448: s = 1; with its own: s = 448, 0.5 → 224.
  // Expert 1 (amax 0.3) with the shared amax 448: s = 1, e4m3(0.3) = 1.25 · 2^-2; with its own
  // amax: s = 448 / 0.3, 0.3 · s rounds to 448.
  const std::vector<float> w2 = {448.0f, 0.3f};
  check_bits(fake(spec(Format::fp8_e4m3), {2, 1, 1}, w2), {448.0f, 0.3125f});
  check_bits(fake(spec(Format::fp8_e4m3, Granularity::per_tensor, AmaxScope::per_expert), {2, 1, 1}, w2),
             {448.0f, 448.0f / (448.0f / 0.3f)});
  // amax < 2^-24: s = 1, so every value is far below E4M3's smallest subnormal: zeros (signed, as
  // any E4M3 value that rounds to zero).
  check_bits(fake(spec(Format::fp8_e4m3), {1, 1, 2}, {0x1p-25f, -0x1p-30f}), {0.0f, -0.0f});
  // s = 448 / 13: 13 · s rounds to 448 (or saturates to it); 1 · s = 34.46 = 1.077 · 32 → 1.125 · 32.
  const float s = 448.0f / 13.0f;
  check_bits(fake(spec(Format::fp8_e4m3), {1, 1, 2}, {13.0f, 1.0f}), {448.0f / s, 36.0f / s});
}

TEST_CASE("quant: NVFP4: global and E4M3 block scales, E2M1 ties to even and saturation, sb < 1e-5 → 1") {
  // Tensor amax 2688 → gs = 2688 / 2688 = 1. Columns 0–15: block amax 6.25, ratio 6.25/6 = 1.0417
  // → e4m3 1.0 → sb = 1. Columns 16–31: amax 2688, ratio 448 → sb = 448. Columns 32–35 (partial
  // block): amax 0.4, ratio 0.0667 = 1.067 · 2^-4 → e4m3 1.125 · 2^-4 = 0.0703125. Row 1: amax 1e-6 → e4m3 0 →
  // sb = 0 < 1e-5 → 1.
  std::vector<float> w(72, 0.0f), want(72, 0.0f);
  const float block0[] = {6.25f, 5.0f, -0.25f, 0.75f, 1.25f, -1.75f, 2.5f, 3.5f, 0.3f, -5.5f};
  const float y0[] = {6.0f, 4.0f, -0.0f, 1.0f, 1.0f, -2.0f, 2.0f, 4.0f, 0.5f, -6.0f};
  for (int i = 0; i < 10; ++i) w[static_cast<std::size_t>(i)] = block0[i], want[static_cast<std::size_t>(i)] = y0[i];
  w[16] = 2688.0f, want[16] = 2688.0f;
  w[17] = 1000.0f, want[17] = 2.0f * 448.0f;     // 2.23 → 2
  w[18] = -1500.0f, want[18] = -3.0f * 448.0f;   // 3.35 → 3
  w[32] = 0.4f, want[32] = 6.0f * 0.0703125f;    // 5.69 → 6
  w[33] = 0.1f, want[33] = 1.5f * 0.0703125f;    // 1.42 → 1.5
  w[36] = 1e-6f, want[36] = 0.0f;                // row 1: E2M1(1e-6) = 0
  w[37] = -1e-6f, want[37] = -0.0f;
  const QuantSpec s = spec(Format::nvfp4);
  check_bits(fake(s, {1, 2, 36}, w), want);
  const std::vector<std::byte> blob = pack(s, {1, 2, 36}, w);
  const PackedLayout at = packed_layout(s, 1, 2, 36);
  CHECK(section_at<std::uint8_t>(blob, at.scales, 0) == 0x38);  // 1.0
  CHECK(section_at<std::uint8_t>(blob, at.scales, 1) == 0x7e);  // 448
  CHECK(section_at<std::uint8_t>(blob, at.scales, 2) == 0x19);  // 1.125 · 2^-4: 0 0011 001
  CHECK(section_at<std::uint8_t>(blob, at.scales, 3) == 0x00);
  CHECK(section_at<float>(blob, at.amax, 0) == 2688.0f);
  CHECK(section_at<std::uint8_t>(blob, at.codes, 0) == 0x67);   // 6 → index 7; 5 → index 6 (4)
  CHECK(section_at<std::uint8_t>(blob, at.codes, 1) == 0x28);   // -0.25 → sign | 0; 0.75 → index 2

  // Shared amax 2688: expert 1 (amax 6) has gs = 1, ratio 1, sb = 1: exact. Per expert: gs = 6/2688,
  // ratio 6 / (6·gs) ≈ 448 → sb = 448·gs ≈ 1 (not exactly): 6/sb ≈ 6 → 6·sb, 3/sb ≈ 3 → 3·sb.
  const std::vector<float> w2 = {2688.0f, 0.0f, 6.0f, 3.0f};
  check_bits(fake(spec(Format::nvfp4), {2, 1, 2}, w2), {2688.0f, 0.0f, 6.0f, 3.0f});
  const float sb = 448.0f * (6.0f / 2688.0f);
  check_bits(fake(spec(Format::nvfp4, Granularity::per_tensor, AmaxScope::per_expert), {2, 1, 2}, w2),
             {2688.0f, 0.0f, 6.0f * sb, 3.0f * sb});
  // An all-zero tensor quantizes to zeros.
  check_bits(fake(s, {1, 1, 3}, {0.0f, 0.0f, 0.0f}), {0.0f, 0.0f, 0.0f});
}

TEST_CASE("quant: NF4: blocks of 64 with their absmax, nearest code value, odd rows and zero blocks") {
  // in = 69: block 0 (64 columns, c = 2), block 1 (5 columns, all zero: c = 0, code 7 = 0).
  std::vector<float> w(69, 0.0f), want(69, 0.0f);
  w[0] = 2.0f, want[0] = 2.0f;                                  // 1 → code 15
  w[1] = -2.0f, want[1] = -2.0f;                                // -1 → code 0
  w[2] = 1.0f, want[2] = 0.44070982933044434f * 2.0f;           // 0.5 → code 12
  w[3] = -1.2f, want[3] = -0.5250730514526367f * 2.0f;  // -0.6: between -0.6962 and -0.5251 (midpoint -0.6106) → code 2
  w[4] = 0.1f, want[4] = 0.07958029955625534f * 2.0f;   // 0.05: between 0 and 0.0796 (midpoint 0.0398) → code 8
  const QuantSpec s = spec(Format::nf4);
  check_bits(fake(s, {1, 1, 69}, w), want);
  const std::vector<std::byte> blob = pack(s, {1, 1, 69}, w);
  const PackedLayout at = packed_layout(s, 1, 1, 69);
  CHECK(section_at<std::uint8_t>(blob, at.codes, 0) == 0x0f);  // 15 | 0 << 4
  CHECK(section_at<std::uint8_t>(blob, at.codes, 1) == 0x2c);  // 12 | 2 << 4
  CHECK(section_at<std::uint8_t>(blob, at.codes, 2) == 0x78);  // 8 | 7 << 4
  CHECK(section_at<std::uint8_t>(blob, at.codes, 33) == 0x77);
  CHECK(section_at<std::uint8_t>(blob, at.codes, 34) == 0x07);  // column 68, no column 69
  CHECK(section_at<float>(blob, at.scales, 0) == 2.0f);
  CHECK(section_at<float>(blob, at.scales, 1) == 0.0f);
}

namespace {

/// A binned codec's thresholds and bins against its division: random values, ±3 ulps of every
/// threshold, ±0 and the ends of the bins' range (±d for NF4; ±8d for NVFP4, whose bins code |x|),
/// for the x that bin_scale admits.
template <Scheme S>
void check_binned_codec() {
  using Codec = SchemeCodec<S>;
  constexpr double kRange = static_cast<double>(Codec::kBins - Codec::kBinOrigin) / Codec::kBinUnit;  // of x/d
  std::uint8_t bins[Codec::kBins + 1];
  for (int n = 0; n <= Codec::kBins; ++n) bins[n] = Codec::bin_code(n);
  CHECK(bins[0] == 0);
  CHECK(bins[Codec::kBinOrigin] == Codec::encode(0.0f, {1.0f, 1.0f}));  // u = origin: x = 0
  CHECK(bins[Codec::kBins] == Codec::kThresholds);
  Rng rng;
  INFO("seed ", rng.seed);
  std::vector<float> divisors = {1.0f, 2.0f, 0.02f, 3.0f, 0x1p-120f, 0x1p120f, std::nextafter(1.0f, 2.0f), std::nextafter(1.0f, 0.0f)};
  for (int i = 0; i < 200; ++i) divisors.push_back(static_cast<float>(std::ldexp(1.0 + rng.uniform(), static_cast<int>(rng.integer(-100, 100)))));
  for (const float d : divisors) {
    CAPTURE(d);
    const GroupScale scale{d, d};
    const auto range = static_cast<float>(kRange * d);  // exact: a power of two times d
    float t[Codec::kThresholds + 1];
    for (int k = 0; k <= Codec::kThresholds; ++k) t[k] = code_threshold(k < Codec::kThresholds ? Codec::boundary(k) : kSpareBoundary, d);
    const float s = Codec::bin_scale(scale, d);
    REQUIRE(s != 0.0f);
    std::vector<float> xs = {range, -range, 0.0f, -0.0f, std::nextafter(range, 0.0f), std::nextafter(-range, 0.0f)};
    for (int k = 0; k < Codec::kThresholds; ++k) {
      float up = t[k], down = t[k];
      xs.push_back(t[k]), xs.push_back(-t[k]);
      for (int u = 0; u < 3; ++u) {
        up = std::nextafter(up, INFINITY), down = std::nextafter(down, -INFINITY);
        xs.push_back(up), xs.push_back(down), xs.push_back(-up), xs.push_back(-down);
      }
    }
    for (int i = 0; i < 2000; ++i) xs.push_back(static_cast<float>((2.0 * rng.uniform() - 1.0) * range));
    for (const float x : xs) {
      if (std::fabs(x) > range || std::fabs(x) * s > static_cast<float>(Codec::kBins)) continue;  // bin_scale's bound
      CAPTURE(x);
      const std::uint32_t want = Codec::encode(x, scale);
      CHECK(Codec::encode_below(x, t) == want);
      CHECK(Codec::encode_binned(x, s, bins, t) == want);
    }
  }
  CHECK(Codec::bin_scale({0x1p-121f, 0x1p-121f}, 0.0f) == 0.0f);  // such groups use encode_below
  CHECK(Codec::bin_scale({0x1p121f, 0x1p121f}, 0.0f) == 0.0f);
  CHECK(Codec::bin_scale({kNaN, kNaN}, 0.0f) == 0.0f);
  CHECK(Codec::bin_scale({INFINITY, INFINITY}, 0.0f) == 0.0f);
}

}  // namespace

TEST_CASE("quant: NF4 thresholds and bins give the division's code: random values, ±3 ulps of every threshold, ±d, ±0") {
  check_binned_codec<Scheme::nf4>();
}

TEST_CASE("quant: NVFP4 thresholds and bins give the division's code for |x| up to 8·sb; larger blocks use the search") {
  using Codec = SchemeCodec<Scheme::nvfp4>;
  check_binned_codec<Scheme::nvfp4>();
  CHECK(Codec::bin_scale({1.0f, 1.0f}, 8.0f) != 0.0f);
  CHECK(Codec::bin_scale({1.0f, 1.0f}, std::nextafter(8.0f, 9.0f)) == 0.0f);  // an element could pass bin 32
  CHECK(Codec::bin_scale({1.0f, 1.0f}, kNaN) == 0.0f);
}

TEST_CASE("quant: MXFP4: blocks of 32, E8M0 scale 2^(floor(log2 amax) - 2), E2M1 saturating") {
  // Block 0: amax 6 → scale 1. Block 1: amax 0.75 → floor(log2) = -1 → scale 2^-3. Block 2: amax
  // 7 → scale 1, 7 saturates to 6. Block 3 (2 columns): zero → code 0 (2^-127).
  std::vector<float> w(98, 0.0f), want(98, 0.0f);
  w[0] = 6.0f, want[0] = 6.0f;
  w[1] = 5.0f, want[1] = 4.0f;     // tie → even index (4)
  w[2] = -0.25f, want[2] = -0.0f;  // tie → index 0, sign kept
  w[3] = 2.5f, want[3] = 2.0f;
  w[32] = 0.75f, want[32] = 0.75f;  // 6 · 2^-3
  w[33] = 0.3f, want[33] = 0.25f;   // 2.4 → 2
  w[34] = -0.2f, want[34] = -0.1875f;  // -1.6 → -1.5
  w[64] = 7.0f, want[64] = 6.0f;
  w[65] = -6.5f, want[65] = -6.0f;
  const QuantSpec s = spec(Format::mxfp4);
  check_bits(fake(s, {1, 1, 98}, w), want);
  const std::vector<std::byte> blob = pack(s, {1, 1, 98}, w);
  const PackedLayout at = packed_layout(s, 1, 1, 98);
  CHECK(section_at<std::uint8_t>(blob, at.scales, 0) == 127);
  CHECK(section_at<std::uint8_t>(blob, at.scales, 1) == 124);
  CHECK(section_at<std::uint8_t>(blob, at.scales, 2) == 127);
  CHECK(section_at<std::uint8_t>(blob, at.scales, 3) == 0);
  CHECK(section_at<std::uint8_t>(blob, at.codes, 0) == 0x67);
  CHECK(section_at<std::uint8_t>(blob, at.codes, 1) == 0x48);
}

TEST_CASE("quant: fake_quantize == dequantize(quantize()) bit for bit, for every spec, dtype and expert range") {
  Rng rng;
  INFO("seed ", rng.seed);
  for (const QuantSpec& base : kAllQuantSpecs)
    for (const AmaxScope scope : {AmaxScope::shared, AmaxScope::per_expert})
      for (const Shape shape : {Shape{3, 5, 200}, Shape{1, 2, 33}, Shape{2, 3, 7}}) {
        QuantSpec s = base;
        s.amax_scope = scope;
        FormatQuantizer<HostBackend> q(s);
        for (const DType in_dtype : kAllDTypes) {
          HostTensor w = moelora::testing::random_tensor(rng, in_dtype, shape, 0.05f);
          for (std::int64_t e = 0; e < shape[0]; ++e)  // experts of different ranges
            for (std::int64_t i = 0; i < shape[1] * shape[2]; ++i)
              w[static_cast<std::size_t>(e * shape[1] * shape[2] + i)] *= static_cast<float>(e + 1) * 3.0f;
          const std::vector<std::byte> w_bytes = w.encode();
          const ConstTensorRef wr{w_bytes.data(), in_dtype, shape};
          std::vector<std::byte> blob(q.packed_bytes(shape[0], shape[1], shape[2]));
          q.quantize(wr, blob.data());
          for (const DType out_dtype : kAllDTypes) {
            CAPTURE(quant_spec_name(s));
            CAPTURE(dtype_name(in_dtype));
            CAPTURE(dtype_name(out_dtype));
            const std::size_t bytes = static_cast<std::size_t>(shape.numel()) * dtype_size(out_dtype);
            std::vector<std::byte> fq(bytes), dq(bytes);
            q.fake_quantize(wr, {fq.data(), out_dtype, shape});
            q.dequantize(blob.data(), shape, 0, shape[0], {dq.data(), out_dtype, shape});
            CHECK(fq == dq);
            // One expert at a time equals the matching slice.
            const std::size_t per_expert = bytes / static_cast<std::size_t>(shape[0]);
            for (std::int64_t e = 0; e < shape[0]; ++e) {
              std::vector<std::byte> one(per_expert);
              q.dequantize(blob.data(), shape, e, 1, {one.data(), out_dtype, {1, shape[1], shape[2]}});
              CHECK(std::memcmp(one.data(), dq.data() + static_cast<std::size_t>(e) * per_expert, per_expert) == 0);
            }
          }
          // In place: out aliases w.
          std::vector<std::byte> in_place = w_bytes, expected(w_bytes.size());
          q.fake_quantize(wr, {expected.data(), in_dtype, shape});
          q.fake_quantize({in_place.data(), in_dtype, shape}, {in_place.data(), in_dtype, shape});
          CHECK(in_place == expected);
        }
      }
}

TEST_CASE("quantizers are idempotent up to the scales they recalibrate: Q(Q(w)) == Q(w) for NF4 and MXFP4") {
  // Re-quantizing keeps every block's amax (NF4: the absmax is a code value times itself; MXFP4:
  // the largest E2M1 magnitude keeps floor(log2)), so the codes and values come back unchanged.
  Rng rng;
  INFO("seed ", rng.seed);
  const HostTensor w = moelora::testing::random_tensor(rng, DType::fp32, {2, 4, 100});
  for (const Format f : {Format::nf4, Format::mxfp4}) {
    FormatQuantizer<HostBackend> q(spec(f));
    std::vector<float> once(w.size()), twice(w.size());
    q.fake_quantize(tensor_ref(w.values.data(), w.shape), tensor_ref(once.data(), w.shape));
    q.fake_quantize(tensor_ref(once.data(), w.shape), tensor_ref(twice.data(), w.shape));
    check_bits(twice, once);
  }
}

TEST_CASE("quantizer arguments are validated with clear errors") {
  FormatQuantizer<HostBackend> q(spec(Format::nvfp4));
  std::vector<float> w(2 * 3 * 4, 1.0f), out(w.size());
  std::vector<std::byte> blob(q.packed_bytes(2, 3, 4));
  const auto code_of = [](auto&& call) {
    try {
      call();
    } catch (const Error& e) {
      return e.code();
    }
    FAIL("no error");
    return ErrorCode::unsupported;
  };
  CHECK(code_of([&] { q.quantize(tensor_ref(w.data(), {6, 4}), blob.data()); }) == ErrorCode::shape_mismatch);
  CHECK(code_of([&] { q.quantize(tensor_ref(w.data(), {0, 3, 4}), blob.data()); }) == ErrorCode::shape_mismatch);
  CHECK(code_of([&] { q.quantize(tensor_ref(w.data(), {2, 3, 4}), nullptr); }) == ErrorCode::invalid_argument);
  CHECK(code_of([&] { q.fake_quantize(tensor_ref(w.data(), {2, 3, 4}), tensor_ref(out.data(), {2, 4, 3})); }) ==
        ErrorCode::shape_mismatch);
  CHECK(code_of([&] {
          q.fake_quantize(tensor_ref(w.data(), {2, 3, 4}), TensorRef{w.data(), DType::bf16, {2, 3, 4}});
        }) == ErrorCode::dtype_mismatch);
  q.quantize(tensor_ref(w.data(), {2, 3, 4}), blob.data());
  CHECK(code_of([&] { q.dequantize(blob.data(), {2, 3, 4}, 1, 2, tensor_ref(out.data(), {2, 3, 4})); }) ==
        ErrorCode::invalid_argument);
  CHECK(code_of([&] { q.dequantize(blob.data(), {2, 3, 4}, -1, 1, tensor_ref(out.data(), {1, 3, 4})); }) ==
        ErrorCode::invalid_argument);
  CHECK(code_of([&] { q.dequantize(blob.data(), {2, 3, 4}, 0, 1, tensor_ref(out.data(), {2, 3, 4})); }) ==
        ErrorCode::shape_mismatch);
  CHECK(code_of([&] { q.dequantize(blob.data(), {6, 4}, 0, 1, tensor_ref(out.data(), {1, 3, 4})); }) ==
        ErrorCode::shape_mismatch);
  try {
    q.dequantize(blob.data(), {2, 3, 4}, 1, 2, tensor_ref(out.data(), {2, 3, 4}));
  } catch (const Error& e) {
    CHECK(std::string(e.what()).find("experts [1, 3) are not within the 2 experts") != std::string::npos);
  }
  CHECK_NOTHROW(q.dequantize(blob.data(), {2, 3, 4}, 2, 0, TensorRef{nullptr, DType::fp32, {0, 3, 4}}));
}

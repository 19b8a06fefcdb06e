// The CUDA quantizers against the host's, bit for bit: packed sections, dequantize (all experts
// and one) and fake_quantize (out of place and in place), for every spec, amax scope, input and
// output dtype, on shapes with 8-aligned rows (the vector path), odd `in` and partial blocks (the
// element path), and one expert. Linked into moelora_gpu_tests (main in test_gpu.cu).
#include <doctest/doctest.h>

#include <cstring>
#include <vector>

#include "moelora/cuda/quantize.hpp"
#include "moelora/host/quantize.hpp"
#include "support/testing.hpp"

using namespace moelora;
using namespace moelora::quant;
using moelora::testing::HostTensor;
using moelora::testing::Rng;

namespace {

struct QuantStream {
  cudaStream_t stream = nullptr;
  QuantStream() { MOELORA_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking)); }
  ~QuantStream() { cudaStreamDestroy(stream); }
  QuantStream(const QuantStream&) = delete;
  QuantStream& operator=(const QuantStream&) = delete;
};

Buffer<CudaBackend> upload(const std::vector<std::byte>& bytes, cudaStream_t stream) {
  Buffer<CudaBackend> b(std::max<std::size_t>(bytes.size(), 1));
  CudaBackend::copy_from_host(b.data(), bytes.data(), bytes.size(), stream);
  return b;
}

std::vector<std::byte> download(const void* data, std::size_t bytes, cudaStream_t stream) {
  std::vector<std::byte> out(bytes);
  CudaBackend::copy_to_host(out.data(), data, bytes, stream);
  return out;
}

/// A device buffer of `bytes` bytes of 0xff (NaN in every float dtype), so unwritten bytes show.
Buffer<CudaBackend> poisoned(std::size_t bytes, cudaStream_t stream) {
  Buffer<CudaBackend> b(std::max<std::size_t>(bytes, 1));
  MOELORA_CUDA_CHECK(cudaMemsetAsync(b.data(), 0xff, bytes, stream));
  return b;
}

/// Random weights, each expert at its own range, with an all-zero row and an all-zero 16-block.
HostTensor weights(Rng& rng, DType dtype, Shape shape) {
  HostTensor w = moelora::testing::random_tensor(rng, dtype, shape, 0.02f);
  const std::int64_t per_expert = shape[1] * shape[2];
  for (std::int64_t i = 0; i < shape.numel(); ++i)
    w[static_cast<std::size_t>(i)] = moelora::testing::round_as(dtype, w[static_cast<std::size_t>(i)] *
                                                                           static_cast<float>(1 + 4 * (i / per_expert)));
  for (std::int64_t c = 0; c < shape[2]; ++c) w[static_cast<std::size_t>(c)] = 0.0f;  // row 0 of expert 0
  if (shape[1] > 1)
    for (std::int64_t c = 0; c < std::min<std::int64_t>(16, shape[2]); ++c) w[static_cast<std::size_t>(shape[2] + c)] = 0.0f;
  return w;
}

}  // namespace

TEST_CASE("quant: GPU quantize, dequantize and fake_quantize equal the host's bit for bit") {
  Rng rng;
  INFO("seed ", rng.seed);
  QuantStream qs;
  const cudaStream_t stream = qs.stream;
  const Shape shapes[] = {{3, 8, 256}, {2, 5, 200}, {2, 3, 37}, {1, 4, 130}, {1, 1, 8}, {2, 16, 2048}};
  for (const QuantSpec& base : kAllQuantSpecs)
    for (const AmaxScope scope : {AmaxScope::shared, AmaxScope::per_expert}) {
      QuantSpec spec = base;
      spec.amax_scope = scope;
      FormatQuantizer<HostBackend> host(spec);
      FormatQuantizer<CudaBackend> gpu(spec);
      for (const Shape shape : shapes)
        for (const DType in_dtype : kAllDTypes) {
          CAPTURE(quant_spec_name(spec));
          CAPTURE(shape);
          CAPTURE(dtype_name(in_dtype));
          const HostTensor w = weights(rng, in_dtype, shape);
          const std::vector<std::byte> w_bytes = w.encode();
          const ConstTensorRef w_host{w_bytes.data(), in_dtype, shape};
          const Buffer<CudaBackend> w_dev = upload(w_bytes, stream);
          const ConstTensorRef w_gpu{w_dev.data(), in_dtype, shape};

          const std::size_t packed_bytes = host.packed_bytes(shape[0], shape[1], shape[2]);
          REQUIRE(gpu.packed_bytes(shape[0], shape[1], shape[2]) == packed_bytes);
          std::vector<std::byte> packed_host(packed_bytes);
          host.quantize(w_host, packed_host.data());
          const Buffer<CudaBackend> packed_dev = poisoned(packed_bytes, stream);
          gpu.quantize(w_gpu, packed_dev.data(), stream);
          const std::vector<std::byte> packed_gpu = download(packed_dev.data(), packed_bytes, stream);
          for (const PackedSection& section : packed_layout(spec, shape[0], shape[1], shape[2]).sections()) {
            CAPTURE(section.name);
            CHECK(std::memcmp(packed_gpu.data() + section.offset, packed_host.data() + section.offset, section.bytes) == 0);
          }

          for (const DType out_dtype : kAllDTypes) {
            CAPTURE(dtype_name(out_dtype));
            const std::size_t out_bytes = static_cast<std::size_t>(shape.numel()) * dtype_size(out_dtype);
            std::vector<std::byte> want(out_bytes);
            host.fake_quantize(w_host, {want.data(), out_dtype, shape});

            const Buffer<CudaBackend> fake = poisoned(out_bytes, stream);
            gpu.fake_quantize(w_gpu, {fake.data(), out_dtype, shape}, stream);
            CHECK(download(fake.data(), out_bytes, stream) == want);

            const Buffer<CudaBackend> unpacked = poisoned(out_bytes, stream);
            gpu.dequantize(packed_dev.data(), shape, 0, shape[0], {unpacked.data(), out_dtype, shape}, stream);
            CHECK(download(unpacked.data(), out_bytes, stream) == want);

            const std::int64_t last = shape[0] - 1;
            const std::size_t expert_bytes = out_bytes / static_cast<std::size_t>(shape[0]);
            const Buffer<CudaBackend> one = poisoned(expert_bytes, stream);
            gpu.dequantize(packed_dev.data(), shape, last, 1, {one.data(), out_dtype, {1, shape[1], shape[2]}}, stream);
            CHECK(std::memcmp(download(one.data(), expert_bytes, stream).data(),
                              want.data() + static_cast<std::size_t>(last) * expert_bytes, expert_bytes) == 0);
          }

          // In place: out aliases w.
          std::vector<std::byte> want(w_bytes.size());
          host.fake_quantize(w_host, {want.data(), in_dtype, shape});
          const Buffer<CudaBackend> in_place = upload(w_bytes, stream);
          gpu.fake_quantize({in_place.data(), in_dtype, shape}, {in_place.data(), in_dtype, shape}, stream);
          CHECK(download(in_place.data(), w_bytes.size(), stream) == want);
        }
    }
}

TEST_CASE("quant: GPU quantizer: host-side validation before any launch") {
  QuantStream qs;
  FormatQuantizer<CudaBackend> gpu(QuantSpec{Format::int4});
  Buffer<CudaBackend> w(2 * 3 * 4 * 4), packed(gpu.packed_bytes(2, 3, 4));
  CHECK_THROWS_AS(gpu.quantize({w.data(), DType::fp32, {6, 4}}, packed.data(), qs.stream), Error);
  CHECK_THROWS_AS(gpu.fake_quantize({w.data(), DType::fp32, {2, 3, 4}}, {w.data(), DType::bf16, {2, 3, 4}}, qs.stream),
                  Error);
  CHECK_THROWS_AS(gpu.dequantize(packed.data(), {2, 3, 4}, 2, 1, {w.data(), DType::fp32, {1, 3, 4}}, qs.stream), Error);
}

TEST_CASE("quant: every kernel tiling gives the default tiling's bits") {
  // bench/sweep_quant times such tilings; they must only move where the work is done.
  Rng rng;
  INFO("seed ", rng.seed);
  QuantStream qs;
  const cudaStream_t stream = qs.stream;
  using Few = kernels::QuantTiling<1, 1, 1, 1>;
  using Many = kernels::QuantTiling<3, 8, 5, 8>;
  const Shape shapes[] = {{2, 5, 200}, {2, 3, 37}, {2, 16, 2048}, {1, 2, 14336}};
  for (const QuantSpec& spec : kAllQuantSpecs) {
    FormatQuantizer<CudaBackend> gpu(spec);
    for (const Shape shape : shapes) {
      CAPTURE(quant_spec_name(spec));
      CAPTURE(shape);
      const HostTensor w = weights(rng, DType::bf16, shape);
      const Buffer<CudaBackend> w_dev = upload(w.encode(), stream);
      const ConstTensorRef w_gpu{w_dev.data(), DType::bf16, shape};
      const std::size_t packed_bytes = gpu.packed_bytes(shape[0], shape[1], shape[2]);
      const std::size_t out_bytes = static_cast<std::size_t>(shape.numel()) * 2;
      const Buffer<CudaBackend> packed = poisoned(packed_bytes, stream), fake = poisoned(out_bytes, stream);
      const Buffer<CudaBackend> unpacked = poisoned(out_bytes, stream);
      gpu.quantize(w_gpu, packed.data(), stream);
      gpu.fake_quantize(w_gpu, {fake.data(), DType::bf16, shape}, stream);
      gpu.dequantize(packed.data(), shape, 0, shape[0], {unpacked.data(), DType::bf16, shape}, stream);
      const std::vector<std::byte> want_packed = download(packed.data(), packed_bytes, stream);
      const std::vector<std::byte> want_fake = download(fake.data(), out_bytes, stream);
      REQUIRE(download(unpacked.data(), out_bytes, stream) == want_fake);

      const auto check = [&](auto tiling) {
        using Tiling = decltype(tiling);
        const Buffer<CudaBackend> p = poisoned(packed_bytes, stream), f = poisoned(out_bytes, stream);
        const Buffer<CudaBackend> u = poisoned(out_bytes, stream);
        gpu.quantize_tiled<Tiling, DType::bf16>(w_gpu, p.data(), stream);
        gpu.fake_quantize_tiled<Tiling, DType::bf16, DType::bf16>(w_gpu, {f.data(), DType::bf16, shape}, stream);
        gpu.dequantize_tiled<Tiling, DType::bf16>(packed.data(), shape, 0, shape[0], {u.data(), DType::bf16, shape}, stream);
        CHECK(download(p.data(), packed_bytes, stream) == want_packed);
        CHECK(download(f.data(), out_bytes, stream) == want_fake);
        CHECK(download(u.data(), out_bytes, stream) == want_fake);
      };
      check(Few{});
      check(Many{});
    }
  }
  FormatQuantizer<CudaBackend> gpu(QuantSpec{Format::nf4});
  Buffer<CudaBackend> w(2 * 8 * 64 * 4), packed(gpu.packed_bytes(2, 8, 64));
  CHECK_THROWS_WITH_AS((gpu.quantize_tiled<kernels::DefaultQuantTiling, DType::bf16>({w.data(), DType::fp32, {2, 8, 64}},
                                                                                    packed.data(), stream)),
                       doctest::Contains("the weight to quantize is fp32, this call takes bf16"), Error);
}

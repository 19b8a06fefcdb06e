// The quantizers' tuning sweep (issue 12): fake_quantize, quantize and dequantize of every spec on
// the bf16 weights of bench_quant, timed with several kernel tilings (kernels::QuantTiling), as %
// of the device copy bandwidth (bytes counted as bench_quant counts them). Each variant's output
// (out, the packed blob, the dequantized weight) is first checked against DefaultQuantTiling's bit
// for bit. Buffers rotate in sets of at least twice the L2 size. Prints one markdown table
// (operation rows × variants: ms and % of copy) and a summary per variant.
// Run: build/bench/sweep_quant [--variants a,b] [--specs a,b] [--iters N]
#include <CLI/CLI.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <optional>
#include <string>
#include <vector>

#include "moelora/cuda/quantize.hpp"
#include "quant_data.cuh"
#include "sweep.hpp"
#include "timing.cuh"

namespace {

using namespace moelora;
using namespace moelora::quant;
using CudaQuantizer = FormatQuantizer<CudaBackend>;

/// One variant: its name and the three operations with its tiling (bf16 in and out).
struct Variant {
  const char* name;
  const char* what;
  void (*fake)(CudaQuantizer&, ConstTensorRef, TensorRef, cudaStream_t);
  void (*quantize)(CudaQuantizer&, ConstTensorRef, void*, cudaStream_t);
  void (*dequantize)(CudaQuantizer&, const void*, Shape, TensorRef, cudaStream_t);
};

template <class Tiling>
constexpr Variant variant(const char* name, const char* what) {
  return {name, what,
          [](CudaQuantizer& q, ConstTensorRef w, TensorRef out, cudaStream_t s) {
            q.fake_quantize_tiled<Tiling, DType::bf16, DType::bf16>(w, out, s);
          },
          [](CudaQuantizer& q, ConstTensorRef w, void* packed, cudaStream_t s) { q.quantize_tiled<Tiling, DType::bf16>(w, packed, s); },
          [](CudaQuantizer& q, const void* packed, Shape shape, TensorRef out, cudaStream_t s) {
            q.dequantize_tiled<Tiling, DType::bf16>(packed, shape, 0, shape[0], out, s);
          }};
}

using kernels::QuantTiling;
const Variant kVariants[] = {
    variant<kernels::DefaultQuantTiling>("default", "the library's DefaultQuantTiling"),
    variant<QuantTiling<2, 4, 2, 4>>("old", "slabs before issue 12: fake 2, quantize 4, dequantize 2; 4 warps"),
    variant<QuantTiling<2, 4, 8, 4>>("deq8", "default, dequantize 8 slabs"),
    variant<QuantTiling<4, 4, 4, 4>>("fake4", "default, fake-quantize 4 slabs"),
    variant<QuantTiling<2, 8, 4, 4>>("quant8", "default, quantize 8 slabs"),
    variant<QuantTiling<2, 2, 4, 4>>("quant2", "default, quantize 2 slabs"),
    variant<QuantTiling<2, 4, 4, 8>>("wide", "default, blocks of up to 8 warps"),
};

/// Counts the bytes where a and b differ.
__global__ void differing_bytes_kernel(const std::uint8_t* a, const std::uint8_t* b, std::int64_t n,
                                       unsigned long long* differing) {
  unsigned long long count = 0;
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x)
    count += a[i] != b[i];
  if (count) atomicAdd(differing, count);
}

unsigned long long differing_bytes(const void* a, const void* b, std::size_t n, Buffer<CudaBackend>& scratch,
                                   cudaStream_t stream) {
  CudaBackend::fill_zero(scratch.data(), scratch.bytes(), stream);
  differing_bytes_kernel<<<1024, 256, 0, stream>>>(static_cast<const std::uint8_t*>(a), static_cast<const std::uint8_t*>(b),
                                                   static_cast<std::int64_t>(n), scratch.as<unsigned long long>());
  MOELORA_CUDA_CHECK(cudaGetLastError());
  unsigned long long count = 0;
  CudaBackend::copy_to_host(&count, scratch.data(), sizeof count, stream);
  return count;
}

enum Op { kFake, kQuantize, kDequantize };
constexpr const char* kOpNames[] = {"fake", "quantize", "dequantize"};

struct Cell {
  double ms = 0.0, percent = 0.0;
  unsigned long long differing = 0;
};

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"moelora quantizer tuning sweep (bf16 weights): each kernel tiling against the device copy bandwidth"};
  std::vector<std::string> specs;
  app.add_option("--specs", specs, "comma-separated quantizer names (default: all formats)")->delimiter(',');
  bench::SweepOptions options;
  options.add_to(app);
  CLI11_PARSE(app, argc, argv);
  const std::vector<const Variant*> variants = options.chosen(kVariants);
  if (variants.empty()) return options.list ? 0 : 1;
  std::vector<QuantSpec> chosen;
  if (specs.empty()) chosen.assign(kAllQuantSpecs.begin(), kAllQuantSpecs.end());
  else
    for (const std::string& name : specs) chosen.push_back(parse_quant_spec(name));
  const std::optional<bench::SweepDevice> device = bench::open_device("sweep_quant");
  if (!device) return 1;
  const cudaStream_t stream = device->stream;
  std::printf("\n");
  bench::print_variants(variants);
  std::printf("\nms (%% of the copy bandwidth); FAIL(n): n bytes differ from DefaultQuantTiling's output\n\n");
  bench::print_table_header({{"shape", "---"}, {"quantizer", "---"}, {"op", "---"}, {"copy GB/s", "---:"}}, variants);

  bench::SweepSummary summary(variants.size());
  Buffer<CudaBackend> scratch(8);
  for (const bench::QuantShape& s : bench::kQuantShapes) {
    const Shape shape{s.experts, s.out, s.in};
    const std::int64_t numel = s.experts * s.out * s.in;
    const auto weight_bytes = static_cast<std::size_t>(numel) * 2;
    struct Set {
      Buffer<CudaBackend> w, out, packed;
    };
    std::size_t most_packed = 0;
    for (const QuantSpec& spec : chosen) most_packed = std::max(most_packed, CudaQuantizer(spec).packed_bytes(s.experts, s.out, s.in));
    const int sets = bench::rotation_sets(2 * weight_bytes + most_packed, static_cast<std::size_t>(device->prop.l2CacheSize));
    std::vector<Set> data;
    for (int i = 0; i < sets; ++i) {
      data.push_back({Buffer<CudaBackend>(weight_bytes), Buffer<CudaBackend>(weight_bytes), Buffer<CudaBackend>(most_packed)});
      bench::fill_normalish_kernel<<<1024, 256, 0, stream>>>(data.back().w.as<__nv_bfloat16>(), numel,
                                                             7 + static_cast<std::uint64_t>(i));
      MOELORA_CUDA_CHECK(cudaGetLastError());
    }
    Buffer<CudaBackend> out_ref(weight_bytes), packed_ref(most_packed), deq_ref(weight_bytes);
    const double copy_ms =
        bench::median_ms(stream, options.iters, [&] { CudaBackend::copy(data[0].out.data(), data[0].w.data(), weight_bytes, stream); });
    const double copy_gbps = 2.0 * static_cast<double>(weight_bytes) / (copy_ms * 1e6);
    const auto w_of = [&](const Set& set) { return ConstTensorRef{set.w.data(), DType::bf16, shape}; };
    const auto out_of = [&](const Set& set) { return TensorRef{set.out.data(), DType::bf16, shape}; };

    for (const QuantSpec& spec : chosen) {
      CudaQuantizer q(spec);
      q.reserve(s.experts);
      const std::size_t packed_bytes = q.packed_bytes(s.experts, s.out, s.in);
      const bench::QuantBytes moved = bench::quant_bytes(spec, numel, packed_bytes);
      const double op_bytes[] = {moved.fake, moved.quantize, moved.dequantize};
      // The references: DefaultQuantTiling (the library's plain calls) on set 0.
      q.fake_quantize(w_of(data[0]), out_of(data[0]), stream);
      CudaBackend::copy(out_ref.data(), data[0].out.data(), weight_bytes, stream);
      q.quantize(w_of(data[0]), packed_ref.data(), stream);
      q.dequantize(packed_ref.data(), shape, 0, s.experts, TensorRef{deq_ref.data(), DType::bf16, shape}, stream);
      for (int i = 0; i < sets; ++i)  // every set dequantizes its own copy of the blob
        CudaBackend::copy(data[static_cast<std::size_t>(i)].packed.data(), packed_ref.data(), packed_bytes, stream);

      std::vector<std::vector<Cell>> cells(3);
      for (const Variant* v : variants) {
        const auto fake = [&](const Set& set) { v->fake(q, w_of(set), out_of(set), stream); };
        const auto quantize = [&](const Set& set) { v->quantize(q, w_of(set), set.out.data(), stream); };
        const auto dequantize = [&](const Set& set) { v->dequantize(q, set.packed.data(), shape, out_of(set), stream); };
        for (const Op op : {kFake, kQuantize, kDequantize}) {
          Cell cell;
          const Set& first = data[0];
          // Quantize writes its blob into `out` (large enough), keeping `packed` for dequantize.
          if (op == kFake) {
            fake(first);
            cell.differing = differing_bytes(first.out.data(), out_ref.data(), weight_bytes, scratch, stream);
          } else if (op == kQuantize) {
            quantize(first);
            cell.differing = differing_bytes(first.out.data(), packed_ref.data(), packed_bytes, scratch, stream);
          } else {
            dequantize(first);
            cell.differing = differing_bytes(first.out.data(), deq_ref.data(), weight_bytes, scratch, stream);
          }
          int next = 0;
          cell.ms = bench::median_ms(stream, options.iters, [&] {
            const Set& set = data[static_cast<std::size_t>(next++ % sets)];
            if (op == kFake) fake(set);
            else if (op == kQuantize) quantize(set);
            else dequantize(set);
          });
          cell.percent = 100.0 * op_bytes[op] / (cell.ms * 1e6) / copy_gbps;
          cells[op].push_back(cell);
        }
      }
      for (const Op op : {kFake, kQuantize, kDequantize}) {
        std::printf("| %s | %s | %s | %.0f |", s.name, quant_spec_name(spec).c_str(), kOpNames[op], copy_gbps);
        for (std::size_t i = 0; i < variants.size(); ++i) {
          const Cell& c = cells[op][i];
          summary.add(i, c.percent, c.differing == 0);
          if (c.differing == 0) std::printf(" %.3f (%.0f%%) |", c.ms, c.percent);
          else std::printf(" %.3f FAIL(%llu) |", c.ms, c.differing);
        }
        std::printf("\n");
      }
      std::fflush(stdout);
    }
  }
  summary.print(variants, 75.0, "old");
  cudaStreamDestroy(stream);
  return 0;
}

// The quantizer benchmark: GB/s of fake_quantize, quantize and dequantize for every spec on bf16
// expert weights, against the device copy bandwidth (cudaMemcpy device to device of the weight's
// bytes: read + write). Bytes counted: fake_quantize reads w (twice with a tensor amax: the amax
// pass and the quantize pass) and writes out (bf16); quantize reads w the same and writes the
// packed blob; dequantize reads the packed blob and writes out. Prints a markdown table and writes
// one JSON object per row (JSON lines). Shapes: 128×768×2048 (Qwen3-30B-A3B fc2) and
// 8×4096×14336 (Mixtral 8x7B). Run: build/bench/bench_quant [--iters N] [--specs a,b] [--out f]
#include <CLI/CLI.hpp>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include "moelora/cuda/quantize.hpp"
#include "quant_data.cuh"
#include "timing.cuh"

using namespace moelora;
using namespace moelora::quant;
using moelora::bench::median_ms;

int main(int argc, char** argv) {
  CLI::App app{"moelora quantizer benchmark (bf16 weights): GB/s against the device copy bandwidth"};
  std::string out_path = "bench_quant.jsonl";
  std::vector<std::string> specs;
  int iters = 20;
  app.add_option("--out", out_path, "JSON lines output file");
  app.add_option("--specs", specs, "comma-separated quantizer names (default: all formats)")->delimiter(',');
  app.add_option("--iters", iters, "timed iterations per measurement (median)")->check(CLI::PositiveNumber);
  CLI11_PARSE(app, argc, argv);

  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::fprintf(stderr, "bench_quant: no CUDA device\n");
    return 1;
  }
  cudaDeviceProp prop{};
  MOELORA_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  cudaStream_t stream;
  MOELORA_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));

  std::vector<QuantSpec> chosen;
  if (specs.empty()) chosen.assign(kAllQuantSpecs.begin(), kAllQuantSpecs.end());
  else
    for (const std::string& name : specs) chosen.push_back(parse_quant_spec(name));

  std::ofstream json(out_path);
  std::printf("| shape | quantizer | copy GB/s | fake ms | fake GB/s | fake %% | quantize ms | quantize GB/s | quantize %% | dequantize ms | dequantize GB/s | dequantize %% |\n");
  std::printf("|---|---|---|---|---|---|---|---|---|---|---|---|\n");
  for (const bench::QuantShape& s : bench::kQuantShapes) {
    const std::int64_t numel = s.experts * s.out * s.in;
    const auto weight_bytes = static_cast<double>(numel) * 2.0;
    Buffer<CudaBackend> w(static_cast<std::size_t>(numel) * 2), out(static_cast<std::size_t>(numel) * 2);
    bench::fill_normalish_kernel<<<1024, 256, 0, stream>>>(w.as<__nv_bfloat16>(), numel, 7);
    MOELORA_CUDA_CHECK(cudaGetLastError());
    const double copy_ms = median_ms(stream, iters, [&] { CudaBackend::copy(out.data(), w.data(), w.bytes(), stream); });
    const double copy_gbps = 2.0 * weight_bytes / (copy_ms * 1e6);
    const ConstTensorRef wr{w.data(), DType::bf16, {s.experts, s.out, s.in}};
    const TensorRef outr{out.data(), DType::bf16, {s.experts, s.out, s.in}};
    for (const QuantSpec& spec : chosen) {
      FormatQuantizer<CudaBackend> q(spec);
      q.reserve(s.experts);
      const std::size_t packed_bytes = q.packed_bytes(s.experts, s.out, s.in);
      Buffer<CudaBackend> packed(packed_bytes);
      const bench::QuantBytes moved = bench::quant_bytes(spec, numel, packed_bytes);
      const double fake_ms = median_ms(stream, iters, [&] { q.fake_quantize(wr, outr, stream); });
      const double quant_ms = median_ms(stream, iters, [&] { q.quantize(wr, packed.data(), stream); });
      const double deq_ms =
          median_ms(stream, iters, [&] { q.dequantize(packed.data(), wr.shape, 0, s.experts, outr, stream); });
      const double fake_gbps = moved.fake / (fake_ms * 1e6);
      const double quant_gbps = moved.quantize / (quant_ms * 1e6);
      const double deq_gbps = moved.dequantize / (deq_ms * 1e6);
      const std::string name = quant_spec_name(spec);
      std::printf("| %s | %s | %.0f | %.3f | %.0f | %.0f%% | %.3f | %.0f | %.0f%% | %.3f | %.0f | %.0f%% |\n", s.name,
                  name.c_str(), copy_gbps, fake_ms, fake_gbps, 100.0 * fake_gbps / copy_gbps, quant_ms, quant_gbps,
                  100.0 * quant_gbps / copy_gbps, deq_ms, deq_gbps, 100.0 * deq_gbps / copy_gbps);
      std::fflush(stdout);
      json << "{\"device\": \"" << prop.name << "\", \"shape\": \"" << s.name << "\", \"E\": " << s.experts
           << ", \"out\": " << s.out << ", \"in\": " << s.in << ", \"quantizer\": \"" << name
           << "\", \"copy_GBps\": " << copy_gbps << ", \"packed_bytes\": " << packed_bytes << ", \"fake_ms\": " << fake_ms
           << ", \"fake_GBps\": " << fake_gbps << ", \"quantize_ms\": " << quant_ms << ", \"quantize_GBps\": " << quant_gbps
           << ", \"dequantize_ms\": " << deq_ms << ", \"dequantize_GBps\": " << deq_gbps << "}\n";
    }
  }
  cudaStreamDestroy(stream);
  return 0;
}

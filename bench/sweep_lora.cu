// The forward's tuning sweep (issue 12): the LoRA delta forward (device counts, the count scan
// included, added in place to y: bench_lora's "LoRA fwd") timed with several kernel tunings
// (kernels::ForwardTuning) on the benchmark rows of DESIGN.md §8, against the byte floor. Each
// variant's h and y are first checked against DefaultForwardTuning's on the same inputs: equal bit
// for bit, or within 2 ulps where the two split K differently (the fp32 sums then add in another
// order). Buffers rotate in sets of at least twice the L2 size. Prints one markdown table (rows ×
// variants: ms and % of floor) and a summary per variant.
// Run: build/bench/sweep_lora [--variants a,b] [--shapes a,b] [--ranks 16,64] [--counts uniform,zipf] [--iters N]
#include <CLI/CLI.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <optional>
#include <string>
#include <vector>

#include "device_data.cuh"
#include "moelora/cuda/backend.hpp"
#include "shapes.hpp"
#include "sweep.hpp"
#include "timing.cuh"

namespace {

using namespace moelora;
using namespace moelora::kernels;
using bf16 = __nv_bfloat16;

// ---- the variants --------------------------------------------------------------------------------

/// A ForwardTuning from its parts.
template <template <int> class Project, class Expand, bool FillWave, bool Overlap>
struct Tuned {
  template <int NFrag>
  using project = Project<NFrag>;
  template <int NFrag>
  using expand = Expand;
  static constexpr bool kFillWave = FillWave;
  static constexpr bool kOverlap = Overlap;
};

/// The projection tilings compared: before issue 12 (3 stages), the default (4 stages), deeper
/// rings of 64-row blocks, 128-column chunks, and whole-tile blocks at every rank.
template <int NFrag>
using OldProject = UProjectionTiling<NFrag>;
template <int NFrag>
using DefaultProject = DefaultForwardTuning::project<NFrag>;
template <int NFrag>
using DeepProject = ProjectTiling<kForwardRows / 2, NFrag >= 4 ? 4 : 6>;
template <int NFrag>
using WideProject = ProjectTiling<kForwardRows / 2, 3, 128>;
template <int NFrag>
using WholeProject = ProjectTiling<kForwardRows, NFrag >= 8 ? 3 : 4>;
/// The default with 16-row warps at every rank (8 warps a 128-row block: the tuning before).
template <int NFrag>
using Warp16Project = ProjectTiling<NFrag >= 4 ? kForwardRows : kForwardRows / 2, NFrag >= 8 ? 3 : 4>;
/// 32-row warps at every rank (2 warps a 64-row block below rank tile 64).
template <int NFrag>
using Warp32AllProject = ProjectTiling<NFrag >= 4 ? kForwardRows : kForwardRows / 2, NFrag >= 8 ? 3 : 4, kChunk, 32>;
/// 32-row warps, 3 stages from rank tile 64 on (more blocks an SM).
template <int NFrag>
using Warp32ShallowProject = ProjectTiling<NFrag >= 4 ? kForwardRows : kForwardRows / 2, NFrag >= 4 ? 3 : 4, kChunk,
                                           NFrag >= 4 ? 32 : 16>;

/// One variant: its name and the forward at rank tiles 16 and 64 (NFrag 1 and 4; bf16 everywhere).
struct Variant {
  const char* name;
  const char* what;
  void (*forward16)(const LoraForwardArgs&, CudaBackend::Workspace&, cudaStream_t);
  void (*forward64)(const LoraForwardArgs&, CudaBackend::Workspace&, cudaStream_t);
};

template <ForwardTuning T>
constexpr Variant variant(const char* name, const char* what) {
  return {name, what, &CudaBackend::lora_forward_tensor_core<bf16, bf16, 1, T>,
          &CudaBackend::lora_forward_tensor_core<bf16, bf16, 4, T>};
}

const Variant kVariants[] = {
    variant<DefaultForwardTuning>("default", "the library's DefaultForwardTuning"),
    variant<Tuned<OldProject, ExpandTiling<3, false>, false, false>>(
        "old", "before issue 12: projection 3 stages, expand 3 blocks/SM tiles first, no K fill, no overlap"),
    variant<Tuned<OldProject, ExpandTiling<3, false>, false, true>>("old+overlap", "old, expand overlaps the projection"),
    variant<Tuned<OldProject, ExpandTiling<3, false>, true, false>>("old+fill", "old, K split to fill a wave"),
    variant<Tuned<DefaultProject, ExpandTiling<3, false>, false, false>>("old+stages4", "old, projection 4 stages"),
    variant<Tuned<OldProject, ExpandTiling<4, false>, false, false>>("old+expand4", "old, expand 4 blocks/SM (r<=32)"),
    variant<Tuned<OldProject, ExpandTiling<3, true>, false, false>>("old+columns", "old, expand columns first"),
    variant<Tuned<DefaultProject, ExpandTiling<4, false>, true, true>>("def-tiles", "default, expand tiles first"),
    variant<Tuned<DefaultProject, ExpandTiling<3, true>, true, true>>("def-expand3", "default, expand 3 blocks/SM"),
    variant<Tuned<DefaultProject, ExpandTiling<4, true>, false, true>>("def-nofill", "default, no K fill"),
    variant<Tuned<DefaultProject, ExpandTiling<4, true>, true, false>>("def-nooverlap", "default, no overlap"),
    variant<Tuned<DeepProject, ExpandTiling<4, true>, true, true>>(
        "def-deep", "default, projection 64 rows x 6 stages (r16) / 64 rows x 4 stages (r64)"),
    variant<Tuned<WideProject, ExpandTiling<4, true>, true, true>>(
        "def-wide", "default, projection 64 rows x 3 stages of 128-column chunks"),
    variant<Tuned<WholeProject, ExpandTiling<4, true>, true, true>>(
        "def-whole", "default, projection 128-row blocks at every rank"),
    variant<Tuned<Warp16Project, ExpandTiling<4, true>, true, true>>(
        "def-warp16", "default, projection 16-row warps at r64 (8 warps a block)"),
    variant<Tuned<Warp32AllProject, ExpandTiling<4, true>, true, true>>(
        "def-warp32all", "default, projection 32-row warps at every rank"),
    variant<Tuned<Warp32ShallowProject, ExpandTiling<4, true>, true, true>>(
        "def-warp32s3", "default, projection 32-row warps and 3 stages at r64"),
};

// ---- checking --------------------------------------------------------------------------------

/// Distance in ulps between bf16 a[i] and b[i]: counts the differing elements and the largest
/// distance (bit patterns mapped to ordered integers, ±0 equal).
__global__ void ulp_distance_kernel(const std::uint16_t* a, const std::uint16_t* b, std::int64_t n,
                                    unsigned long long* differing, unsigned* largest) {
  const auto ordered = [](std::uint16_t v) {
    return (v & 0x8000u) ? -static_cast<int>(v & 0x7fffu) : static_cast<int>(v & 0x7fffu);
  };
  unsigned long long count = 0;
  unsigned most = 0;
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const int d = abs(ordered(a[i]) - ordered(b[i]));
    count += d != 0;
    most = max(most, static_cast<unsigned>(d));
  }
  if (count) atomicAdd(differing, count);
  if (most) atomicMax(largest, most);
}

struct Distance {
  unsigned long long differing = 0;
  unsigned largest = 0;
};

Distance ulp_distance(const void* a, const void* b, std::int64_t n, Buffer<CudaBackend>& scratch, cudaStream_t stream) {
  CudaBackend::fill_zero(scratch.data(), scratch.bytes(), stream);
  auto* differing = scratch.as<unsigned long long>();
  auto* largest = reinterpret_cast<unsigned*>(differing + 1);
  ulp_distance_kernel<<<1024, 256, 0, stream>>>(static_cast<const std::uint16_t*>(a), static_cast<const std::uint16_t*>(b),
                                                n, differing, largest);
  MOELORA_CUDA_CHECK(cudaGetLastError());
  Distance d;
  CudaBackend::copy_to_host(&d.differing, differing, sizeof d.differing, stream);
  CudaBackend::copy_to_host(&d.largest, largest, sizeof d.largest, stream);
  return d;
}

// ---- one benchmark row -----------------------------------------------------------------------

struct Cell {
  double ms = 0.0;
  bool ok = true;
  Distance h, y;
};

/// Times every chosen variant on one (shape, rank, counts) row.
std::vector<Cell> measure(const bench::Shape& s, std::int64_t rank, const std::string& kind,
                          const std::vector<const Variant*>& variants, int iters, std::size_t l2_bytes,
                          cudaStream_t stream) {
  const std::vector<std::int64_t> counts = bench::routed_counts(s, kind);
  Buffer<CudaBackend> device_counts(counts.size() * sizeof(std::int64_t));
  CudaBackend::copy_from_host(device_counts.data(), counts.data(), device_counts.bytes(), stream);
  const ExpertCounts dev_counts = expert_counts(device_counts.as<const std::int64_t>(), s.experts, Memory::device);

  const auto bytes = [](std::int64_t n) { return static_cast<std::size_t>(n) * sizeof(bf16); };
  const std::int64_t nx = s.rows * s.in, ny = s.rows * s.out, nh = s.rows * rank;
  const int sets = bench::rotation_sets(bytes(nx) + bytes(ny) + bytes(nh), l2_bytes);
  struct Set {
    Buffer<CudaBackend> x, y, h;
  };
  std::vector<Set> data;
  for (int i = 0; i < sets; ++i) {
    data.push_back({Buffer<CudaBackend>(bytes(nx)), Buffer<CudaBackend>(bytes(ny)), Buffer<CudaBackend>(bytes(nh))});
    bench::fill(data.back().x.data(), nx, 11 + 2 * static_cast<std::uint64_t>(i), 1.0f, stream);
    bench::fill(data.back().y.data(), ny, 12 + 2 * static_cast<std::uint64_t>(i), 1.0f, stream);
  }
  Buffer<CudaBackend> a(bytes(s.experts * rank * s.in)), b(bytes(s.experts * s.out * rank));
  bench::fill(a.data(), s.experts * rank * s.in, 21, std::sqrt(6.0f / static_cast<float>(s.in)), stream);
  bench::fill(b.data(), s.experts * s.out * rank, 22, 0.02f, stream);
  Buffer<CudaBackend> y0(bytes(ny)), y_ref(bytes(ny)), h_ref(bytes(nh)), scratch(16);
  CudaBackend::copy(y0.data(), data[0].y.data(), y0.bytes(), stream);

  CudaBackend::Workspace workspace;
  workspace.reserve(s.rows, s.experts, rank);
  const auto args = [&](const Set& set) {
    return LoraForwardArgs{{s.experts, s.in, s.out, s.rows, DType::bf16},
                           {a.data(), b.data(), DType::bf16, rank, 1.0f},
                           set.x.data(),
                           set.y.data(),
                           set.h.data(),
                           WriteMode::accumulate};
  };
  const auto run = [&](const Variant& v, const Set& set) {
    workspace.prepare_segments(dev_counts, s.rows, stream);
    (rank <= 16 ? v.forward16 : v.forward64)(args(set), workspace, stream);
  };

  // The reference: DefaultForwardTuning once on set 0, from y0.
  run(kVariants[0], data[0]);
  CudaBackend::copy(y_ref.data(), data[0].y.data(), y_ref.bytes(), stream);
  CudaBackend::copy(h_ref.data(), data[0].h.data(), h_ref.bytes(), stream);

  std::vector<Cell> cells;
  for (const Variant* v : variants) {
    Cell cell;
    CudaBackend::copy(data[0].y.data(), y0.data(), y0.bytes(), stream);
    run(*v, data[0]);
    cell.h = ulp_distance(data[0].h.data(), h_ref.data(), nh, scratch, stream);
    cell.y = ulp_distance(data[0].y.data(), y_ref.data(), ny, scratch, stream);
    cell.ok = cell.h.largest <= 2 && cell.y.largest <= 2;
    int next = 0;
    cell.ms = bench::median_ms(stream, iters, [&] { run(*v, data[static_cast<std::size_t>(next++ % sets)]); });
    cells.push_back(cell);
  }
  workspace.check_counts(stream);
  return cells;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"moelora forward tuning sweep (bf16): the LoRA delta forward per kernel tuning vs the byte floor"};
  std::vector<std::string> wanted_shapes, count_kinds{"uniform", "zipf"};
  std::vector<std::int64_t> ranks{16, 64};
  app.add_option("--shapes", wanted_shapes, "comma-separated shape names (default: all)")->delimiter(',');
  app.add_option("--ranks", ranks, "comma-separated ranks: 8, 16 (rank tile 16), 56 or 64 (rank tile 64)")->delimiter(',');
  app.add_option("--counts", count_kinds, "comma-separated count kinds: uniform, zipf")->delimiter(',');
  bench::SweepOptions options;
  options.add_to(app);
  CLI11_PARSE(app, argc, argv);
  const std::vector<const Variant*> variants = options.chosen(kVariants);
  if (variants.empty()) return options.list ? 0 : 1;
  for (const std::int64_t r : ranks)
    if (r != 8 && r != 16 && r != 56 && r != 64) {
      std::fprintf(stderr, "sweep_lora: rank %lld is not 8, 16, 56 or 64\n", static_cast<long long>(r));
      return 1;
    }
  const std::optional<bench::SweepDevice> device = bench::open_device("sweep_lora");
  if (!device) return 1;
  const cudaStream_t stream = device->stream;
  const double copy_gbps = bench::copy_bandwidth(stream);
  std::printf("copy bandwidth %.0f GB/s\n\n", copy_gbps);
  bench::print_variants(variants);
  std::printf("\nLoRA delta forward, ms (%% of the byte floor); FAIL(h ulps, y ulps): output off DefaultForwardTuning's\n\n");
  bench::print_table_header({{"shape", "---"}, {"r", "---:"}, {"counts", "---"}, {"floor ms", "---:"}}, variants);

  bench::SweepSummary summary(variants.size());
  for (const auto& s : bench::kShapes) {
    if (!wanted_shapes.empty() && std::find(wanted_shapes.begin(), wanted_shapes.end(), s.name) == wanted_shapes.end())
      continue;
    for (const std::int64_t rank : ranks)
      for (const std::string& kind : count_kinds) {
        const double floor_ms = bench::forward_floor_bytes(s, rank) / (copy_gbps * 1e6);
        const std::vector<Cell> cells =
            measure(s, rank, kind, variants, options.iters, static_cast<std::size_t>(device->prop.l2CacheSize), stream);
        std::printf("| %s | %lld | %s | %.3f |", s.name.c_str(), static_cast<long long>(rank), kind.c_str(), floor_ms);
        for (std::size_t i = 0; i < cells.size(); ++i) {
          const double pct = 100.0 * floor_ms / cells[i].ms;
          summary.add(i, pct, cells[i].ok);
          if (cells[i].ok) std::printf(" %.3f (%.0f%%) |", cells[i].ms, pct);
          else std::printf(" %.3f FAIL(%u, %u) |", cells[i].ms, cells[i].h.largest, cells[i].y.largest);
        }
        std::printf("\n");
        std::fflush(stdout);
      }
  }
  summary.print(variants, 70.0, "old");
  cudaStreamDestroy(stream);
  return 0;
}

/// \file
/// \brief Definitions of Sm90GroupedGemm (declared in `sm90_grouped_gemm.hpp`): the CUTLASS 3 kernel
/// configurations, the argument kernel and the host wrapper. Compile this header in exactly one
/// translation unit of a program (nvcc, `-gencode=arch=compute_90a,code=sm_90a
/// --expt-relaxed-constexpr`); it instantiates 8 kernels (bf16, fp16 × forward, backward_input ×
/// cooperative, pingpong), about 2 minutes and 6 GB of compiler memory.
///
/// `KernelConfig` is the one place that says how a kernel is built: the operand layouts, the tile and
/// schedule (`TileConfig`), the epilogue's fusion (`Fusion`: D = α·acc + β·C) and the mainloop
/// (CUTLASS's, with the K loop extended by a low-rank operand pair: `k_extended_mainloop.cuh`).
#pragma once

#if !defined(__CUDACC__)
#error "moelora/cuda/cutlass/sm90_grouped_gemm.cuh holds device code: compile it with nvcc"
#endif

#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <utility>

#include "moelora/core/buffer.hpp"
#include "moelora/core/error.hpp"
#include "moelora/cuda/check.hpp"
#include "moelora/cuda/cutlass/sm90_grouped_gemm.hpp"

// CUTLASS is included with NDEBUG defined (its live asserts make ptxas serialise the wgmma
// instructions, warning C7510) and with the warnings of its headers silenced.
#if !defined(NDEBUG)
#define NDEBUG
#define MOELORA_SM90_RESTORE_ASSERTS
#endif
#include <cassert>
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-parameter"
#pragma GCC diagnostic ignored "-Wunused-variable"
#pragma GCC diagnostic ignored "-Wunused-but-set-variable"
#pragma GCC diagnostic ignored "-Wunused-local-typedefs"
#pragma GCC diagnostic ignored "-Wmissing-field-initializers"
#pragma GCC diagnostic ignored "-Wpedantic"
#pragma GCC diagnostic ignored "-Wsign-compare"
#pragma GCC diagnostic ignored "-Wclass-memaccess"
#pragma nv_diag_suppress 2908
#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/epilogue/fusion/operations.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/dispatch_policy.hpp>
#include <cutlass/gemm/group_array_problem_shape.hpp>
#include <cutlass/gemm/kernel/gemm_universal.hpp>
#pragma nv_diag_default 2908
#pragma GCC diagnostic pop
#include "moelora/cuda/cutlass/k_extended_mainloop.cuh"
#if defined(MOELORA_SM90_RESTORE_ASSERTS)
#undef NDEBUG
#undef MOELORA_SM90_RESTORE_ASSERTS
#include <cassert>
#endif

namespace moelora::sm90 {

namespace detail {

/// Device memory for the wrapper (cudaMalloc; freed with cudaFree).
struct DeviceMemory {
  static void* allocate(std::size_t bytes) {
    void* p = nullptr;
    MOELORA_CUDA_CHECK(cudaMalloc(&p, bytes));
    return p;
  }
  static void deallocate(void* p) noexcept { cudaFree(p); }
};

template <DType D>
struct CutlassElement;
template <>
struct CutlassElement<DType::bf16> {
  using type = cutlass::bfloat16_t;
};
template <>
struct CutlassElement<DType::fp16> {
  using type = cutlass::half_t;
};

/// Tile M×N×K, cluster 2×1×1 and the kernel and epilogue schedules of a configuration.
template <int M, int N, int K, class Kernel, class Epilogue>
struct TileSpec {
  using TileShape = cute::Shape<cute::Int<M>, cute::Int<N>, cute::Int<K>>;
  using ClusterShape = cute::Shape<cute::_2, cute::_1, cute::_1>;
  using KernelSchedule = Kernel;
  using EpilogueSchedule = Epilogue;
};

/// The configuration of a GemmTile.
template <GemmTile Tile>
using TileConfig = std::conditional_t<
    Tile == GemmTile::cooperative,
    TileSpec<128, 256, 64, cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative,
             cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative>,
    TileSpec<64, 128, 128, cutlass::gemm::KernelPtrArrayTmaWarpSpecializedPingpong,
             cutlass::epilogue::PtrArrayTmaWarpSpecializedPingpong>>;

/// One kernel: A = the rows `[m_e, K]` row-major; B = W_e, K-major for forward (`[N, K]` = `[out,
/// in]`), N-major for backward_input (`[K, N]` = `[out, in]`); C = D = the output rows `[m_e, N]`
/// row-major; the low-rank pair A2 = the addend's rows `[m_e, rank]` row-major, B2 = its factor in
/// B's layout (forward B_e `[out, rank]`, backward_input A_e `[rank, in]`). Alignment 8 elements
/// (16 bytes) everywhere.
template <DType D, GemmDirection Direction, GemmTile Tile>
struct KernelConfig {
  using Element = typename CutlassElement<D>::type;
  using Accumulator = float;
  using LayoutA = cutlass::layout::RowMajor;
  using LayoutB = std::conditional_t<Direction == GemmDirection::forward, cutlass::layout::ColumnMajor,
                                     cutlass::layout::RowMajor>;
  using LayoutD = cutlass::layout::RowMajor;
  static constexpr int kAlignment = 8;
  using Tiles = TileConfig<Tile>;
  using ProblemShape = cutlass::gemm::GroupProblemShape<cute::Shape<int, int, int>>;
  /// D = α·acc + β·C, computed in fp32 and rounded once to the element type.
  using Fusion = cutlass::epilogue::fusion::LinearCombination<Element, Accumulator, Element, Accumulator>;

  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, typename Tiles::TileShape, typename Tiles::ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, Accumulator, Accumulator, Element, LayoutD*, kAlignment,
      Element, LayoutD*, kAlignment, typename Tiles::EpilogueSchedule, Fusion>::CollectiveOp;
  using Mainloop = KExtendedMainloop<typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, LayoutA*, kAlignment, Element, LayoutB*,
      kAlignment, Accumulator, typename Tiles::TileShape, typename Tiles::ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage)) +
                                                        kKExtensionSmemBytes>,
      typename Tiles::KernelSchedule>::CollectiveOp>;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
};

/// A stride with its one dynamic mode (the leading dimension) set to `ld`.
template <class Stride>
__host__ __device__ Stride leading_stride(std::int64_t ld) {
  Stride s{};
  if constexpr (cute::is_static_v<cute::remove_cvref_t<decltype(cute::get<0>(s))>>) cute::get<1>(s) = ld;
  else cute::get<0>(s) = ld;
  return s;
}

/// The per-group arguments of a kernel, in device memory, `groups` entries each.
template <class Kernel>
struct GroupArrays {
  using Shape = typename Kernel::ProblemShape::UnderlyingProblemShape;
  using ElementA = typename Kernel::ElementA;
  using ElementB = typename Kernel::ElementB;
  using ElementD = typename Kernel::ElementD;
  using StrideA = typename Kernel::InternalStrideA;
  using StrideB = typename Kernel::InternalStrideB;
  using StrideD = typename Kernel::InternalStrideD;
  static_assert(std::is_same_v<typename Kernel::InternalStrideC, StrideD>, "C and D share their strides");

  Shape* shapes;
  const ElementA** a;
  const ElementB** b;
  ElementD** d;
  const ElementA** a2;  // the addend's rows
  const ElementB** b2;  // the addend's factor
  StrideA* stride_a;
  StrideB* stride_b;
  StrideD* stride_d;
  StrideA* stride_a2;
  StrideB* stride_b2;
  int* k_second;  // [1]: the call's rank (KExtendedMainloop's K2)

  /// Bytes of the arrays for `groups` groups (each 16-byte aligned).
  static std::size_t bytes(std::int64_t groups) {
    const auto round = [](std::size_t b) { return (b + 15) / 16 * 16; };
    const auto g = static_cast<std::size_t>(groups);
    return round(g * sizeof(Shape)) + 5 * round(g * sizeof(void*)) + 2 * round(g * sizeof(StrideA)) +
           2 * round(g * sizeof(StrideB)) + round(g * sizeof(StrideD)) + round(sizeof(int));
  }
  /// The arrays carved from `base` (bytes(groups) bytes).
  static GroupArrays carve(void* base, std::int64_t groups) {
    auto* at = static_cast<std::byte*>(base);
    const auto take = [&](std::size_t size) {
      std::byte* p = at;
      at += (static_cast<std::size_t>(groups) * size + 15) / 16 * 16;
      return static_cast<void*>(p);
    };
    GroupArrays arrays{};
    arrays.shapes = static_cast<Shape*>(take(sizeof(Shape)));
    arrays.a = static_cast<const ElementA**>(take(sizeof(void*)));
    arrays.b = static_cast<const ElementB**>(take(sizeof(void*)));
    arrays.d = static_cast<ElementD**>(take(sizeof(void*)));
    arrays.a2 = static_cast<const ElementA**>(take(sizeof(void*)));
    arrays.b2 = static_cast<const ElementB**>(take(sizeof(void*)));
    arrays.stride_a = static_cast<StrideA*>(take(sizeof(StrideA)));
    arrays.stride_b = static_cast<StrideB*>(take(sizeof(StrideB)));
    arrays.stride_d = static_cast<StrideD*>(take(sizeof(StrideD)));
    arrays.stride_a2 = static_cast<StrideA*>(take(sizeof(StrideA)));
    arrays.stride_b2 = static_cast<StrideB*>(take(sizeof(StrideB)));
    arrays.k_second = static_cast<int*>(static_cast<void*>(at));
    return arrays;
  }
};

inline constexpr int kArgumentThreads = 256;

/// Group g of the call is expert `first_expert + g` when g < experts (else empty): problem
/// `{m_e, n, ceil(k / TileK) · TileK + rank}` (KExtendedMainloop's extended K) with m_e its row
/// count, A its first input row, B its weights, D its first output row, A2 its first row of the
/// addend, B2 the addend's factor of expert e (without an addend: A's and B's, never read). Invalid
/// counts leave all offsets zero (the scan's empty schedule), so every group is empty.
template <class Kernel>
__global__ void __launch_bounds__(kArgumentThreads)
    build_groups_kernel(GroupArrays<Kernel> arrays, GroupedGemmCall call, std::int32_t groups, std::int32_t n,
                        std::int32_t k) {
  using Arrays = GroupArrays<Kernel>;
  using Mainloop = typename Kernel::CollectiveMainloop;
  const auto* in = static_cast<const typename Arrays::ElementA*>(call.in);
  const auto* weights = static_cast<const typename Arrays::ElementB*>(call.weights);
  auto* out = static_cast<typename Arrays::ElementD*>(call.out);
  const auto rank = static_cast<std::int32_t>(call.addend.rank);
  const auto* addend_rows = rank ? static_cast<const typename Arrays::ElementA*>(call.addend.rows) : in;
  const auto* addend_factors = rank ? static_cast<const typename Arrays::ElementB*>(call.addend.factors) : weights;
  const bool forward = call.direction == GemmDirection::forward;
  const int k_extended = Mainloop::k_tiles(k) * cute::size<2>(typename Mainloop::TileShape{}) + rank;
  if (blockIdx.x == 0 && threadIdx.x == 0) *arrays.k_second = rank;
  for (std::int32_t g = static_cast<std::int32_t>(blockIdx.x * blockDim.x + threadIdx.x); g < groups;
       g += static_cast<std::int32_t>(gridDim.x * blockDim.x)) {
    const std::int64_t e = call.first_expert + g;
    const bool used = g < call.experts;
    const std::int64_t row0 = used ? call.offsets[e] : 0;
    const std::int64_t rows = used ? call.offsets[e + 1] - row0 : 0;
    arrays.shapes[g] = typename Arrays::Shape(static_cast<int>(rows), n, k_extended);
    arrays.a[g] = in + row0 * k;
    arrays.b[g] = weights + static_cast<std::int64_t>(g) * n * k;
    arrays.d[g] = out + row0 * n;
    arrays.a2[g] = rank ? addend_rows + row0 * rank : arrays.a[g];
    arrays.b2[g] = rank ? addend_factors + e * n * rank : arrays.b[g];
    arrays.stride_a[g] = leading_stride<typename Arrays::StrideA>(k);
    arrays.stride_b[g] = leading_stride<typename Arrays::StrideB>(forward ? k : n);
    arrays.stride_d[g] = leading_stride<typename Arrays::StrideD>(n);
    arrays.stride_a2[g] = leading_stride<typename Arrays::StrideA>(rank ? rank : k);
    arrays.stride_b2[g] = leading_stride<typename Arrays::StrideB>(forward ? (rank ? rank : k) : n);
  }
}

/// What the wrapper needs of one kernel.
class KernelRunner {
 public:
  virtual ~KernelRunner() = default;
  /// The workspace bytes the kernel needs.
  [[nodiscard]] virtual std::size_t workspace_bytes() const = 0;
  /// Initialises the kernel's parameters against `workspace` (no stream work).
  virtual void initialize(void* workspace) = 0;
  /// Queues the argument kernel and the GEMM.
  virtual void run(const GroupedGemmCall& call, cudaStream_t stream) = 0;
};

/// One kernel configuration: its group arrays and its parameters for β = 0 and β = 1, initialised
/// once against `workspace` (shared by every kernel of one Sm90GroupedGemm: they run in stream order).
template <class Config>
class TileKernel final : public KernelRunner {
  using Gemm = typename Config::Gemm;
  using Kernel = typename Config::Kernel;
  using Arrays = GroupArrays<Kernel>;

 public:
  TileKernel(const GroupedGemmShape& shape, GemmDirection direction, int device, int sms)
      : groups_(static_cast<std::int32_t>(shape.groups)),
        n_(static_cast<std::int32_t>(direction == GemmDirection::forward ? shape.out_features : shape.in_features)),
        k_(static_cast<std::int32_t>(direction == GemmDirection::forward ? shape.in_features : shape.out_features)),
        storage_(Arrays::bytes(shape.groups)),
        arrays_(Arrays::carve(storage_.data(), shape.groups)),
        device_(device),
        sms_(sms) {}

  [[nodiscard]] std::size_t workspace_bytes() const override { return Gemm::get_workspace_size(arguments(0.0f)); }

  /// Initialises the β = 0 and β = 1 parameters.
  void initialize(void* workspace) override {
    for (int accumulate = 0; accumulate < 2; ++accumulate) {
      Gemm gemm;
      const auto args = arguments(static_cast<float>(accumulate));
      check(gemm.initialize(args, workspace, nullptr), "initialize");
      params_[accumulate] = gemm.params();
    }
  }

  void run(const GroupedGemmCall& call, cudaStream_t stream) override {
    const int blocks = std::min<int>((groups_ + kArgumentThreads - 1) / kArgumentThreads, 64);
    build_groups_kernel<Kernel><<<blocks, kArgumentThreads, 0, stream>>>(arrays_, call, groups_, n_, k_);
    MOELORA_CUDA_CHECK(cudaGetLastError());
    check(Gemm::run(params_[call.mode == WriteMode::accumulate ? 1 : 0], stream), "run");
  }

 private:
  static void check(cutlass::Status status, const char* what) {
    MOELORA_REQUIRE(status == cutlass::Status::kSuccess, ErrorCode::cuda, "the sm90 grouped GEMM's ", what,
                    " failed: ", cutlassGetStatusString(status));
  }

  typename Gemm::Arguments arguments(float beta) const {
    typename Gemm::Arguments args{};
    args.mode = cutlass::gemm::GemmUniversalMode::kGrouped;
    args.problem_shape = {groups_, arrays_.shapes, nullptr};  // sizes on the device only
    args.mainloop = {{arrays_.a, arrays_.stride_a, arrays_.b, arrays_.stride_b},
                     arrays_.a2,
                     arrays_.stride_a2,
                     arrays_.b2,
                     arrays_.stride_b2,
                     k_,
                     arrays_.k_second};
    args.epilogue.ptr_C = const_cast<const typename Arrays::ElementD**>(arrays_.d);  // C = D (read only for β = 1)
    args.epilogue.dC = arrays_.stride_d;
    args.epilogue.ptr_D = arrays_.d;
    args.epilogue.dD = arrays_.stride_d;
    args.epilogue.thread.alpha = 1.0f;
    args.epilogue.thread.beta = beta;
    args.hw_info.device_id = device_;
    args.hw_info.sm_count = sms_;
    return args;
  }

  std::int32_t groups_, n_, k_;
  Buffer<DeviceMemory> storage_;
  Arrays arrays_;
  int device_, sms_;
  std::array<typename Gemm::Params, 2> params_{};
};

/// Calls `f(dtype constant, direction constant, tile constant)` for a runtime combination.
template <class F>
void dispatch_kernel(DType dtype, GemmDirection direction, GemmTile tile, F&& f) {
  const auto with_tile = [&](auto d, auto dir) {
    if (tile == GemmTile::cooperative) f(d, dir, std::integral_constant<GemmTile, GemmTile::cooperative>{});
    else f(d, dir, std::integral_constant<GemmTile, GemmTile::pingpong>{});
  };
  const auto with_direction = [&](auto d) {
    if (direction == GemmDirection::forward)
      with_tile(d, std::integral_constant<GemmDirection, GemmDirection::forward>{});
    else with_tile(d, std::integral_constant<GemmDirection, GemmDirection::backward_input>{});
  };
  if (dtype == DType::bf16) with_direction(std::integral_constant<DType, DType::bf16>{});
  else with_direction(std::integral_constant<DType, DType::fp16>{});
}

}  // namespace detail

struct Sm90GroupedGemm::Impl {
  GroupedGemmShape shape;
  // [direction][tile]
  std::array<std::array<std::unique_ptr<detail::KernelRunner>, 2>, 2> kernels;
  Buffer<detail::DeviceMemory> workspace;
};

Sm90GroupedGemm::Sm90GroupedGemm(const GroupedGemmShape& shape) : impl_(std::make_unique<Impl>()) {
  MOELORA_REQUIRE(supports(shape), ErrorCode::unsupported, "the sm90 grouped GEMM needs bf16 or fp16 weights with in ",
                  "and out multiples of 8 and at least one group; got ", dtype_name(shape.dtype), " in=",
                  shape.in_features, " out=", shape.out_features, " groups=", shape.groups);
  MOELORA_REQUIRE(shape.groups <= (std::int64_t{1} << 30) && shape.in_features < (std::int64_t{1} << 31) &&
                      shape.out_features < (std::int64_t{1} << 31),
                  ErrorCode::unsupported, "the sm90 grouped GEMM takes sizes below 2^31");
  impl_->shape = shape;
  int device = 0, sms = 0;
  MOELORA_CUDA_CHECK(cudaGetDevice(&device));
  MOELORA_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  std::size_t workspace = 0;
  for (const GemmDirection direction : {GemmDirection::forward, GemmDirection::backward_input})
    for (const GemmTile tile : {GemmTile::cooperative, GemmTile::pingpong})
      detail::dispatch_kernel(shape.dtype, direction, tile, [&](auto d, auto dir, auto t) {
        using Config = detail::KernelConfig<decltype(d)::value, decltype(dir)::value, decltype(t)::value>;
        auto& kernel = impl_->kernels[static_cast<int>(direction)][static_cast<int>(tile)];
        kernel = std::make_unique<detail::TileKernel<Config>>(shape, direction, device, sms);
        workspace = std::max(workspace, kernel->workspace_bytes());
      });
  impl_->workspace = Buffer<detail::DeviceMemory>(workspace);
  for (auto& per_direction : impl_->kernels)
    for (auto& kernel : per_direction) kernel->initialize(impl_->workspace.data());
}

Sm90GroupedGemm::~Sm90GroupedGemm() = default;
Sm90GroupedGemm::Sm90GroupedGemm(Sm90GroupedGemm&&) noexcept = default;
Sm90GroupedGemm& Sm90GroupedGemm::operator=(Sm90GroupedGemm&&) noexcept = default;

const GroupedGemmShape& Sm90GroupedGemm::shape() const { return impl_->shape; }

void Sm90GroupedGemm::run(const GroupedGemmCall& call, GemmTile tile, cudaStream_t stream) {
  MOELORA_REQUIRE(call.experts >= 0 && call.experts <= impl_->shape.groups, ErrorCode::invalid_argument,
                  "an sm90 grouped GEMM of ", impl_->shape.groups, " groups got a call of ", call.experts, " experts");
  MOELORA_REQUIRE(aligned_call(call), ErrorCode::invalid_argument,
                  "the sm90 grouped GEMM needs 16-byte aligned weights, input and output");
  impl_->kernels[static_cast<int>(call.direction)][static_cast<int>(tile)]->run(call, stream);
}

}  // namespace moelora::sm90

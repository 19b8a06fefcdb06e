// Checkpoint load rate (host only): writes an adapter state dict of bf16 factors (32 layers × 64
// experts, rank 32, 4096 → 4096: 1 GiB) with write_safetensors, drops it from the page cache, and
// times loading it into host buffers the way io::load_adapters does (open and validate through
// SafetensorsFile, then one copy per factor) against `dd if=FILE of=/dev/null bs=16M` on the same
// cold file. Target: ours ≥ 50% of dd's rate. Run: bench_io [--file PATH] [--layers N] [--repeats N]
#include <CLI/CLI.hpp>
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "moelora/io/state_dict.hpp"

namespace {

using namespace moelora;
using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) { return std::chrono::duration<double>(Clock::now() - start).count(); }

/// Syncs `path` and asks the kernel to drop its pages; returns the fraction still resident after.
double drop_from_page_cache(const std::filesystem::path& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  MOELORA_REQUIRE(fd >= 0, ErrorCode::io, "cannot open ", path.string());
  ::fsync(fd);
  ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
  const auto size = static_cast<std::size_t>(std::filesystem::file_size(path));
  void* map = ::mmap(nullptr, size, PROT_READ, MAP_SHARED, fd, 0);
  ::close(fd);
  MOELORA_REQUIRE(map != MAP_FAILED, ErrorCode::io, "cannot map ", path.string());
  const std::size_t page = static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
  std::vector<unsigned char> resident((size + page - 1) / page);
  const bool ok = ::mincore(map, size, resident.data()) == 0;
  ::munmap(map, size);
  MOELORA_REQUIRE(ok, ErrorCode::io, "mincore failed on ", path.string());
  return static_cast<double>(std::count_if(resident.begin(), resident.end(), [](unsigned char r) { return r & 1; })) /
         static_cast<double>(resident.size());
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"moelora checkpoint load rate against dd"};
  std::string file = "bench_io.safetensors";
  int layers = 32, repeats = 3;
  app.add_option("--file", file, "checkpoint to write, time and remove (put it on the disk to measure)");
  app.add_option("--layers", layers, "MoE layers in the checkpoint (32 MiB of bf16 factors each)")->check(CLI::PositiveNumber);
  app.add_option("--repeats", repeats, "timed loads of each kind, alternating")->check(CLI::PositiveNumber);
  CLI11_PARSE(app, argc, argv);

  constexpr std::int64_t kExperts = 64, kRank = 32, kIn = 4096, kOut = 4096;
  const std::filesystem::path path = file;
  std::vector<std::vector<std::byte>> factors;
  std::vector<io::TensorBytes> tensors;
  for (int l = 0; l < layers; ++l) {
    const std::string prefix = "model.layers." + std::to_string(l) + ".mlp.experts.";
    for (const auto& [which, shape] : {std::pair{'a', std::vector<std::int64_t>{kExperts, kRank, kIn}},
                                       std::pair{'b', std::vector<std::int64_t>{kExperts, kOut, kRank}}}) {
      factors.emplace_back(static_cast<std::size_t>(*io::st_byte_size(shape, io::StDType::BF16)));
      for (std::size_t i = 0; i < factors.back().size(); ++i) factors.back()[i] = static_cast<std::byte>(i * 131 + l);
      tensors.push_back({io::factor_key(prefix, which, "default"), io::StDType::BF16, shape, factors.back()});
    }
  }
  auto start = Clock::now();
  io::write_safetensors(path, tensors, {{"format", "pt"}});
  const double write_s = seconds_since(start);
  const double gib = static_cast<double>(std::filesystem::file_size(path)) / double(1 << 30);
  std::printf("file %s: %.3f GiB, %zu tensors; written (and fsynced) at %.2f GiB/s\n", path.c_str(), gib,
              tensors.size(), gib / write_s);

  // the layer's buffers exist before a load: allocate and touch them outside the timing
  std::vector<std::vector<std::byte>> destination;
  for (const auto& f : factors) destination.emplace_back(f.size(), std::byte{1});
  factors.clear();
  tensors.clear();

  std::vector<double> ours, dd;
  for (int r = 0; r < repeats; ++r) {
    double resident = drop_from_page_cache(path);
    start = Clock::now();
    {
      const io::SafetensorsFile st(path);
      for (std::size_t i = 0; i < st.tensors().size(); ++i)
        std::memcpy(destination[i].data(), st.tensors()[i].bytes.data(), st.tensors()[i].bytes.size());
    }
    ours.push_back(gib / seconds_since(start));
    std::printf("run %d: ours %.2f GiB/s (resident before: %.1f%%)", r, ours.back(), 100.0 * resident);

    resident = drop_from_page_cache(path);
    const std::string command = "dd if='" + path.string() + "' of=/dev/null bs=16M status=none";
    start = Clock::now();
    MOELORA_REQUIRE(std::system(command.c_str()) == 0, ErrorCode::io, "failed: ", command);
    dd.push_back(gib / seconds_since(start));
    std::printf(", dd %.2f GiB/s (resident before: %.1f%%)\n", dd.back(), 100.0 * resident);
  }
  std::filesystem::remove(path);
  std::sort(ours.begin(), ours.end());
  std::sort(dd.begin(), dd.end());
  const double ours_median = ours[ours.size() / 2], dd_median = dd[dd.size() / 2];
  std::printf("median over %d cold loads: ours %.2f GiB/s, dd %.2f GiB/s, ours/dd = %.0f%% (target >= 50%%)\n", repeats,
              ours_median, dd_median, 100.0 * ours_median / dd_median);
  return 0;
}

// safetensors: bitwise round trips of every dtype with metadata, the on-disk layout, and rejection
// of malformed files and bad writes (with the target file left untouched).
#include <doctest/doctest.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "moelora/io/safetensors.hpp"

using namespace moelora;
using namespace moelora::io;

namespace {

/// A fresh directory under the system's temporary directory, removed at the end of the test.
struct TempDir {
  std::filesystem::path path;
  TempDir() {
    path = std::filesystem::temp_directory_path() / ("moelora-st-" + std::to_string(std::random_device{}()));
    std::filesystem::create_directories(path);
  }
  ~TempDir() { std::filesystem::remove_all(path); }
};

std::vector<std::byte> random_bytes(std::size_t n, std::mt19937& rng) {
  std::vector<std::byte> bytes(n);
  for (auto& b : bytes) b = static_cast<std::byte>(rng() & 0xff);
  return bytes;
}

/// A file made of a little-endian header length, `header` and `data` bytes.
void write_raw(const std::filesystem::path& path, const std::string& header, std::size_t data_bytes,
               std::uint64_t declared_length = ~std::uint64_t{0}) {
  const std::uint64_t length = declared_length == ~std::uint64_t{0} ? header.size() : declared_length;
  std::ofstream out(path, std::ios::binary);
  for (int i = 0; i < 8; ++i) out.put(static_cast<char>((length >> (8 * i)) & 0xff));
  out << header << std::string(data_bytes, '\x5a');
}

void check_bad(const std::filesystem::path& path, const std::string& needle) {
  try {
    SafetensorsFile file(path);
    FAIL("accepted a file that should be rejected: " << needle);
  } catch (const Error& e) {
    CHECK(e.code() == ErrorCode::bad_file);
    CHECK_MESSAGE(std::string(e.what()).find(needle) != std::string::npos, e.what());
  }
}

}  // namespace

TEST_CASE("safetensors: every dtype and the metadata round-trip bit for bit") {
  TempDir dir;
  std::mt19937 rng(std::random_device{}());
  std::vector<std::vector<std::byte>> storage;
  std::vector<TensorBytes> tensors;
  for (int d = 0; d <= static_cast<int>(StDType::F8_E8M0); ++d) {
    const auto dtype = static_cast<StDType>(d);
    const std::vector<std::int64_t> shape{3, 1 + d, 5};
    storage.push_back(random_bytes(static_cast<std::size_t>(3 * (1 + d) * 5) * st_dtype_size(dtype), rng));
    tensors.push_back({"t." + std::string(st_dtype_name(dtype)), dtype, shape, storage.back()});
  }
  tensors.push_back({"empty", StDType::F32, {0, 4}, {}});
  const Metadata metadata{{"format", "pt"}, {"note", "moelora test"}};
  const auto path = dir.path / "all.safetensors";
  write_safetensors(path, tensors, metadata);

  SafetensorsFile file(path);
  CHECK(file.metadata() == metadata);
  REQUIRE(file.tensors().size() == tensors.size());
  for (const TensorBytes& expected : tensors) {
    const TensorBytes& got = file.tensor(expected.name);
    CHECK(got.dtype == expected.dtype);
    CHECK(got.shape == expected.shape);
    CHECK(std::ranges::equal(got.bytes, expected.bytes));
  }
  CHECK_THROWS_WITH_AS(static_cast<void>(file.tensor("missing")), doctest::Contains("has no tensor \"missing\""), Error);
}

TEST_CASE("safetensors: the layout PyTorch's safetensors reads (length, JSON header, aligned data)") {
  TempDir dir;
  const std::vector<float> values{1.0f, -2.0f, 0.5f, 4.0f};
  const auto path = dir.path / "layout.safetensors";
  write_safetensors(path, {{"w", StDType::F32, {2, 2}, std::as_bytes(std::span(values))}}, {{"format", "pt"}});
  std::ifstream in(path, std::ios::binary);
  const std::string file((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::uint64_t length = 0;
  for (int i = 7; i >= 0; --i) length = (length << 8) | static_cast<unsigned char>(file[static_cast<std::size_t>(i)]);
  CHECK((8 + length) % 8 == 0);
  const auto header = nlohmann::json::parse(file.substr(8, length));
  CHECK(header["__metadata__"]["format"] == "pt");
  CHECK(header["w"]["dtype"] == "F32");
  CHECK(header["w"]["shape"] == nlohmann::json::array({2, 2}));
  CHECK(header["w"]["data_offsets"] == nlohmann::json::array({0, 16}));
  CHECK(file.size() == 8 + length + 16);
  CHECK(std::memcmp(file.data() + 8 + length, values.data(), 16) == 0);
}

TEST_CASE("safetensors: malformed files are rejected with the reason") {
  TempDir dir;
  const auto path = dir.path / "bad.safetensors";
  const std::string ok_entry = R"("a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]})";

  { std::ofstream(path, std::ios::binary) << "abc"; }
  check_bad(path, "shorter than the 8-byte header length");
  write_raw(path, "{" + ok_entry + "}", 8, 1000);
  check_bad(path, "runs past the end of the file");
  write_raw(path, "{}", 0, kMaxHeaderBytes + 1);
  check_bad(path, "its header declares");
  write_raw(path, "{\"a\": [1, 2", 0);
  check_bad(path, "not valid JSON");
  write_raw(path, "{" + ok_entry + "," + ok_entry + "}", 8);
  check_bad(path, "repeats the key \"a\"");
  write_raw(path, R"({"a":{"dtype":"Q7","shape":[2],"data_offsets":[0,8]}})", 8);
  check_bad(path, "unknown dtype \"Q7\"");
  write_raw(path, R"({"__metadata__":{"k":3},)" + ok_entry + "}", 8);
  check_bad(path, "__metadata__[\"k\"] is not a string");
  write_raw(path, R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", 12);
  check_bad(path, "a hole or an overlap");
  write_raw(path, R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[12,16]}})", 16);
  check_bad(path, "a hole or an overlap");
  write_raw(path, R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8);
  check_bad(path, "has 8 bytes but its shape and dtype need 12");
  write_raw(path, "{" + ok_entry + "}", 12);
  check_bad(path, "4 bytes after the last tensor");
  write_raw(path, R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,80]}})", 8);
  check_bad(path, "outside the 8-byte data section");
  write_raw(path, R"({"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", 8);
  check_bad(path, "not a non-negative integer");
  write_raw(path, R"({"a":{"dtype":"F32","shape":[4294967296,4294967296,4294967296],"data_offsets":[0,8]}})", 8);
  check_bad(path, "byte size overflows 64 bits");
  write_raw(path, R"([1,2,3])", 0);
  check_bad(path, "not a JSON object");
  CHECK_THROWS_AS(SafetensorsFile(dir.path / "absent.safetensors"), Error);
}

TEST_CASE("safetensors: a rejected write leaves the existing file as it was") {
  TempDir dir;
  const auto path = dir.path / "keep.safetensors";
  const std::vector<float> values{1.0f, 2.0f};
  write_safetensors(path, {{"x", StDType::F32, {2}, std::as_bytes(std::span(values))}});
  std::ifstream before_in(path, std::ios::binary);
  const std::string before((std::istreambuf_iterator<char>(before_in)), std::istreambuf_iterator<char>());

  CHECK_THROWS_WITH_AS(write_safetensors(path, {{"x", StDType::F32, {3}, std::as_bytes(std::span(values))}}),
                       doctest::Contains("has 8 bytes but its shape and dtype need 12"), Error);
  CHECK_THROWS_WITH_AS(write_safetensors(path, {{"x", StDType::F32, {2}, std::as_bytes(std::span(values))},
                                                {"x", StDType::F32, {2}, std::as_bytes(std::span(values))}}),
                       doctest::Contains("is given twice"), Error);
  CHECK_THROWS_WITH_AS(write_safetensors(dir.path / "no-such-dir" / "f.safetensors",
                                         {{"x", StDType::F32, {2}, std::as_bytes(std::span(values))}}),
                       doctest::Contains("cannot create"), Error);
  std::ifstream after_in(path, std::ios::binary);
  const std::string after((std::istreambuf_iterator<char>(after_in)), std::istreambuf_iterator<char>());
  CHECK(after == before);
  for (const auto& entry : std::filesystem::directory_iterator(dir.path))
    CHECK_MESSAGE(entry.path().filename() == "keep.safetensors", "left behind: " << entry.path().filename().string());
}

// safetensors, hostile input: every truncation of a valid file, malformed headers of every kind
// (each rejected with ErrorCode::bad_file naming the problem, never read out of bounds: the
// sanitized build of these tests runs under AddressSanitizer and UBSan), and files written by the
// reference writer (the fuzzer's seed corpus), which must load and which our writer reproduces
// byte for byte.
#include <doctest/doctest.h>

#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "moelora/io/safetensors.hpp"

using namespace moelora;
using namespace moelora::io;

namespace {

std::vector<std::byte> read_all(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const auto* bytes = reinterpret_cast<const std::byte*>(text.data());
  return {bytes, bytes + text.size()};
}

/// An 8-byte little-endian `length` followed by `header` and `data_bytes` filler bytes.
std::vector<std::byte> image(const std::string& header, std::size_t data_bytes, std::uint64_t length) {
  std::vector<std::byte> out;
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<std::byte>((length >> (8 * i)) & 0xff));
  for (const char c : header) out.push_back(static_cast<std::byte>(c));
  out.insert(out.end(), data_bytes, std::byte{0x5a});
  return out;
}
std::vector<std::byte> image(const std::string& header, std::size_t data_bytes) {
  return image(header, data_bytes, header.size());
}

/// Parses `bytes` from an exactly sized heap copy (so that any read past the end is caught by
/// AddressSanitizer) and expects ErrorCode::bad_file with `needle` in the message.
void check_rejected(const std::vector<std::byte>& bytes, const std::string& needle) {
  const auto copy = std::make_unique<std::byte[]>(bytes.size());
  std::copy(bytes.begin(), bytes.end(), copy.get());
  try {
    SafetensorsFile file(std::span<const std::byte>(copy.get(), bytes.size()), "image");
    FAIL("accepted an image that should be rejected: " << needle);
  } catch (const Error& e) {
    CHECK(e.code() == ErrorCode::bad_file);
    CHECK_MESSAGE(std::string(e.what()).find("image is not a valid safetensors file: ") != std::string::npos, e.what());
    CHECK_MESSAGE(std::string(e.what()).find(needle) != std::string::npos, "wanted \"" << needle << "\" in: " << e.what());
  }
}

std::string entry(const std::string& name, const std::string& dtype, const std::string& shape,
                  const std::string& offsets) {
  return "\"" + name + R"(":{"dtype":")" + dtype + R"(","shape":)" + shape + R"(,"data_offsets":)" + offsets + "}";
}

/// The seed corpus of the fuzzer, written by the reference writer (fuzz/make_corpus.py).
std::filesystem::path corpus_dir() {
  const char* dir = std::getenv("MOELORA_CORPUS_DIR");
  REQUIRE_MESSAGE(dir != nullptr, "MOELORA_CORPUS_DIR must name fuzz/corpus (meson test sets it)");
  return dir;
}

}  // namespace

TEST_CASE("safetensors robustness: every truncation of a valid file is rejected") {
  const std::vector<std::uint16_t> a{1, 2, 3, 4, 5, 6};
  const std::vector<std::uint8_t> b{7, 8, 9};
  const auto dir = std::filesystem::temp_directory_path();
  const auto path = dir / ("moelora-trunc-" + std::to_string(::getpid()) + ".safetensors");
  write_safetensors(path,
                    {{"a", StDType::BF16, {2, 3}, std::as_bytes(std::span(a))},
                     {"b", StDType::U8, {3}, std::as_bytes(std::span(b))}},
                    {{"format", "pt"}});
  const std::vector<std::byte> whole = read_all(path);
  CHECK(SafetensorsFile(whole, "image").tensors().size() == 2);
  for (std::size_t n = 0; n < whole.size(); ++n) {
    CAPTURE(n);
    const std::vector<std::byte> prefix(whole.begin(), whole.begin() + static_cast<std::ptrdiff_t>(n));
    check_rejected(prefix, "");
    {  // and through the file path (mmap)
      std::ofstream out(path, std::ios::binary | std::ios::trunc);
      out.write(reinterpret_cast<const char*>(prefix.data()), static_cast<std::streamsize>(n));
    }
    CHECK_THROWS_AS(SafetensorsFile{path}, Error);
  }
  std::filesystem::remove(path);
}

TEST_CASE("safetensors robustness: malformed images are rejected with the reason") {
  const std::string a = entry("a", "F32", "[2]", "[0,8]");
  const auto object = [](const std::string& inner) { return "{" + inner + "}"; };

  SUBCASE("sizes and header length") {
    check_rejected({}, "shorter than the 8-byte header length");
    check_rejected(std::vector<std::byte>(7), "shorter than the 8-byte header length");
    check_rejected(image("", 0, 0), "not valid JSON");
    check_rejected(image(object(a), 8, 1000), "runs past the end of the file");
    check_rejected(image(object(a), 8, ~std::uint64_t{0}), "its header declares");
    check_rejected(image("{}", 0, kMaxHeaderBytes + 1), "its header declares 100000001 bytes (limit 100000000)");
  }
  SUBCASE("the JSON itself") {
    check_rejected(image("{\"a\": [1, 2", 0), "not valid JSON");
    check_rejected(image(object(a) + "x", 8), "not valid JSON");
    check_rejected(image("{\"\xff\xfe\":1}", 0), "not valid JSON");
    check_rejected(image("[1,2,3]", 0), "not a JSON object");
    check_rejected(image("\"a\"", 0), "not a JSON object");
    check_rejected(image("null", 0), "not a JSON object");
  }
  SUBCASE("duplicate keys, at any depth") {
    check_rejected(image(object(a + "," + a), 8), "repeats the key \"a\"");
    check_rejected(image(R"({"a":{"dtype":"F32","dtype":"F32","shape":[2],"data_offsets":[0,8]}})", 8),
                   "repeats the key \"dtype\"");
    check_rejected(image(R"({"__metadata__":{"k":"1","k":"2"},)" + a + "}", 8), "repeats the key \"k\"");
    check_rejected(image(R"({"__metadata__":{},"__metadata__":{}})", 0), "repeats the key \"__metadata__\"");
  }
  SUBCASE("metadata") {
    check_rejected(image(R"({"__metadata__":{"k":3},)" + a + "}", 8), "__metadata__[\"k\"] is not a string");
    check_rejected(image(R"({"__metadata__":{"k":null}})", 0), "__metadata__[\"k\"] is not a string");
    check_rejected(image(R"({"__metadata__":["pt"]})", 0), "__metadata__ is not an object");
  }
  SUBCASE("tensor entries") {
    check_rejected(image(R"({"a":[1]})", 0), "tensor \"a\" lacks dtype, shape or data_offsets");
    check_rejected(image(R"({"a":{"dtype":"F32","shape":[2]}})", 8), "lacks dtype, shape or data_offsets");
    check_rejected(image(object(entry("a", "Q7", "[2]", "[0,8]")), 8), "unknown dtype \"Q7\"");
    check_rejected(image(object(entry("a", "f32", "[2]", "[0,8]")), 8), "unknown dtype \"f32\"");
    check_rejected(image(R"({"a":{"dtype":4,"shape":[2],"data_offsets":[0,8]}})", 8), "non-string dtype");
    check_rejected(image(object(entry("a", "F32", "2", "[0,8]")), 8), "shape that is not an array");
    check_rejected(image(object(entry("a", "F32", "[2.0]", "[0,8]")), 8), "not a non-negative integer");
    check_rejected(image(object(entry("a", "F32", "[-2]", "[0,8]")), 8), "not a non-negative integer");
    check_rejected(image(object(entry("a", "F32", "[2]", "[0,8,9]")), 8), "not two non-negative integers");
    check_rejected(image(object(entry("a", "F32", "[2]", "[0,8.0]")), 8), "not two non-negative integers");
    check_rejected(image(object(entry("a", "F32", "[2]", "[-1,7]")), 8), "not two non-negative integers");
  }
  SUBCASE("shapes whose size overflows") {
    check_rejected(image(object(entry("a", "F32", "[18446744073709551615]", "[0,8]")), 8),
                   "shape entry 18446744073709551615, over 2^63 - 1");
    check_rejected(image(object(entry("a", "F32", "[4294967296,4294967296,4294967296]", "[0,8]")), 8),
                   "byte size overflows 64 bits");
    // the element count fits but the byte count does not
    check_rejected(image(object(entry("a", "F32", "[2305843009213693952,4]", "[0,8]")), 8), "overflows 64 bits");
    // a zero dimension after an overflowing product is still an overflow (as the reference reader has it)
    check_rejected(image(object(entry("a", "F32", "[4611686018427387904,4611686018427387904,0]", "[0,0]")), 0),
                   "overflows 64 bits");
    check_rejected(image(object(entry("a", "F32", "[3]", "[0,8]")), 8), "has 8 bytes but its shape and dtype need 12");
  }
  SUBCASE("offsets: past the end, reversed, holes, overlaps, trailing bytes") {
    check_rejected(image(object(entry("a", "F32", "[2]", "[0,80]")), 8), "[0, 80] outside the 8-byte data section");
    check_rejected(image(object(entry("a", "F32", "[2]", "[0,18446744073709551615]")), 8), "outside the 8-byte data section");
    check_rejected(image(object(entry("a", "F32", "[0]", "[8,4]")), 8), "outside the 8-byte data section");
    check_rejected(image(object(entry("a", "F32", "[2]", "[4,12]")), 12), "starts at byte 4 where 0 was expected");
    check_rejected(image(object(a + "," + entry("b", "F32", "[2]", "[4,12]")), 12), "a hole or an overlap");
    check_rejected(image(object(a + "," + entry("b", "F32", "[1]", "[12,16]")), 16), "a hole or an overlap");
    check_rejected(image(object(a + "," + entry("b", "F32", "[2]", "[0,8]")), 8), "a hole or an overlap");
    check_rejected(image(object(a), 12), "4 bytes after the last tensor");
    check_rejected(image("{}", 1), "1 bytes after the last tensor");
  }
}

TEST_CASE("safetensors robustness: odd but valid images load") {
  // empty tensors may share an offset with each other and with the tensor that starts there
  const std::string header = "{" + entry("z2", "F32", "[0]", "[0,0]") + "," + entry("a", "F32", "[2]", "[0,8]") + "," +
                             entry("z1", "I8", "[4,0]", "[0,0]") + "," + entry("s", "F64", "[]", "[8,16]") + "}";
  const std::vector<std::byte> bytes = image(header, 16);
  const SafetensorsFile file(bytes, "image");
  REQUIRE(file.tensors().size() == 4);
  CHECK(file.tensors()[3].name == "s");
  CHECK(file.tensor("s").numel() == 1);
  CHECK(file.tensor("z1").bytes.empty());
  CHECK(file.tensor("a").bytes.data() == bytes.data() + 8 + header.size());
  // padding spaces after the JSON, unknown fields in an entry, nothing but metadata
  const std::vector<std::byte> padded_bytes = image(R"({"__metadata__":{"format":"pt"}}       )", 0);
  const SafetensorsFile padded(padded_bytes, "image");
  CHECK(padded.metadata().at("format") == "pt");
  CHECK(padded.tensors().empty());
  const std::vector<std::byte> extra = image(R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1],"x":[1]}})", 1);
  CHECK(SafetensorsFile(extra, "image").tensor("a").bytes.size() == 1);
}

TEST_CASE("safetensors robustness: the writer rejects shapes it cannot describe") {
  const auto path = std::filesystem::temp_directory_path() / ("moelora-w-" + std::to_string(::getpid()) + ".safetensors");
  const std::vector<float> two{1.0f, 2.0f};
  CHECK_THROWS_WITH_AS(write_safetensors(path, {{"x", StDType::F32, {-1, -2}, std::as_bytes(std::span(two))}}),
                       doctest::Contains("negative dimension or a shape whose byte size overflows"), Error);
  CHECK_THROWS_WITH_AS(write_safetensors(path, {{"x", StDType::F32, {std::int64_t{1} << 62, 4, 0}, {}}}),
                       doctest::Contains("overflows 64 bits"), Error);
  CHECK_THROWS_WITH_AS(write_safetensors(path, {{"\xff", StDType::F32, {2}, std::as_bytes(std::span(two))}}),
                       doctest::Contains("not valid UTF-8"), Error);
  CHECK_FALSE(std::filesystem::exists(path));
}

TEST_CASE("safetensors robustness: files of the reference writer load, and ours match them byte for byte") {
  int seen = 0;
  for (const auto& item : std::filesystem::directory_iterator(corpus_dir())) {
    CAPTURE(item.path().filename().string());
    ++seen;
    const SafetensorsFile theirs(item.path());
    // written in the reference file's order (tensors() follows the data offsets), ours is the same file
    const auto rewritten = std::filesystem::temp_directory_path() / ("moelora-ref-" + std::to_string(::getpid()));
    write_safetensors(rewritten, theirs.tensors(), theirs.metadata());
    CHECK(read_all(rewritten) == read_all(item.path()));
    std::filesystem::remove(rewritten);
  }
  CHECK(seen >= 4);
  const SafetensorsFile every(corpus_dir() / "every_dtype.safetensors");
  CHECK(every.metadata() == Metadata{{"format", "pt"}});
  REQUIRE(every.tensors().size() == 11);
  for (int d = 0; d <= static_cast<int>(StDType::F8_E8M0); ++d) {
    const auto dtype = static_cast<StDType>(d);
    const TensorBytes& t = every.tensor("t." + std::string(st_dtype_name(dtype)));
    CHECK(t.dtype == dtype);
    CHECK(t.shape == std::vector<std::int64_t>{2, 3});
    CHECK(t.bytes.size() == 6 * st_dtype_size(dtype));
    // the script numbers the tensors in StDType order: byte k of tensor d is (d * 31 + k * 7) & 0xff
    for (std::size_t k = 0; k < t.bytes.size(); ++k)
      CHECK(std::to_integer<int>(t.bytes[k]) == static_cast<int>((d * 31 + k * 7) & 0xff));
  }
}

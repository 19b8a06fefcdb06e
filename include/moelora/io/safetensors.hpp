/// \file
/// \brief safetensors files: a validating, memory-mapped reader and an atomic writer.
///
/// Layout: 8-byte little-endian header length N, an N-byte JSON header mapping each tensor name to
/// `{"dtype", "shape", "data_offsets": [begin, end]}` (byte offsets into the data section that
/// follows the header) plus an optional `"__metadata__"` object of strings, then the data. The
/// reader rejects, with ErrorCode::bad_file naming the problem: a file shorter than its header, a
/// header over kMaxHeaderBytes, malformed JSON, duplicate keys, unknown dtypes, non-string metadata,
/// offsets that do not tile the data section contiguously from 0 (holes, overlaps, past the end),
/// shapes whose size overflows 64 bits, and byte sizes that disagree with shape × dtype size. The
/// same validation serves a memory image (for callers that already hold the bytes, and the fuzzer).
/// The writer writes and syncs a temporary file beside the target and renames it into place, so a
/// failure or a crash never leaves a partial file.
#pragma once

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <numeric>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "moelora/core/error.hpp"

namespace moelora::io {

/// Element types of the safetensors format that moelora meets (packed 4-bit data travels as U8).
enum class StDType : std::uint8_t { BF16, F16, F32, F64, I8, U8, I32, I64, F8_E4M3, F8_E5M2, F8_E8M0 };

inline constexpr std::string_view st_dtype_name(StDType d) {
  constexpr std::string_view kNames[] = {"BF16", "F16", "F32", "F64", "I8", "U8", "I32", "I64", "F8_E4M3", "F8_E5M2", "F8_E8M0"};
  return kNames[static_cast<int>(d)];
}
inline constexpr std::size_t st_dtype_size(StDType d) {
  constexpr std::size_t kSizes[] = {2, 2, 4, 8, 1, 1, 4, 8, 1, 1, 1};
  return kSizes[static_cast<int>(d)];
}
/// The StDType of a dtype string; unknown strings throw ErrorCode::bad_file.
inline StDType parse_st_dtype(std::string_view name) {
  for (int i = 0; i <= static_cast<int>(StDType::F8_E8M0); ++i)
    if (st_dtype_name(static_cast<StDType>(i)) == name) return static_cast<StDType>(i);
  moelora::detail::raise(ErrorCode::bad_file, "safetensors dtype \"", name, "\" is not supported");
}

/// Largest JSON header the reader accepts (the format's own limit is 100 MB).
inline constexpr std::uint64_t kMaxHeaderBytes = 100'000'000;

/// One tensor to write, or a view of one read: name, dtype, shape and its bytes (row-major).
struct TensorBytes {
  std::string name;
  StDType dtype = StDType::F32;
  std::vector<std::int64_t> shape;
  std::span<const std::byte> bytes;

  [[nodiscard]] std::int64_t numel() const {
    return std::accumulate(shape.begin(), shape.end(), std::int64_t{1}, std::multiplies<>());
  }
};

using Metadata = std::map<std::string, std::string>;

/// The byte size of a `dtype` tensor of `shape`, or nullopt when a dimension is negative or the
/// product (taken left to right, as the reference reader does) leaves the int64 range.
inline std::optional<std::uint64_t> st_byte_size(std::span<const std::int64_t> shape, StDType dtype) {
  std::int64_t n = 1;
  for (const std::int64_t d : shape)
    if (d < 0 || __builtin_mul_overflow(n, d, &n)) return std::nullopt;
  if (__builtin_mul_overflow(n, static_cast<std::int64_t>(st_dtype_size(dtype)), &n)) return std::nullopt;
  return static_cast<std::uint64_t>(n);
}

/// A safetensors file mapped read-only into memory (or a caller's memory image of one); tensor
/// views stay valid while it lives.
class SafetensorsFile {
 public:
  explicit SafetensorsFile(const std::filesystem::path& path) : path_(path), mapped_(true) {
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    MOELORA_REQUIRE(fd >= 0, ErrorCode::io, "cannot open ", path.string(), ": ", std::strerror(errno));
    struct stat st {};
    const bool stat_ok = ::fstat(fd, &st) == 0;
    size_ = stat_ok ? static_cast<std::size_t>(st.st_size) : 0;
    if (stat_ok && size_ > 0) {
      void* map = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
      if (map != MAP_FAILED) data_ = static_cast<const std::byte*>(map);
    }
    ::close(fd);
    MOELORA_REQUIRE(stat_ok, ErrorCode::io, "cannot stat ", path.string());
    MOELORA_REQUIRE(size_ == 0 || data_ != nullptr, ErrorCode::io, "cannot map ", path.string());
    try {
      parse();
    } catch (...) {
      unmap();
      throw;
    }
  }
  /// Validates and views `image`, the bytes of a whole safetensors file, which must outlive this
  /// object; `name` stands for the file in error messages and path().
  SafetensorsFile(std::span<const std::byte> image, std::string name)
      : path_(std::move(name)), data_(image.data()), size_(image.size()) {
    parse();
  }
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;
  ~SafetensorsFile() { unmap(); }

  /// Tensors in the order of their data offsets (empty tensors at one offset in the header's order).
  [[nodiscard]] const std::vector<TensorBytes>& tensors() const { return tensors_; }
  [[nodiscard]] const Metadata& metadata() const { return metadata_; }
  [[nodiscard]] const std::filesystem::path& path() const { return path_; }

  /// The tensor called `name`, or ErrorCode::invalid_argument naming the file.
  [[nodiscard]] const TensorBytes& tensor(std::string_view name) const {
    const auto it = std::find_if(tensors_.begin(), tensors_.end(), [&](const TensorBytes& t) { return t.name == name; });
    MOELORA_REQUIRE(it != tensors_.end(), ErrorCode::invalid_argument, path_.string(), " has no tensor \"", name, "\"");
    return *it;
  }

 private:
  [[noreturn]] void bad(const std::string& why) const {
    moelora::detail::raise(ErrorCode::bad_file, path_.string(), " is not a valid safetensors file: ", why);
  }

  void parse() {
    if (size_ < 8) bad("it is shorter than the 8-byte header length");
    std::uint64_t header_bytes = 0;
    for (int i = 7; i >= 0; --i) header_bytes = (header_bytes << 8) | std::to_integer<std::uint64_t>(data_[i]);
    if (header_bytes > kMaxHeaderBytes) bad("its header declares " + std::to_string(header_bytes) + " bytes (limit " + std::to_string(kMaxHeaderBytes) + ")");
    if (header_bytes > size_ - 8) bad("its header length " + std::to_string(header_bytes) + " runs past the end of the file (" + std::to_string(size_) + " bytes)");
    const std::string_view text(reinterpret_cast<const char*>(data_ + 8), header_bytes);

    // Duplicate keys are an error (JSON parsers silently keep one): track keys per object.
    std::vector<std::set<std::string>> keys;
    std::string duplicate;
    const auto track = [&](int /*depth*/, nlohmann::ordered_json::parse_event_t event, nlohmann::ordered_json& parsed) {
      using E = nlohmann::ordered_json::parse_event_t;
      if (event == E::object_start) keys.emplace_back();
      else if (event == E::object_end) keys.pop_back();
      else if (event == E::key && !keys.back().insert(parsed.get<std::string>()).second && duplicate.empty())
        duplicate = parsed.get<std::string>();
      return true;
    };
    nlohmann::ordered_json header;  // keeps the file's order of entries, so ties below keep it too
    try {
      header = nlohmann::ordered_json::parse(text.begin(), text.end(), track);
    } catch (const nlohmann::json::exception& e) {
      bad(std::string("its header is not valid JSON (") + e.what() + ")");
    }
    if (!duplicate.empty()) bad("its header repeats the key \"" + duplicate + "\"");
    if (!header.is_object()) bad("its header is not a JSON object");

    const std::uint64_t data_bytes = size_ - 8 - header_bytes;
    const std::byte* data = data_ + 8 + header_bytes;
    for (const auto& [name, entry] : header.items()) {
      if (name == "__metadata__") {
        if (!entry.is_object()) bad("__metadata__ is not an object");
        for (const auto& [key, value] : entry.items()) {
          if (!value.is_string()) bad("__metadata__[\"" + key + "\"] is not a string");
          metadata_[key] = value.get<std::string>();
        }
        continue;
      }
      if (!entry.is_object() || !entry.contains("dtype") || !entry.contains("shape") || !entry.contains("data_offsets"))
        bad("tensor \"" + name + "\" lacks dtype, shape or data_offsets");
      const auto& dtype = entry["dtype"];
      const auto& shape = entry["shape"];
      const auto& offsets = entry["data_offsets"];
      if (!dtype.is_string()) bad("tensor \"" + name + "\" has a non-string dtype");
      TensorBytes t;
      t.name = name;
      try {
        t.dtype = parse_st_dtype(dtype.get<std::string>());
      } catch (const Error&) {
        bad("tensor \"" + name + "\" has the unknown dtype \"" + dtype.get<std::string>() + "\"");
      }
      if (!shape.is_array()) bad("tensor \"" + name + "\" has a shape that is not an array");
      for (const auto& d : shape) {
        if (!d.is_number_unsigned()) bad("tensor \"" + name + "\" has a shape entry that is not a non-negative integer");
        if (d.get<std::uint64_t>() > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()))
          bad("tensor \"" + name + "\" has the shape entry " + std::to_string(d.get<std::uint64_t>()) + ", over 2^63 - 1");
        t.shape.push_back(d.get<std::int64_t>());
      }
      if (!offsets.is_array() || offsets.size() != 2 || !offsets[0].is_number_unsigned() || !offsets[1].is_number_unsigned())
        bad("tensor \"" + name + "\" has data_offsets that are not two non-negative integers");
      const auto begin = offsets[0].get<std::uint64_t>(), end = offsets[1].get<std::uint64_t>();
      if (begin > end || end > data_bytes)
        bad("tensor \"" + name + "\" has data_offsets [" + std::to_string(begin) + ", " + std::to_string(end) +
            "] outside the " + std::to_string(data_bytes) + "-byte data section");
      const std::optional<std::uint64_t> expected = st_byte_size(t.shape, t.dtype);
      if (!expected) bad("tensor \"" + name + "\" has a shape whose byte size overflows 64 bits");
      if (*expected != end - begin)
        bad("tensor \"" + name + "\" has " + std::to_string(end - begin) + " bytes but its shape and dtype need " +
            std::to_string(*expected));
      t.bytes = std::span<const std::byte>(data + begin, end - begin);
      tensors_.push_back(std::move(t));
    }
    // By (begin, end), as the reference reader sorts: empty tensors sharing an offset come first,
    // in the header's order.
    std::stable_sort(tensors_.begin(), tensors_.end(), [](const TensorBytes& a, const TensorBytes& b) {
      return std::pair(a.bytes.data(), a.bytes.size()) < std::pair(b.bytes.data(), b.bytes.size());
    });
    std::uint64_t expected_begin = 0;
    for (const TensorBytes& t : tensors_) {
      const auto begin = static_cast<std::uint64_t>(t.bytes.data() - data);
      if (begin != expected_begin)
        bad("tensor \"" + t.name + "\" starts at byte " + std::to_string(begin) + " where " +
            std::to_string(expected_begin) + " was expected (a hole or an overlap)");
      expected_begin = begin + t.bytes.size();
    }
    if (expected_begin != data_bytes)
      bad("its data section has " + std::to_string(data_bytes - expected_begin) + " bytes after the last tensor");
  }

  void unmap() noexcept {
    if (mapped_ && data_) ::munmap(const_cast<std::byte*>(data_), size_);
    data_ = nullptr;
  }

  std::filesystem::path path_;
  bool mapped_ = false;
  const std::byte* data_ = nullptr;
  std::size_t size_ = 0;
  std::vector<TensorBytes> tensors_;
  Metadata metadata_;
};

/// Writes `tensors` (in this order) and `metadata` to `path` through a temporary file beside it
/// that is renamed into place. Names must be unique and not "__metadata__"; each tensor's byte
/// count must equal its shape × dtype size. On any failure the target is untouched.
inline void write_safetensors(const std::filesystem::path& path, const std::vector<TensorBytes>& tensors,
                              const Metadata& metadata = {}) {
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::set<std::string> names;
  std::uint64_t offset = 0;
  for (const TensorBytes& t : tensors) {
    MOELORA_REQUIRE(t.name != "__metadata__" && !t.name.empty(), ErrorCode::invalid_argument,
                    "a tensor may not be called \"", t.name, "\"");
    MOELORA_REQUIRE(names.insert(t.name).second, ErrorCode::invalid_argument, "tensor \"", t.name, "\" is given twice");
    const std::optional<std::uint64_t> need = st_byte_size(t.shape, t.dtype);
    MOELORA_REQUIRE(need.has_value(), ErrorCode::invalid_argument, "tensor \"", t.name,
                    "\" has a negative dimension or a shape whose byte size overflows 64 bits");
    MOELORA_REQUIRE(t.bytes.size() == *need, ErrorCode::invalid_argument, "tensor \"", t.name, "\" has ",
                    t.bytes.size(), " bytes but its shape and dtype need ", *need);
    header[t.name] = {{"dtype", st_dtype_name(t.dtype)}, {"shape", t.shape}, {"data_offsets", {offset, offset + t.bytes.size()}}};
    offset += t.bytes.size();
  }
  std::string text;
  try {
    text = header.dump();
  } catch (const nlohmann::json::type_error&) {
    moelora::detail::raise(ErrorCode::invalid_argument, "a tensor name or metadata string is not valid UTF-8");
  }
  text.append((8 - text.size() % 8) % 8, ' ');  // align the data section to 8 bytes, as the reference writer does

  const std::filesystem::path temporary = path.string() + ".tmp-" + std::to_string(::getpid());
  const int fd = ::open(temporary.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666);
  MOELORA_REQUIRE(fd >= 0, ErrorCode::io, "cannot create ", temporary.string(), ": ", std::strerror(errno));
  const auto write_all = [fd](const void* bytes, std::size_t n) {
    for (auto* p = static_cast<const char*>(bytes); n > 0;) {
      const ::ssize_t done = ::write(fd, p, n);
      if (done < 0 && errno == EINTR) continue;
      if (done <= 0) return false;
      p += done;
      n -= static_cast<std::size_t>(done);
    }
    return true;
  };
  unsigned char length[8];
  for (int i = 0; i < 8; ++i) length[i] = static_cast<unsigned char>((static_cast<std::uint64_t>(text.size()) >> (8 * i)) & 0xff);
  bool ok = write_all(length, 8) && write_all(text.data(), text.size());
  for (const TensorBytes& t : tensors) ok = ok && write_all(t.bytes.data(), t.bytes.size());
  ok = ok && ::fsync(fd) == 0;  // the data reaches the disk before the rename can
  int write_errno = ok ? 0 : errno;
  if (::close(fd) != 0 && ok) {
    ok = false;
    write_errno = errno;
  }
  if (!ok) {
    std::filesystem::remove(temporary);
    moelora::detail::raise(ErrorCode::io, "cannot write ", temporary.string(), ": ", std::strerror(write_errno));
  }
  std::error_code error;
  std::filesystem::rename(temporary, path, error);
  if (error) {
    std::filesystem::remove(temporary);
    moelora::detail::raise(ErrorCode::io, "cannot rename ", temporary.string(), " to ", path.string(), ": ", error.message());
  }
}

}  // namespace moelora::io

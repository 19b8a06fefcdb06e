// libFuzzer target for the safetensors reader: any bytes are either a valid image, whose tensors
// all lie inside it with byte sizes that match their shapes and tile the data section, or rejected
// with ErrorCode::bad_file. Built by fuzz/run.sh with clang++ -fsanitize=fuzzer,address,undefined.
#include <cstddef>
#include <cstdint>
#include <span>

#include "moelora/io/safetensors.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::span<const std::byte> image = std::as_bytes(std::span(data, size));
  try {
    const moelora::io::SafetensorsFile file(image, "input");
    const std::byte* next = nullptr;
    for (const moelora::io::TensorBytes& t : file.tensors()) {
      const std::optional<std::uint64_t> need = moelora::io::st_byte_size(t.shape, t.dtype);
      if (!need || *need != t.bytes.size()) __builtin_trap();
      if (t.bytes.data() < image.data() || t.bytes.data() + t.bytes.size() > image.data() + image.size())
        __builtin_trap();
      if (next && t.bytes.data() != next) __builtin_trap();
      next = t.bytes.data() + t.bytes.size();
      if (!t.bytes.empty()) {  // touch both ends, so that a view past the input is caught
        volatile std::byte first = t.bytes.front(), last = t.bytes.back();
        static_cast<void>(first);
        static_cast<void>(last);
      }
    }
    if (next && next != image.data() + image.size()) __builtin_trap();
  } catch (const moelora::Error& e) {
    if (e.code() != moelora::ErrorCode::bad_file) __builtin_trap();
  }
  return 0;
}

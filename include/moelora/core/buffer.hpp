/// \file
/// \brief Buffer<Backend>: an owning, move-only byte buffer in a backend's memory.
#pragma once

#include <cstddef>
#include <utility>

namespace moelora {

/// Owns `bytes` bytes allocated by `Backend::allocate`; freed by `Backend::deallocate`.
template <class Backend>
class Buffer {
 public:
  Buffer() = default;
  explicit Buffer(std::size_t bytes) : data_(bytes ? Backend::allocate(bytes) : nullptr), bytes_(bytes) {}
  Buffer(Buffer&& other) noexcept
      : data_(std::exchange(other.data_, nullptr)), bytes_(std::exchange(other.bytes_, 0)) {}
  Buffer& operator=(Buffer&& other) noexcept {
    if (this != &other) {
      release();
      data_ = std::exchange(other.data_, nullptr);
      bytes_ = std::exchange(other.bytes_, 0);
    }
    return *this;
  }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  ~Buffer() { release(); }

  [[nodiscard]] void* data() const { return data_; }
  template <class T>
  [[nodiscard]] T* as() const {
    return static_cast<T*>(data_);
  }
  [[nodiscard]] std::size_t bytes() const { return bytes_; }

  /// Grows to at least `bytes` (contents are not kept); never shrinks.
  void reserve(std::size_t bytes) {
    if (bytes > bytes_) *this = Buffer(bytes);
  }

 private:
  void release() noexcept {
    if (data_) Backend::deallocate(data_);
    data_ = nullptr;
    bytes_ = 0;
  }

  void* data_ = nullptr;
  std::size_t bytes_ = 0;
};

}  // namespace moelora

/// \file
/// \brief The library's one exception type and the macros that raise it.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace moelora {

/// What kind of problem an Error reports; tests and callers branch on it, people read `what()`.
enum class ErrorCode {
  invalid_argument,   ///< a value out of its allowed range (rank < 1, scale <= 0, ...)
  shape_mismatch,     ///< a tensor's shape disagrees with the layer or with another tensor
  dtype_mismatch,     ///< a tensor's dtype disagrees with the layer
  bad_counts,         ///< tokens_per_expert has the wrong length, a negative entry, or a wrong sum
  unknown_adapter,    ///< an adapter name that the layer does not hold
  duplicate_adapter,  ///< an adapter name that the layer already holds
  unsupported,        ///< a valid request this build or backend cannot serve
  cuda,               ///< a CUDA runtime call failed
  cublas,             ///< a cuBLAS call failed
  cusolver,           ///< a cuSOLVER call failed or reported a failed factorisation
  nccl,               ///< an NCCL call failed
  io,                 ///< a file could not be opened, read, written or renamed
  bad_file,           ///< a file's contents break its format (a malformed or inconsistent header)
};

/// Every error the library reports: an exception carrying an ErrorCode and a message that names
/// the offending argument and value. A call rejected by validation (every code but cuda, cublas,
/// cusolver, nccl and io) leaves the layer, its adapters and any file on disk unchanged.
class Error : public std::runtime_error {
 public:
  Error(ErrorCode code, const std::string& message) : std::runtime_error(message), code_(code) {}
  [[nodiscard]] ErrorCode code() const noexcept { return code_; }

 private:
  ErrorCode code_;
};

namespace detail {
template <class... Parts>
[[noreturn]] void raise(ErrorCode code, const Parts&... parts) {
  std::ostringstream message;
  message << "moelora: ";
  (message << ... << parts);
  throw Error(code, message.str());
}
}  // namespace detail

}  // namespace moelora

/// Throws moelora::Error(code, message...) unless `condition` holds; the message parts are streamed.
#define MOELORA_REQUIRE(condition, code, ...)                 \
  do {                                                        \
    if (!(condition)) ::moelora::detail::raise(code, __VA_ARGS__); \
  } while (0)

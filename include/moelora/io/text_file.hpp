/// \file
/// \brief Small text files (JSON indexes and configs) written atomically: a temporary file beside
/// the target, renamed into place, so a crash never leaves a half-written file.
#pragma once

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <string_view>
#include <system_error>

#include "moelora/core/error.hpp"

namespace moelora::io {

/// Writes `text` to `path` through `path.tmp-PID`, renamed into place; throws ErrorCode::io (and
/// leaves the target untouched) when the temporary file cannot be written or renamed.
inline void write_text_file(const std::filesystem::path& path, std::string_view text) {
  const std::filesystem::path temporary = path.string() + ".tmp-" + std::to_string(::getpid());
  {
    std::ofstream out(temporary, std::ios::binary | std::ios::trunc);
    MOELORA_REQUIRE(out.good(), ErrorCode::io, "cannot create ", temporary.string());
    out.write(text.data(), static_cast<std::streamsize>(text.size()));
    out.flush();
    if (!out.good()) {
      out.close();
      std::filesystem::remove(temporary);
      moelora::detail::raise(ErrorCode::io, "cannot write ", temporary.string());
    }
  }
  std::error_code error;
  std::filesystem::rename(temporary, path, error);
  if (error) {
    std::filesystem::remove(temporary);
    moelora::detail::raise(ErrorCode::io, "cannot rename ", temporary.string(), " to ", path.string(), ": ", error.message());
  }
}

/// The whole of the text file `path`; ErrorCode::io when it cannot be read.
inline std::string read_text_file(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  MOELORA_REQUIRE(in.good(), ErrorCode::io, "cannot open ", path.string());
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  MOELORA_REQUIRE(!in.bad(), ErrorCode::io, "cannot read ", path.string());
  return text;
}

}  // namespace moelora::io

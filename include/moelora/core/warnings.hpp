/// \file
/// \brief WarningSink: where the library reports what it did differently from what was asked
/// (an init without a quantizer falling back to zeros, a rank padded with zeros, ...).
#pragma once

#include <functional>
#include <iostream>
#include <string_view>

namespace moelora {

/// Receives one warning message (no trailing newline). Replace it to log, collect or silence them.
using WarningSink = std::function<void(std::string_view message)>;

/// The default sink: "moelora: warning: <message>" on std::clog.
inline void log_warning(std::string_view message) { std::clog << "moelora: warning: " << message << '\n'; }

}  // namespace moelora

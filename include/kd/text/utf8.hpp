#pragma once
// UTF-8 validation and whole-file reading for the text pipeline. Errors name the file and the byte
// offset of the first bad byte, so a corrupt corpus file is found at once.

#include <cstddef>
#include <cstdint>
#include <fstream>
#include <string>
#include <string_view>

#include <kd/core/status.hpp>

namespace kd::text {

// Byte offset of the first byte that does not start a well-formed UTF-8 sequence (RFC 3629: no
// overlongs, no surrogates, nothing above U+10FFFF), or npos when the whole string is valid.
inline std::size_t first_invalid_utf8(std::string_view s) noexcept {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const std::size_t n = s.size();
  std::size_t i = 0;
  while (i < n) {
    const unsigned c = p[i];
    if (c < 0x80) { ++i; continue; }
    std::size_t len;
    unsigned lo = 0x80, hi = 0xBF;  // allowed range of the second byte
    if (c >= 0xC2 && c <= 0xDF) len = 2;
    else if (c == 0xE0) { len = 3; lo = 0xA0; }
    else if (c >= 0xE1 && c <= 0xEC) len = 3;
    else if (c == 0xED) { len = 3; hi = 0x9F; }  // no surrogates
    else if (c >= 0xEE && c <= 0xEF) len = 3;
    else if (c == 0xF0) { len = 4; lo = 0x90; }
    else if (c >= 0xF1 && c <= 0xF3) len = 4;
    else if (c == 0xF4) { len = 4; hi = 0x8F; }
    else return i;
    if (i + len > n) return i;
    if (p[i + 1] < lo || p[i + 1] > hi) return i;
    for (std::size_t k = 2; k < len; ++k)
      if ((p[i + k] & 0xC0) != 0x80) return i;
    i += len;
  }
  return std::string_view::npos;
}

inline status validate_utf8(std::string_view s, std::string_view name) {
  const std::size_t bad = first_invalid_utf8(s);
  if (bad == std::string_view::npos) return ok_status();
  return {errc::invalid_argument, std::string(name) + ": not valid UTF-8 at byte offset " + std::to_string(bad)};
}

// Reads a whole file as bytes. `hint` is appended to the "cannot open" message (e.g. which script
// fetches the file).
inline status read_file(const std::string& path, std::string& out, std::string_view hint = {}) {
  std::ifstream f(path, std::ios::binary);
  if (!f) {
    std::string m = path + ": cannot open";
    if (!hint.empty()) m += std::string(" (") + std::string(hint) + ")";
    return {errc::io_error, m};
  }
  f.seekg(0, std::ios::end);
  const auto size = f.tellg();
  if (size < 0) return {errc::io_error, path + ": cannot read (not a regular file?)"};
  out.resize(static_cast<std::size_t>(size));
  f.seekg(0);
  if (size > 0 && !f.read(out.data(), size)) return {errc::io_error, path + ": read failed"};
  return ok_status();
}

// A text file for the corpus: must exist, be non-empty and be valid UTF-8.
inline status read_text_file(const std::string& path, std::string& out) {
  KD_TRY(read_file(path, out));
  if (out.empty()) return {errc::empty_input, path + ": empty file"};
  return validate_utf8(out, path);
}

}  // namespace kd::text

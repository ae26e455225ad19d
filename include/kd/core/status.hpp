// kd/core/status.hpp: error reporting shared by every backend.
//
// Loss entry points return a kd::status (CUB style) so a CUDA backend, which cannot throw from device
// code and must not synchronise to report, has the same call shape as the CPU reference. Callers that
// prefer exceptions wrap a call in kd::check(), which throws kd::error carrying the same message.
#pragma once

#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>

namespace kd {

enum class errc {
  ok = 0,
  shape_mismatch,    // extents or strides of two tensors disagree
  empty_input,       // zero tokens / zero vocabulary
  invalid_argument,  // a parameter outside its domain (temperature <= 0, beta outside [0, 1], ...)
  out_of_range,      // an id outside the vocabulary, a layer or head index past the end
  non_finite,        // NaN or Inf in an input or a result
  misaligned,        // a pointer that the backend cannot use (CUDA vector loads)
  backend_error,     // the backend itself failed (CUDA runtime, cuBLAS)
  io_error,          // a file could not be read or is corrupt
};

constexpr std::string_view to_string(errc e) noexcept {
  switch (e) {
    case errc::ok: return "ok";
    case errc::shape_mismatch: return "shape mismatch";
    case errc::empty_input: return "empty input";
    case errc::invalid_argument: return "invalid argument";
    case errc::out_of_range: return "out of range";
    case errc::non_finite: return "non-finite value";
    case errc::misaligned: return "misaligned pointer";
    case errc::backend_error: return "backend error";
    case errc::io_error: return "i/o error";
  }
  return "unknown error";
}

// The result of a kd call: a code and, on failure, a message naming the tensor or parameter at fault.
class [[nodiscard]] status {
 public:
  status() = default;
  status(errc code, std::string message) : code_(code), message_(std::move(message)) {}

  [[nodiscard]] bool ok() const noexcept { return code_ == errc::ok; }
  explicit operator bool() const noexcept { return ok(); }
  [[nodiscard]] errc code() const noexcept { return code_; }
  [[nodiscard]] const std::string& message() const noexcept { return message_; }

 private:
  errc code_ = errc::ok;
  std::string message_;
};

inline status ok_status() { return {}; }

class error : public std::runtime_error {
 public:
  explicit error(const status& s)
      : std::runtime_error("kd: " + std::string(to_string(s.code())) + ": " + s.message()), code_(s.code()) {}
  [[nodiscard]] errc code() const noexcept { return code_; }

 private:
  errc code_;
};

// Throws kd::error when s is not ok; returns nothing otherwise.
inline void check(const status& s) {
  if (!s.ok()) throw error(s);
}

}  // namespace kd

// Propagates a failed status out of the enclosing function.
#define KD_TRY(expr)                          \
  do {                                        \
    ::kd::status kd_try_status_ = (expr);     \
    if (!kd_try_status_.ok()) return kd_try_status_; \
  } while (0)

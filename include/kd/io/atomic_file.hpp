// kd/io/atomic_file.hpp: kd's one way to write a file so that readers never see a torn one.
//
// write_file_atomic(path, produce) creates a fresh temporary file next to `path` (same directory, so the
// final rename stays on one filesystem), lets `produce(sink)` write the contents through
// sink(const void* p, std::size_t n) -> bool, flushes and fsyncs it, renames it over `path` and fsyncs the
// directory so the rename itself survives a crash. On any failure before the rename the temporary file
// is removed and `path` keeps its previous contents (or stays absent). Errors are errc::io_error naming
// `path`, the step and the OS error: "cannot write 'a/model.safetensors': cannot create
// 'a/model.safetensors.tmp-12-34-0': No such file or directory".
#pragma once

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstdio>
#include <filesystem>
#include <string>
#include <string_view>
#include <system_error>
#include <type_traits>
#include <utility>

#include <kd/core/status.hpp>

#if defined(__unix__) || defined(__APPLE__)
#include <fcntl.h>
#include <unistd.h>
#define KD_IO_POSIX 1
#else
#define KD_IO_POSIX 0
#endif

namespace kd::io {

namespace detail {

inline std::string errno_message(int e) { return std::error_code(e, std::generic_category()).message(); }

// A temp-file suffix unlikely to collide across processes and calls (creation is exclusive anyway).
inline std::string temp_suffix() {
  static std::atomic<unsigned long long> counter{0};
  std::string s = ".tmp-";
#if KD_IO_POSIX
  s += std::to_string(static_cast<long long>(::getpid()));
  s += '-';
#endif
  s += std::to_string(static_cast<unsigned long long>(
      std::chrono::steady_clock::now().time_since_epoch().count() & 0xffffffffull));
  s += '-';
  s += std::to_string(counter.fetch_add(1));
  return s;
}

// Best effort: some filesystems cannot open or fsync a directory, and the rename has already happened.
inline void sync_directory_of(const std::string& path) {
#if KD_IO_POSIX
  const std::filesystem::path dir = std::filesystem::path(path).parent_path();
  const int dfd = ::open(dir.empty() ? "." : dir.c_str(), O_RDONLY);
  if (dfd >= 0) {
    (void)::fsync(dfd);
    ::close(dfd);
  }
#else
  (void)path;
#endif
}

}  // namespace detail

// produce(sink) -> bool writes the contents through sink(const void*, std::size_t) -> bool and returns
// false when a sink call failed (or it gives up: then nothing is replaced either).
template <class Produce>
  requires(!std::is_convertible_v<Produce, std::string_view>)
status write_file_atomic(const std::string& path, Produce&& produce) {
  std::string tmp;
  std::FILE* f = nullptr;
  for (int attempt = 0; attempt < 16 && f == nullptr; ++attempt) {
    tmp = path + detail::temp_suffix();
    errno = 0;
    f = std::fopen(tmp.c_str(), "wbx");  // exclusive: never truncates someone else's file
    if (f == nullptr && errno != EEXIST) break;
  }
  if (f == nullptr)
    return {errc::io_error, "cannot write '" + path + "': cannot create '" + tmp + "': " + detail::errno_message(errno)};

  auto abandon = [&](const std::string& what, int err) {
    if (f != nullptr) std::fclose(f);
    std::error_code ignored;
    std::filesystem::remove(tmp, ignored);
    return status{errc::io_error, "cannot write '" + path + "': " + what + (err ? ": " + detail::errno_message(err) : "")};
  };
  errno = 0;
  const bool written = produce([&](const void* p, std::size_t n) { return n == 0 || std::fwrite(p, 1, n, f) == n; });
  if (!written) {
    const int e = errno;
    return abandon("writing '" + tmp + "' failed", e);
  }
  if (std::fflush(f) != 0) {
    const int e = errno;
    return abandon("flushing '" + tmp + "' failed", e);
  }
#if KD_IO_POSIX
  if (::fsync(::fileno(f)) != 0) {
    const int e = errno;
    return abandon("fsync of '" + tmp + "' failed", e);
  }
#endif
  const int close_rc = std::fclose(f);
  const int close_errno = errno;
  f = nullptr;
  if (close_rc != 0) return abandon("closing '" + tmp + "' failed", close_errno);

  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) return abandon("renaming '" + tmp + "' over it failed: " + ec.message(), 0);
  detail::sync_directory_of(path);
  return {};
}

// The whole contents at once.
inline status write_file_atomic(const std::string& path, std::string_view bytes) {
  return write_file_atomic(path, [bytes](auto&& sink) { return sink(bytes.data(), bytes.size()); });
}

}  // namespace kd::io

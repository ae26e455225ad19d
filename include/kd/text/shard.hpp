#pragma once
// Token shards: a text's encoding cached on disk and memory-mapped. Layout (little-endian):
//   64-byte header: "KDSHARD1", u32 version (1), u32 zero, u64 tokenizer hash, u64 text hash (FNV-1a 64),
//   u64 token count N, u64 text bytes, 16 zero bytes;
//   then u32 ids[N], u32 begin[N], u32 end[N] (byte offsets of each token in the text).
// open_or_build_shard() rebuilds the file when the tokenizer or the text changed (either hash differs),
// writing a temporary file and renaming it, so a reader never sees half a shard. POSIX (mmap).

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <bit>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <span>
#include <string>
#include <string_view>

#include <kd/core/status.hpp>
#include <kd/text/tokenizer.hpp>

namespace kd::text {

static_assert(std::endian::native == std::endian::little, "kd::text shards are little-endian; add byte swaps here");

struct shard_header {
  char magic[8];
  std::uint32_t version;
  std::uint32_t zero;
  std::uint64_t tokenizer_hash;
  std::uint64_t text_hash;
  std::uint64_t count;
  std::uint64_t text_bytes;
  std::uint64_t pad[2];
};
static_assert(sizeof(shard_header) == 64);

inline std::uint64_t text_hash(std::string_view text) { return detail::fnv1a(text); }

inline status write_shard(const std::string& path, std::uint64_t tokenizer_hash, std::uint64_t text_hash_,
                          std::uint64_t text_bytes, const encoding& e) {
  shard_header h{};
  std::memcpy(h.magic, "KDSHARD1", 8);
  h.version = 1;
  h.tokenizer_hash = tokenizer_hash;
  h.text_hash = text_hash_;
  h.count = e.ids.size();
  h.text_bytes = text_bytes;
  const std::string tmp = path + ".tmp";
  std::FILE* f = std::fopen(tmp.c_str(), "wb");
  if (!f) return {errc::io_error, tmp + ": cannot create"};
  bool ok = std::fwrite(&h, sizeof h, 1, f) == 1;
  for (const auto* v : {&e.ids, &e.begin, &e.end})
    ok = ok && (v->empty() || std::fwrite(v->data(), 4, v->size(), f) == v->size());
  ok = (std::fclose(f) == 0) && ok;
  if (!ok || std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::remove(tmp.c_str());
    return {errc::io_error, path + ": write failed"};
  }
  return ok_status();
}

// A read-only memory-mapped shard.
class shard {
 public:
  shard() = default;
  shard(const shard&) = delete;
  shard& operator=(const shard&) = delete;
  shard(shard&& o) noexcept { *this = std::move(o); }
  shard& operator=(shard&& o) noexcept {
    if (this != &o) {
      unmap();
      std::swap(base_, o.base_);
      std::swap(size_, o.size_);
    }
    return *this;
  }
  ~shard() { unmap(); }

  status open(const std::string& path) {
    unmap();
    const int fd = ::open(path.c_str(), O_RDONLY);
    if (fd < 0) return {errc::io_error, path + ": cannot open"};
    struct stat st{};
    if (::fstat(fd, &st) != 0 || st.st_size < static_cast<off_t>(sizeof(shard_header))) {
      ::close(fd);
      return {errc::io_error, path + ": too short for a shard header"};
    }
    void* p = ::mmap(nullptr, static_cast<std::size_t>(st.st_size), PROT_READ, MAP_SHARED, fd, 0);
    ::close(fd);
    if (p == MAP_FAILED) return {errc::io_error, path + ": mmap failed"};
    base_ = static_cast<const unsigned char*>(p);
    size_ = static_cast<std::size_t>(st.st_size);
    const auto& h = header();
    if (std::memcmp(h.magic, "KDSHARD1", 8) != 0 || h.version != 1) {
      unmap();
      return {errc::io_error, path + ": not a kd token shard (version 1)"};
    }
    if (size_ != sizeof(shard_header) + 12 * h.count) {
      unmap();
      return {errc::io_error, path + ": size does not match its token count (truncated?)"};
    }
    return ok_status();
  }

  [[nodiscard]] const shard_header& header() const { return *reinterpret_cast<const shard_header*>(base_); }
  [[nodiscard]] std::size_t size() const { return base_ ? header().count : 0; }
  [[nodiscard]] std::span<const std::uint32_t> ids() const { return array(0); }
  [[nodiscard]] std::span<const std::uint32_t> begin() const { return array(1); }
  [[nodiscard]] std::span<const std::uint32_t> end() const { return array(2); }

 private:
  std::span<const std::uint32_t> array(std::size_t k) const {
    if (!base_) return {};
    return {reinterpret_cast<const std::uint32_t*>(base_ + sizeof(shard_header)) + k * size(), size()};
  }
  void unmap() {
    if (base_) ::munmap(const_cast<unsigned char*>(base_), size_);
    base_ = nullptr;
    size_ = 0;
  }
  const unsigned char* base_ = nullptr;
  std::size_t size_ = 0;
};

// Opens `path` if it holds this tokenizer's encoding of this text; otherwise encodes (on `threads`
// threads), writes and opens it. `rebuilt` tells which happened.
inline status open_or_build_shard(const std::string& path, const tokenizer& tok, std::string_view text, shard& out,
                                  bool* rebuilt = nullptr, unsigned threads = 0) {
  const std::uint64_t th = text_hash(text);
  if (out.open(path).ok() && out.header().tokenizer_hash == tok.hash() && out.header().text_hash == th &&
      out.header().text_bytes == text.size()) {
    if (rebuilt) *rebuilt = false;
    return ok_status();
  }
  out = shard();
  encoding e;
  KD_TRY(encode_parallel(tok, text, e, threads, path));
  KD_TRY(write_shard(path, tok.hash(), th, text.size(), e));
  if (rebuilt) *rebuilt = true;
  return out.open(path);
}

}  // namespace kd::text

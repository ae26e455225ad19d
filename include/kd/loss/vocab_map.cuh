// kd/loss/vocab_map.cuh: the device copy of a kd::vocab_map, cached in the CUDA context.
//
// The kernels read a map as CSR: for each support slot (student id) the teacher ids that map to it.
// The layout is built and uploaded once per context and map (keyed by the map's id through
// kd::cuda::context::cached_buffer), so a loss call never allocates or copies it again. Likewise the
// compact form of a teacher head through the map (linear_logit_kd with a kd::teacher_head).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

#include <kd/cuda/context.cuh>
#include <kd/loss/vocab_map.hpp>

namespace kd::cuda::detail {

// Device pointers into one cached buffer laid out as
// [support K | offsets K + 1 | teacher ids M | uncovered U | pad | covered bits], the last a bitmask of
// the support over the student's columns (bit c of word c / 32), from a 16-byte boundary and padded to
// one, so that the span kernel bulk-copies its columns' words.
struct device_map {
  const int* support = nullptr;      // [K] student id of each slot
  const int* offsets = nullptr;      // [K + 1] CSR offsets into teacher_ids
  const int* teacher_ids = nullptr;  // teacher ids grouped by slot
  const int* uncovered = nullptr;    // [U] the student ids no slot covers (their KD gradient is 0)
  const unsigned* covered_bits = nullptr;  // [covered_words(V)] bit c: student column c is a support id
  long long slots = 0;
  long long uncovered_count = 0;
};

// The bitmask's words for V student columns: a whole number of 16-byte vectors.
inline constexpr std::size_t covered_words(std::size_t v) { return (v + 127) / 128 * 4; }
// Where the bitmask starts, in ints from the buffer's start (a multiple of 4: 16 bytes).
inline constexpr std::size_t covered_bits_at(std::size_t k, std::size_t m, std::size_t u) {
  return (k + (k + 1) + m + u + 3) / 4 * 4;
}

// The bytes of a host array, as context::cached_buffer uploads them.
template <class T>
std::vector<unsigned char> host_bytes(const std::vector<T>& v) {
  std::vector<unsigned char> bytes(v.size() * sizeof(T));
  if (!bytes.empty()) std::memcpy(bytes.data(), v.data(), bytes.size());
  return bytes;
}

// The host image of that layout.
inline std::vector<unsigned char> device_map_image(const vocab_map& m) {
  const auto support = m.student_support();
  const std::size_t k = support.size(), n = static_cast<std::size_t>(m.size());
  std::vector<int> slot_of(static_cast<std::size_t>(m.student_vocab()), -1);
  for (std::size_t j = 0; j < k; ++j) slot_of[static_cast<std::size_t>(support[j])] = static_cast<int>(j);
  const std::size_t u = static_cast<std::size_t>(m.student_vocab()) - k;
  const std::size_t at = covered_bits_at(k, n, u);
  std::vector<int> all(at + covered_words(slot_of.size()), 0);
  int* off = all.data() + k;
  int* tids = off + k + 1;
  for (std::size_t j = 0; j < k; ++j) all[j] = support[j];
  for (auto s : m.student_ids()) ++off[slot_of[static_cast<std::size_t>(s)] + 1];
  for (std::size_t j = 0; j < k; ++j) off[j + 1] += off[j];
  std::vector<int> fill(off, off + k);
  for (std::size_t e = 0; e < n; ++e)
    tids[fill[static_cast<std::size_t>(slot_of[static_cast<std::size_t>(m.student_ids()[e])])]++] = m.teacher_ids()[e];
  int* unc = tids + n;
  for (std::size_t c = 0; c < slot_of.size(); ++c)
    if (slot_of[c] < 0) *unc++ = static_cast<int>(c);
  auto* bits = reinterpret_cast<unsigned*>(all.data() + at);
  for (std::size_t j = 0; j < k; ++j) {
    const auto c = static_cast<std::size_t>(support[j]);
    bits[c / 32] |= 1u << (c % 32);
  }
  return host_bytes(all);
}

// The tags of the device buffers cached under a map's id (context::cached_buffer).
inline constexpr unsigned kMapImageTag = 0, kCompactHeadRowsTag = 1;

// The map's device copy, uploaded on first use in this context.
inline status upload_map(context& ctx, const vocab_map& m, device_map& out) {
  const void* buf = nullptr;
  KD_TRY(ctx.cached_buffer(m.id(), [&] { return device_map_image(m); }, buf, kMapImageTag));
  const auto k = static_cast<long long>(m.student_support().size());
  out.support = static_cast<const int*>(buf);
  out.offsets = out.support + k;
  out.teacher_ids = out.offsets + k + 1;
  out.uncovered = out.teacher_ids + m.size();
  out.covered_bits = reinterpret_cast<const unsigned*>(
      out.support + covered_bits_at(static_cast<std::size_t>(k), static_cast<std::size_t>(m.size()),
                                    static_cast<std::size_t>(m.student_vocab() - k)));
  out.slots = k;
  out.uncovered_count = static_cast<long long>(m.student_vocab()) - k;
  return {};
}

// A teacher LM head's compact form through a map (vocab_map::compact_teacher): the map onto the K mapped
// head rows in the student's order, padded to a multiple of kCompactHeadRows, and those rows' teacher ids on
// the device. Built once per context and map (the host work sorts the map's pairs).
struct compact_head {
  vocab_map map;                       // onto the compact rows (teacher vocabulary: the padded count)
  const std::int32_t* rows = nullptr;  // [map.size()] device: the full head's row of each compact row
};
// The padding of the compact rows: 8 keeps a 16-bit logit row's stride a multiple of 16 bytes (cuBLAS's
// tensor-core kernels need it); the padding rows are zeros that no slot reads.
inline constexpr index_t kCompactHeadRows = 8;

inline status compact_head_of(context& ctx, const vocab_map& m, const compact_head*& out) {
  return ctx.cached_object<compact_head>(m.id(), [&](compact_head& c) -> status {
    std::vector<std::int32_t> rows;
    KD_TRY(m.compact_teacher(kCompactHeadRows, c.map, rows));
    const void* buf = nullptr;
    KD_TRY(ctx.cached_buffer(m.id(), [&] { return host_bytes(rows); }, buf, kCompactHeadRowsTag));
    c.rows = static_cast<const std::int32_t*>(buf);
    return {};
  }, out);
}

}  // namespace kd::cuda::detail

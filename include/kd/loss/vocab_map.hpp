// kd/loss/vocab_map.hpp: a sparse teacher-vocabulary -> student-vocabulary map.
//
// Teacher and student tokenizers differ (Qwen3: 151,669 tokens padded to 151,936 rows; GPT-2: 50,257
// padded to 50,304). Distillation compares distributions only over tokens both sides can name. The map
// is a list of (teacher id, student id) pairs, usually built from identical token strings (the two
// byte-level BPEs share ~42k strings). Several teacher ids may map to one student id; their probabilities
// add. Padded rows have no string, so they are never mapped: a padded teacher row contributes
// probability 0 (logit -inf), never the probability of a zero logit.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include <kd/core/status.hpp>
#include <kd/core/tensor.hpp>

namespace kd {

class vocab_map {
 public:
  vocab_map() = default;

  // Pairs (teacher id, student id); teacher_vocab / student_vocab are the row counts of the two
  // embeddings (padding included). Every id must lie inside its vocabulary; a teacher id appears once.
  static status from_pairs(std::vector<std::pair<std::int32_t, std::int32_t>> pairs, index_t teacher_vocab,
                           index_t student_vocab, vocab_map& out) {
    if (teacher_vocab <= 0 || student_vocab <= 0)
      return {errc::empty_input, "vocab_map needs non-empty teacher and student vocabularies"};
    if (teacher_vocab > std::numeric_limits<std::int32_t>::max() ||
        student_vocab > std::numeric_limits<std::int32_t>::max())
      return {errc::out_of_range, "vocab_map vocabularies must fit 32-bit ids"};
    std::sort(pairs.begin(), pairs.end());
    vocab_map m;
    m.id_ = next_id();
    m.teacher_vocab_ = teacher_vocab;
    m.student_vocab_ = student_vocab;
    m.teacher_ids_.reserve(pairs.size());
    m.student_ids_.reserve(pairs.size());
    for (std::size_t i = 0; i < pairs.size(); ++i) {
      const auto [t, s] = pairs[i];
      if (t < 0 || t >= teacher_vocab)
        return {errc::out_of_range, "vocab_map teacher id " + std::to_string(t) + " is outside [0, " +
                                        std::to_string(teacher_vocab) + ")"};
      if (s < 0 || s >= student_vocab)
        return {errc::out_of_range, "vocab_map student id " + std::to_string(s) + " (from teacher id " +
                                        std::to_string(t) + ") points past the student vocabulary of " +
                                        std::to_string(student_vocab)};
      if (i > 0 && pairs[i - 1].first == t)
        return {errc::invalid_argument, "vocab_map maps teacher id " + std::to_string(t) + " twice"};
      m.teacher_ids_.push_back(t);
      m.student_ids_.push_back(s);
    }
    m.support_ = m.student_ids_;
    std::sort(m.support_.begin(), m.support_.end());
    m.support_.erase(std::unique(m.support_.begin(), m.support_.end()), m.support_.end());
    m.contiguous_ = !m.teacher_ids_.empty();
    for (std::size_t i = 0; i < m.teacher_ids_.size() && m.contiguous_; ++i)
      m.contiguous_ = m.teacher_ids_[i] == static_cast<std::int32_t>(i) && (i == 0 || m.student_ids_[i] > m.student_ids_[i - 1]);
    out = std::move(m);
    return {};
  }

  // Maps every teacher token whose string appears in the student vocabulary. teacher_tokens[i] is the
  // string of teacher id i (teacher_tokens.size() <= teacher_vocab: rows past it are padding).
  static status from_tokens(std::span<const std::string> teacher_tokens, std::span<const std::string> student_tokens,
                            index_t teacher_vocab, index_t student_vocab, vocab_map& out) {
    if (static_cast<index_t>(teacher_tokens.size()) > teacher_vocab)
      return {errc::shape_mismatch, "vocab_map: " + std::to_string(teacher_tokens.size()) +
                                        " teacher tokens do not fit " + std::to_string(teacher_vocab) + " rows"};
    if (static_cast<index_t>(student_tokens.size()) > student_vocab)
      return {errc::shape_mismatch, "vocab_map: " + std::to_string(student_tokens.size()) +
                                        " student tokens do not fit " + std::to_string(student_vocab) + " rows"};
    std::unordered_map<std::string_view, std::int32_t> student_index;
    student_index.reserve(student_tokens.size());
    for (std::size_t j = 0; j < student_tokens.size(); ++j) {
      if (!student_index.emplace(student_tokens[j], static_cast<std::int32_t>(j)).second)
        return {errc::invalid_argument, "vocab_map: the student vocabulary holds the token string of id " +
                                            std::to_string(j) + " twice"};
    }
    std::vector<std::pair<std::int32_t, std::int32_t>> pairs;
    for (std::size_t i = 0; i < teacher_tokens.size(); ++i) {
      if (auto it = student_index.find(teacher_tokens[i]); it != student_index.end())
        pairs.emplace_back(static_cast<std::int32_t>(i), it->second);
    }
    return from_pairs(std::move(pairs), teacher_vocab, student_vocab, out);
  }

  // Unique per built map (maps are immutable once built): device backends cache uploads by it.
  [[nodiscard]] std::uint64_t id() const noexcept { return id_; }
  [[nodiscard]] index_t teacher_vocab() const noexcept { return teacher_vocab_; }
  [[nodiscard]] index_t student_vocab() const noexcept { return student_vocab_; }
  [[nodiscard]] index_t size() const noexcept { return static_cast<index_t>(teacher_ids_.size()); }
  [[nodiscard]] bool empty() const noexcept { return teacher_ids_.empty(); }
  // Pairs sorted by teacher id.
  [[nodiscard]] std::span<const std::int32_t> teacher_ids() const noexcept { return teacher_ids_; }
  [[nodiscard]] std::span<const std::int32_t> student_ids() const noexcept { return student_ids_; }
  // Sorted distinct student ids that some teacher id maps to: where the aligned distributions live.
  [[nodiscard]] std::span<const std::int32_t> student_support() const noexcept { return support_; }
  // Teacher ids 0..K-1 map one to one, in order, onto increasing student ids: support slot j reads teacher
  // column j, so a kernel reads the teacher row as one contiguous slice (a compact teacher head laid out
  // in the student's order, as kd::train::distill_step builds it).
  [[nodiscard]] bool contiguous_teacher() const noexcept { return contiguous_; }

  // Applies the map to one row of teacher probabilities (teacher_vocab entries): student_probs
  // (student_vocab entries) receives the summed mass of the teacher ids mapped to each student id and 0
  // elsewhere. If renormalize, the result sums to 1 over the support. Returns the mapped mass before
  // renormalization (the teacher probability that the student vocabulary can express).
  template <class A>
  A project_probabilities(std::span<const A> teacher_probs, std::span<A> student_probs, bool renormalize) const {
    std::fill(student_probs.begin(), student_probs.end(), A(0));
    A mass = A(0);
    for (std::size_t k = 0; k < teacher_ids_.size(); ++k) {
      const A p = teacher_probs[static_cast<std::size_t>(teacher_ids_[k])];
      student_probs[static_cast<std::size_t>(student_ids_[k])] += p;
      mass += p;
    }
    if (renormalize && mass > A(0))
      for (auto s : support_) student_probs[static_cast<std::size_t>(s)] /= mass;
    return mass;
  }

  // The map onto a compact teacher head. With a map, KD reads only the mapped teacher columns (the
  // teacher's distribution is renormalized over them), so a teacher given by its hidden states and LM head
  // needs only the head rows of the mapped ids: 42,257 of 151,936 for Qwen3 -> GPT-2, 3.6x less of the
  // teacher's head GEMM. Compact column k holds teacher row teacher_rows[k]: the mapped teacher ids in the
  // order of their student ids (ties by teacher id), K of them, and the compact vocabulary is K rounded up
  // to a multiple of row_multiple (padding columns, never mapped: with 64, a 16-bit logit row's stride is
  // a multiple of 16 bytes, as cuBLAS's tensor-core kernels and the bulk copies want). `out` maps compact
  // column k to the student id of teacher_rows[k]; for a one-to-one map it is contiguous_teacher(), the
  // kernels' fastest map (one bulk copy a teacher row slice), and in general its teacher columns follow
  // the student order. KD over the head rows gathered this way (kd::teacher_head, or logits) with `out`
  // gives the loss and gradients of the full head with this map (kd::train::distill_step's teacher).
  status compact_teacher(index_t row_multiple, vocab_map& out, std::vector<std::int32_t>& teacher_rows) const {
    if (empty()) return {errc::empty_input, "vocab_map::compact_teacher: the map maps no token"};
    if (row_multiple <= 0)
      return {errc::invalid_argument, "vocab_map::compact_teacher: row_multiple must be positive (got " +
                                          std::to_string(row_multiple) + ")"};
    std::vector<std::size_t> order(teacher_ids_.size());
    for (std::size_t e = 0; e < order.size(); ++e) order[e] = e;
    // Pairs are sorted by teacher id, so a stable sort by student id breaks ties by teacher id.
    std::stable_sort(order.begin(), order.end(),
                     [&](std::size_t a, std::size_t c) { return student_ids_[a] < student_ids_[c]; });
    std::vector<std::int32_t> rows(order.size());
    std::vector<std::pair<std::int32_t, std::int32_t>> pairs(order.size());
    for (std::size_t e = 0; e < order.size(); ++e) {
      rows[e] = teacher_ids_[order[e]];
      pairs[e] = {static_cast<std::int32_t>(e), student_ids_[order[e]]};
    }
    const index_t k = size(), padded = (k + row_multiple - 1) / row_multiple * row_multiple;
    KD_TRY(from_pairs(std::move(pairs), padded, student_vocab_, out));
    teacher_rows = std::move(rows);
    return {};
  }

  // Checks that the map fits logits of the given widths.
  status check_fits(index_t teacher_cols, index_t student_cols) const {
    if (teacher_cols != teacher_vocab_)
      return {errc::shape_mismatch, "teacher logits have " + std::to_string(teacher_cols) +
                                        " columns but the vocab_map was built for " + std::to_string(teacher_vocab_)};
    if (student_cols != student_vocab_)
      return {errc::shape_mismatch, "student logits have " + std::to_string(student_cols) +
                                        " columns but the vocab_map was built for " + std::to_string(student_vocab_)};
    if (empty()) return {errc::empty_input, "the vocab_map maps no token"};
    return {};
  }

 private:
  static std::uint64_t next_id() {
    static std::atomic<std::uint64_t> counter{1};
    return counter.fetch_add(1, std::memory_order_relaxed);
  }

  std::uint64_t id_ = 0;
  index_t teacher_vocab_ = 0;
  index_t student_vocab_ = 0;
  std::vector<std::int32_t> teacher_ids_;
  std::vector<std::int32_t> student_ids_;
  std::vector<std::int32_t> support_;
  bool contiguous_ = false;
};

}  // namespace kd

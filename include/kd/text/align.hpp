#pragma once
// Cross-tokenizer alignment of a teacher and a student tokenization of the same text.
//
// Position j of a token stream predicts token j + 1 from the bytes [0, end[j]). A teacher position i and
// a student position j are ALIGNED when both contexts end at the same byte and both next tokens cover the
// same bytes: t_end[i] == s_end[j] and t_end[i + 1] == s_end[j + 1]. Then the next tokens are the same
// string, so (when the vocab_map holds that string) the teacher's distribution speaks about the same
// event as the student's.
//
// Rule for positions that do not align: they are SKIPPED by the KD losses (their student rows get no
// teacher target; the LM loss still covers them). Merging the teacher's probabilities over a span (as
// TRL's GOLD does) is not done here.
//
// Numerals: Qwen3 splits digits one per token, GPT-2 has multi-digit tokens ("123", " 19"). A student
// position whose next token has two or more digits never aligns (the teacher's next token is one digit),
// and no multi-digit GPT-2 token is in the shared-string map; numeral_report() measures both.

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include <kd/core/status.hpp>
#include <kd/loss/vocab_map.hpp>
#include <kd/text/tokenizer.hpp>

namespace kd::text {

struct aligned_pairs {
  std::vector<std::uint32_t> teacher;  // teacher positions i
  std::vector<std::uint32_t> student;  // student positions j, ascending
};

// Aligned positions of two tokenizations given their tokens' end offsets (non-decreasing, same text).
// Appends to `out`; the last token of either stream has no next token and never aligns.
inline status align_positions(std::span<const std::uint32_t> t_end, std::span<const std::uint32_t> s_end,
                              aligned_pairs& out) {
  std::size_t i = 0, j = 0;
  while (i + 1 < t_end.size() && j + 1 < s_end.size()) {
    if (t_end[i] < s_end[j]) { ++i; continue; }
    if (s_end[j] < t_end[i]) { ++j; continue; }
    if (t_end[i + 1] == s_end[j + 1]) {
      out.teacher.push_back(static_cast<std::uint32_t>(i));
      out.student.push_back(static_cast<std::uint32_t>(j));
    }
    ++i;
    ++j;
  }
  return ok_status();
}

// Fraction of positions whose context ends on a byte where both streams have a token boundary.
inline double shared_boundary_fraction(std::span<const std::uint32_t> t_end, std::span<const std::uint32_t> s_end) {
  std::size_t i = 0, j = 0, shared = 0;
  while (i < t_end.size() && j < s_end.size()) {
    if (t_end[i] < s_end[j]) ++i;
    else if (s_end[j] < t_end[i]) ++j;
    else { ++shared; ++i; ++j; }
  }
  return s_end.empty() ? 0.0 : static_cast<double>(shared) / static_cast<double>(s_end.size());
}

// The vocab_map from identical token byte strings (regular and added tokens) of the two tokenizers;
// teacher_rows / student_rows are the embedding row counts (padding included, e.g. 151,936 / 50,304).
inline status shared_token_map(const tokenizer& teacher, const tokenizer& student, index_t teacher_rows,
                               index_t student_rows, vocab_map& out) {
  std::vector<std::string> t(teacher.vocab_size()), s(student.vocab_size());
  for (std::uint32_t i = 0; i < t.size(); ++i) t[i] = teacher.token_bytes(i);
  for (std::uint32_t i = 0; i < s.size(); ++i) s[i] = student.token_bytes(i);
  return vocab_map::from_tokens(t, s, teacher_rows, student_rows, out);
}

struct numeral_stats {
  std::size_t student_digit_tokens = 0;        // student vocabulary entries with a digit
  std::size_t student_multi_digit_tokens = 0;  // ... with two or more digits
  std::size_t multi_digit_mapped = 0;          // ... of those, in the map (expected 0 for Qwen3 -> GPT-2)
  std::size_t teacher_multi_digit_tokens = 0;  // teacher vocabulary entries with two or more digits
  std::size_t digit_positions = 0;             // student positions whose next token has a digit
  std::size_t digit_positions_aligned = 0;     // ... of those, aligned
};

inline std::size_t count_digits(std::string_view s) {
  std::size_t n = 0;
  for (char c : s) n += (c >= '0' && c <= '9');
  return n;
}

inline numeral_stats numeral_report(const tokenizer& teacher, const tokenizer& student, const vocab_map& map,
                                    std::span<const std::uint32_t> student_ids, const aligned_pairs& pairs) {
  numeral_stats r;
  std::vector<char> mapped(student.vocab_size(), 0);
  for (auto sid : map.student_ids())
    if (static_cast<std::size_t>(sid) < mapped.size()) mapped[static_cast<std::size_t>(sid)] = 1;
  for (std::uint32_t i = 0; i < student.vocab_size(); ++i) {
    const auto d = count_digits(student.token_bytes(i));
    r.student_digit_tokens += d > 0;
    r.student_multi_digit_tokens += d > 1;
    r.multi_digit_mapped += d > 1 && mapped[i];
  }
  for (std::uint32_t i = 0; i < teacher.vocab_size(); ++i) r.teacher_multi_digit_tokens += count_digits(teacher.token_bytes(i)) > 1;
  std::size_t k = 0;
  for (std::size_t j = 0; j + 1 < student_ids.size(); ++j) {
    while (k < pairs.student.size() && pairs.student[k] < j) ++k;
    if (count_digits(student.token_bytes(student_ids[j + 1])) == 0) continue;
    ++r.digit_positions;
    r.digit_positions_aligned += k < pairs.student.size() && pairs.student[k] == j;
  }
  return r;
}

}  // namespace kd::text

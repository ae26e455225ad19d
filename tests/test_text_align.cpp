// Cross-tokenizer alignment: the rule on hand-made offsets, the shared-string vocab_map of Qwen3 and
// GPT-2 (42,256 regular strings + <|endoftext|>, counted independently from the JSON files), and the
// numeral behaviour (multi-digit GPT-2 tokens never align and are never mapped).
#include <doctest/doctest.h>

#include <cstdlib>
#include <string>

#include <kd/text/align.hpp>

namespace {
std::string data_dir() {
  const char* env = std::getenv("KD_TEXT_DATA");
  return env ? env : KD_TEXT_DATA_DIR;
}
}  // namespace

TEST_CASE("align_positions: same context end and same next span") {
  // Text "abcdef". Teacher tokens: ab|c|def ; student: ab|cd|ef.
  const std::vector<std::uint32_t> t{2, 3, 6}, s{2, 4, 6};
  kd::text::aligned_pairs p;
  REQUIRE(kd::text::align_positions(t, s, p).ok());
  CHECK(p.teacher.empty());  // position 0: both end at 2 but next spans are [2,3) vs [2,4)
  // Teacher: ab|cd|e|f ; student: ab|cd|ef -> position 0 aligns (next "cd" both), 1 does not.
  const std::vector<std::uint32_t> t2{2, 4, 5, 6};
  REQUIRE(kd::text::align_positions(t2, s, p).ok());
  CHECK(p.teacher == std::vector<std::uint32_t>{0});
  CHECK(p.student == std::vector<std::uint32_t>{0});
  CHECK(kd::text::shared_boundary_fraction(t2, s) == doctest::Approx(1.0));
  CHECK(kd::text::shared_boundary_fraction(t, s) == doctest::Approx(2.0 / 3.0));
  // Identical streams: every position but the last aligns with itself.
  kd::text::aligned_pairs q;
  REQUIRE(kd::text::align_positions(s, s, q).ok());
  CHECK(q.student == std::vector<std::uint32_t>{0, 1});
}

TEST_CASE("qwen3 -> gpt2: shared strings, alignment on real text, numerals") {
  kd::text::tokenizer qwen3, gpt2;
  kd::check(kd::text::load_tokenizer("qwen3", data_dir(), qwen3));
  kd::check(kd::text::load_tokenizer("gpt2", data_dir(), gpt2));
  kd::vocab_map map;
  REQUIRE(kd::text::shared_token_map(qwen3, gpt2, 151936, 50304, map).ok());
  CHECK(map.size() == 42257);
  const std::string text = "And Jacob lived in the land of Egypt seventeen years: so the whole age of Jacob "
                           "was 147 years, and 1,000 talents in 2026.";
  kd::text::encoding t, s;
  REQUIRE(qwen3.encode(text, t).ok());
  REQUIRE(gpt2.encode(text, s).ok());
  kd::text::aligned_pairs p;
  REQUIRE(kd::text::align_positions(t.end, s.end, p).ok());
  REQUIRE(!p.student.empty());
  for (std::size_t k = 0; k < p.student.size(); ++k) {
    const auto i = p.teacher[k], j = p.student[k];
    // Aligned: the same next token string on both sides, so the map holds that pair.
    CHECK(qwen3.token_bytes(t.ids[i + 1]) == gpt2.token_bytes(s.ids[j + 1]));
  }
  const auto r = kd::text::numeral_report(qwen3, gpt2, map, s.ids, p);
  CHECK(r.student_multi_digit_tokens == 1671);  // counted from encoder.json independently
  CHECK(r.multi_digit_mapped == 0);
  CHECK(r.teacher_multi_digit_tokens == 0);
  CHECK(r.digit_positions >= 4);
  CHECK(r.digit_positions_aligned < r.digit_positions);
}

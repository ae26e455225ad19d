#pragma once
// The text corpus: documents from UTF-8 files or folders and the default corpus (the King James Bible
// exported by scripts/fetch_text_data.sh, and Jane Austen's six novels read from R's Rdata.rdb), and a
// reproducible train/validation split by document or by a fixed contiguous range.
//
// Rdata.rdb (R's lazy-load database) is a sequence of objects, each a big-endian u32 uncompressed length
// and a zlib stream of an R XDR serialization: "X\n", three ints (format version, R versions), for
// format 3 a length-prefixed native encoding name, then the object. Each novel is a STRSXP (type 16:
// count, then CHARSXPs, type 9: length, bytes; length -1 is NA), one element per line.

#include <zlib.h>

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

#include <kd/core/status.hpp>
#include <kd/text/utf8.hpp>

namespace kd::text {

struct document {
  std::string name;  // file path, or "janeaustenr:<title>"
  std::string text;
};

namespace detail {

struct xdr_reader {
  std::string_view d;
  std::size_t pos = 0;
  bool int32(std::int32_t& v) {
    if (pos + 4 > d.size()) return false;
    const auto* p = reinterpret_cast<const unsigned char*>(d.data() + pos);
    v = static_cast<std::int32_t>((std::uint32_t{p[0]} << 24) | (std::uint32_t{p[1]} << 16) |
                                  (std::uint32_t{p[2]} << 8) | p[3]);
    pos += 4;
    return true;
  }
  bool bytes(std::size_t n, std::string_view& out) {
    if (pos + n > d.size()) return false;
    out = d.substr(pos, n);
    pos += n;
    return true;
  }
};

// One serialized STRSXP -> its lines joined by '\n' (NA elements become empty lines).
inline status read_r_strings(std::string_view blob, const std::string& where, std::string& text) {
  xdr_reader r{blob};
  std::string_view magic;
  std::int32_t version = 0, rv = 0, minv = 0, flags = 0, count = 0;
  if (!r.bytes(2, magic) || magic != "X\n") return {errc::io_error, where + ": not an R XDR serialization"};
  if (!r.int32(version) || !r.int32(rv) || !r.int32(minv)) return {errc::io_error, where + ": truncated header"};
  if (version == 3) {
    std::int32_t n = 0;
    std::string_view enc;
    if (!r.int32(n) || n < 0 || !r.bytes(static_cast<std::size_t>(n), enc))
      return {errc::io_error, where + ": truncated encoding name"};
  } else if (version != 2) {
    return {errc::io_error, where + ": serialization format " + std::to_string(version) + " (expected 2 or 3)"};
  }
  if (!r.int32(flags) || (flags & 0xff) != 16 || !r.int32(count) || count < 0)
    return {errc::io_error, where + ": object is not a character vector"};
  text.clear();
  for (std::int32_t i = 0; i < count; ++i) {
    std::int32_t f = 0, len = 0;
    if (!r.int32(f) || (f & 0xff) != 9 || !r.int32(len))
      return {errc::io_error, where + ": element " + std::to_string(i) + " is not a string (byte offset " +
                                  std::to_string(r.pos) + ")"};
    if (len > 0) {
      std::string_view s;
      if (!r.bytes(static_cast<std::size_t>(len), s))
        return {errc::io_error, where + ": element " + std::to_string(i) + " truncated"};
      text += s;
    }
    text += '\n';
  }
  return ok_status();
}

}  // namespace detail

// Every character vector in an R lazy-load database (.rdb), one document per object, named
// "<prefix><first non-empty line>" (janeaustenr's novels start with their title).
inline status read_rdata_rdb(const std::string& path, const std::string& prefix, std::vector<document>& out) {
  std::string raw;
  KD_TRY(read_file(path, raw, "run scripts/fetch_text_data.sh corpus"));
  std::size_t pos = 0;
  int k = 0;
  while (pos < raw.size()) {
    const std::string where = path + " object " + std::to_string(k) + " (byte offset " + std::to_string(pos) + ")";
    if (pos + 4 > raw.size()) return {errc::io_error, where + ": truncated length"};
    const auto* p = reinterpret_cast<const unsigned char*>(raw.data() + pos);
    const std::uint32_t len = (std::uint32_t{p[0]} << 24) | (std::uint32_t{p[1]} << 16) | (std::uint32_t{p[2]} << 8) | p[3];
    std::string blob(len, '\0');
    z_stream z{};
    if (inflateInit(&z) != Z_OK) return {errc::io_error, where + ": zlib init failed"};
    z.next_in = reinterpret_cast<Bytef*>(raw.data() + pos + 4);
    z.avail_in = static_cast<uInt>(raw.size() - pos - 4);
    z.next_out = reinterpret_cast<Bytef*>(blob.data());
    z.avail_out = len;
    const int rc = inflate(&z, Z_FINISH);
    const std::size_t used = z.total_in, made = z.total_out;
    inflateEnd(&z);
    if (rc != Z_STREAM_END || made != len) return {errc::io_error, where + ": corrupt zlib stream"};
    document d;
    KD_TRY(detail::read_r_strings(blob, where, d.text));
    KD_TRY(validate_utf8(d.text, where));
    std::string_view t(d.text);
    while (!t.empty() && t.front() == '\n') t.remove_prefix(1);
    d.name = prefix + std::string(t.substr(0, std::min(t.find('\n'), std::size_t{60})));
    out.push_back(std::move(d));
    pos += 4 + used;
    ++k;
  }
  if (out.empty()) return {errc::empty_input, path + ": no objects"};
  return ok_status();
}

// A UTF-8 file, or every regular file under a folder (sorted by path, so the order is reproducible).
inline status read_documents(const std::string& path, std::vector<document>& out) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (fs::is_directory(path, ec)) {
    std::vector<std::string> files;
    for (auto it = fs::recursive_directory_iterator(path, ec); !ec && it != fs::recursive_directory_iterator();
         it.increment(ec))
      if (it->is_regular_file()) files.push_back(it->path().string());
    if (ec) return {errc::io_error, path + ": cannot list: " + ec.message()};
    if (files.empty()) return {errc::empty_input, path + ": folder has no files"};
    std::sort(files.begin(), files.end());
    for (const auto& f : files) KD_TRY(read_documents(f, out));
    return ok_status();
  }
  if (!fs::exists(path, ec)) return {errc::io_error, path + ": no such file or folder"};
  document d{path, {}};
  KD_TRY(read_text_file(path, d.text));
  out.push_back(std::move(d));
  return ok_status();
}

// The default corpus from the fetched data folder: the KJV, then the six novels.
inline status default_corpus(const std::string& data_dir, std::vector<document>& out) {
  const std::string kjv = data_dir + "/corpus/kjv.txt";
  std::error_code ec;
  if (!std::filesystem::exists(kjv, ec))
    return {errc::io_error, kjv + ": missing (run scripts/fetch_text_data.sh corpus)"};
  KD_TRY(read_documents(kjv, out));
  out.back().name = "kjv";
  return read_rdata_rdb(data_dir + "/corpus/deb/r-cran-janeaustenr/usr/lib/R/site-library/janeaustenr/data/Rdata.rdb",
                        "janeaustenr:", out);
}

// Train/validation split, never random by line. by_document: the named documents are validation.
// tail_range: the last `fraction` of every document's bytes is validation (a cut inside a line moves to
// the next line start). describe() records the split for the manifest.
struct split_spec {
  enum kind_t { tail_range, by_document } kind = tail_range;
  double fraction = 0.02;
  std::vector<std::string> validation_docs;
  [[nodiscard]] std::string describe() const {
    if (kind == tail_range) return "tail_range fraction=" + std::to_string(fraction);
    std::string s = "by_document validation=";
    for (std::size_t i = 0; i < validation_docs.size(); ++i) s += (i ? "," : "") + validation_docs[i];
    return s;
  }
};

// Joins documents (each ending in '\n') into the train and validation texts.
inline status split_corpus(const std::vector<document>& docs, const split_spec& spec, std::string& train,
                           std::string& valid) {
  if (docs.empty()) return {errc::empty_input, "no documents"};
  if (spec.kind == split_spec::tail_range && !(spec.fraction > 0 && spec.fraction < 1))
    return {errc::invalid_argument, "split fraction must be in (0, 1)"};
  auto append = [](std::string& to, std::string_view s) {
    to += s;
    if (!s.empty() && s.back() != '\n') to += '\n';
  };
  for (const auto& v : spec.validation_docs)
    if (std::none_of(docs.begin(), docs.end(), [&](const document& d) { return d.name == v; }))
      return {errc::invalid_argument, "validation document '" + v + "' is not in the corpus"};
  for (const auto& d : docs) {
    if (spec.kind == split_spec::by_document) {
      const bool val = std::find(spec.validation_docs.begin(), spec.validation_docs.end(), d.name) !=
                       spec.validation_docs.end();
      append(val ? valid : train, d.text);
      continue;
    }
    std::size_t cut = static_cast<std::size_t>(static_cast<double>(d.text.size()) * (1.0 - spec.fraction));
    const std::size_t nl = cut == 0 ? std::string::npos : d.text.find('\n', cut - 1);  // a line start stays
    cut = cut == 0 ? 0 : nl == std::string::npos ? d.text.size() : nl + 1;
    append(train, std::string_view(d.text).substr(0, cut));
    append(valid, std::string_view(d.text).substr(cut));
  }
  if (train.empty()) return {errc::empty_input, "the split leaves no training text"};
  if (valid.empty()) return {errc::empty_input, "the split leaves no validation text"};
  return ok_status();
}

}  // namespace kd::text

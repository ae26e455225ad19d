// Corpus reading (files, folders, R's Rdata.rdb), bad input errors with file and byte offset, the
// train/validation split, parallel encoding equal to serial encoding, token shards rebuilt on change,
// and the default corpus's token counts.
#include <doctest/doctest.h>

#include <zlib.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>

#include <kd/text/corpus.hpp>
#include <kd/text/shard.hpp>

namespace fs = std::filesystem;

namespace {

std::string data_dir() {
  const char* env = std::getenv("KD_TEXT_DATA");
  return env ? env : KD_TEXT_DATA_DIR;
}

fs::path temp_dir(const char* name) {
  auto d = fs::temp_directory_path() / ("kd_text_test_" + std::string(name) + "_" + std::to_string(::getpid()));
  fs::remove_all(d);
  fs::create_directories(d);
  return d;
}

void write(const fs::path& p, const std::string& s) { std::ofstream(p, std::ios::binary) << s; }

void be32(std::string& s, std::int32_t v) {
  const auto u = static_cast<std::uint32_t>(v);
  for (int k = 3; k >= 0; --k) s.push_back(static_cast<char>((u >> (8 * k)) & 0xff));
}

// An R XDR serialization (format 3) of a character vector, written by the format's definition.
std::string r_strings(const std::vector<const char*>& v) {
  std::string s = "X\n";
  be32(s, 3); be32(s, 0x040201); be32(s, 0x030500);
  be32(s, 5); s += "UTF-8";
  be32(s, 16); be32(s, static_cast<std::int32_t>(v.size()));
  for (const char* e : v) {
    be32(s, 0x00040009);
    if (!e) { be32(s, -1); continue; }
    be32(s, static_cast<std::int32_t>(std::strlen(e)));
    s += e;
  }
  return s;
}

std::string rdb_object(const std::string& blob) {
  std::string out;
  be32(out, static_cast<std::int32_t>(blob.size()));
  uLongf n = compressBound(blob.size());
  std::string z(n, '\0');
  REQUIRE(compress(reinterpret_cast<Bytef*>(z.data()), &n, reinterpret_cast<const Bytef*>(blob.data()), blob.size()) == Z_OK);
  return out + z.substr(0, n);
}

}  // namespace

TEST_CASE("Rdata.rdb: objects in sequence, lines joined, NA as an empty line") {
  const auto d = temp_dir("rdb");
  write(d / "a.rdb", rdb_object(r_strings({"PERSUASION", "", "Chapter 1", nullptr, "Sir Walter"})) +
                     rdb_object(r_strings({"EMMA", "caf\xc3\xa9"})));
  std::vector<kd::text::document> docs;
  REQUIRE(kd::text::read_rdata_rdb((d / "a.rdb").string(), "austen:", docs).ok());
  REQUIRE(docs.size() == 2);
  CHECK(docs[0].name == "austen:PERSUASION");
  CHECK(docs[0].text == "PERSUASION\n\nChapter 1\n\nSir Walter\n");
  CHECK(docs[1].name == "austen:EMMA");
  CHECK(docs[1].text == "EMMA\ncaf\xc3\xa9\n");

  // Corrupt: a truncated stream and an object that is not a character vector.
  auto good = rdb_object(r_strings({"x"}));
  write(d / "t.rdb", good.substr(0, good.size() - 3));
  docs.clear();
  auto s = kd::text::read_rdata_rdb((d / "t.rdb").string(), "", docs);
  CHECK(s.code() == kd::errc::io_error);
  CHECK(s.message().find("object 0 (byte offset 0): corrupt zlib stream") != std::string::npos);
  std::string ints = "X\n";
  be32(ints, 2); be32(ints, 0); be32(ints, 0); be32(ints, 13); be32(ints, 1); be32(ints, 7);
  write(d / "i.rdb", good + rdb_object(ints));
  s = kd::text::read_rdata_rdb((d / "i.rdb").string(), "", docs);
  CHECK(s.message().find("object 1") != std::string::npos);
  CHECK(s.message().find("not a character vector") != std::string::npos);
  fs::remove_all(d);
}

TEST_CASE("bad input files: missing, empty, not UTF-8 (named with the byte offset)") {
  const auto d = temp_dir("bad");
  write(d / "empty.txt", "");
  write(d / "latin1.txt", "line one\nna\xefve\n");
  write(d / "ok.txt", "fine\n");
  std::vector<kd::text::document> docs;
  auto s = kd::text::read_documents((d / "missing.txt").string(), docs);
  CHECK(s.code() == kd::errc::io_error);
  CHECK(s.message() == (d / "missing.txt").string() + ": no such file or folder");
  s = kd::text::read_documents((d / "empty.txt").string(), docs);
  CHECK(s.code() == kd::errc::empty_input);
  CHECK(s.message() == (d / "empty.txt").string() + ": empty file");
  s = kd::text::read_documents((d / "latin1.txt").string(), docs);
  CHECK(s.code() == kd::errc::invalid_argument);
  CHECK(s.message() == (d / "latin1.txt").string() + ": not valid UTF-8 at byte offset 11");
  // A folder: every file, sorted; the first bad one stops it.
  s = kd::text::read_documents(d.string(), docs);
  CHECK(s.message() == (d / "empty.txt").string() + ": empty file");
  fs::remove(d / "empty.txt");
  fs::remove(d / "latin1.txt");
  write(d / "b.txt", "second\n");
  docs.clear();
  REQUIRE(kd::text::read_documents(d.string(), docs).ok());
  REQUIRE(docs.size() == 2);
  CHECK(docs[0].text == "second\n");  // b.txt sorts before ok.txt
  fs::remove_all(d);
}

TEST_CASE("split: tail range at line starts, by document, errors") {
  std::vector<kd::text::document> docs{{"a", "1111\n2222\n3333\n4444\n5555\n"}, {"b", "xx\nyy\n"}};
  kd::text::split_spec spec;
  spec.fraction = 0.2;
  std::string train, valid;
  REQUIRE(kd::text::split_corpus(docs, spec, train, valid).ok());
  CHECK(train == "1111\n2222\n3333\n4444\nxx\nyy\n");  // a: byte 20 starts a line; b: byte 4 moves to 6
  CHECK(valid == "5555\n");
  CHECK(train.size() + valid.size() == docs[0].text.size() + docs[1].text.size());
  spec.fraction = 0.5;
  train.clear(); valid.clear();
  REQUIRE(kd::text::split_corpus(docs, spec, train, valid).ok());
  CHECK(train == "1111\n2222\n3333\nxx\n");
  CHECK(valid == "4444\n5555\nyy\n");
  spec.kind = kd::text::split_spec::by_document;
  spec.validation_docs = {"b"};
  train.clear(); valid.clear();
  REQUIRE(kd::text::split_corpus(docs, spec, train, valid).ok());
  CHECK(valid == "xx\nyy\n");
  CHECK(spec.describe() == "by_document validation=b");
  spec.validation_docs = {"c"};
  CHECK(kd::text::split_corpus(docs, spec, train, valid).code() == kd::errc::invalid_argument);
}

TEST_CASE("default corpus: parallel encoding equals serial, shards, token counts") {
  std::vector<kd::text::document> docs;
  const auto st = kd::text::default_corpus(data_dir(), docs);
  INFO(st.message());
  REQUIRE(st.ok());
  REQUIRE(docs.size() == 7);
  std::size_t bytes = 0;
  for (const auto& d : docs) bytes += d.text.size();
  CHECK(bytes > 8'000'000);
  CHECK(bytes < 8'400'000);
  CHECK(docs[0].text.rfind("In the beginning God created the heaven and the earth.\n", 0) == 0);

  kd::text::tokenizer qwen3, gpt2;
  kd::check(kd::text::load_tokenizer("qwen3", data_dir(), qwen3));
  kd::check(kd::text::load_tokenizer("gpt2", data_dir(), gpt2));
  // Parallel == serial on a slice with many cut points.
  const std::string_view slice = std::string_view(docs[1].text).substr(0, 300'000);
  for (auto* t : {&qwen3, &gpt2}) {
    kd::text::encoding a, b;
    REQUIRE(t->encode(slice, a).ok());
    REQUIRE(kd::text::encode_parallel(*t, slice, b, 3).ok());
    CHECK(a.ids == b.ids);
    CHECK(a.begin == b.begin);
    CHECK(a.end == b.end);
  }

  std::string all;
  for (const auto& d : docs) all += d.text;
  const auto dir = temp_dir("shard");
  const std::string path = (dir / "qwen3.tok").string();
  kd::text::shard sq, sg;
  bool rebuilt = false;
  REQUIRE(kd::text::open_or_build_shard(path, qwen3, all, sq, &rebuilt).ok());
  CHECK(rebuilt);
  REQUIRE(kd::text::open_or_build_shard((dir / "gpt2.tok").string(), gpt2, all, sg, &rebuilt).ok());
  MESSAGE("default corpus: ", all.size(), " bytes, qwen3 ", sq.size(), " tokens, gpt2 ", sg.size(), " tokens");
  CHECK(sq.size() > 1'900'000);
  CHECK(sq.size() < 2'000'000);
  CHECK(sg.size() > 1'950'000);
  CHECK(sg.size() < 2'100'000);
  // Decoding the shard gives the text back (the corpus is ASCII and NFC).
  std::string back;
  REQUIRE(gpt2.decode(sg.ids().data(), sg.size(), back).ok());
  CHECK(back == all);
  // Reopened unchanged; rebuilt when the text or the tokenizer changes; a truncated file is refused.
  kd::text::shard again;
  REQUIRE(kd::text::open_or_build_shard(path, qwen3, all, again, &rebuilt).ok());
  CHECK_FALSE(rebuilt);
  const std::string small = "In the beginning";
  REQUIRE(kd::text::open_or_build_shard(path, qwen3, small, again, &rebuilt).ok());
  CHECK(rebuilt);
  CHECK(again.size() == 3);
  REQUIRE(kd::text::open_or_build_shard(path, gpt2, small, again, &rebuilt).ok());
  CHECK(rebuilt);
  again = kd::text::shard();
  fs::resize_file(path, fs::file_size(path) - 4);
  CHECK(again.open(path).message().find("truncated") != std::string::npos);
  fs::remove_all(dir);
}

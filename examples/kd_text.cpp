// kd_text: the text pipeline from the command line.
//   kd_text corpus [--out DIR] [--split tail:F | doc:NAME[,NAME...]] [FILE|FOLDER...]
//   kd_text encode --tokenizer qwen3|gpt2 [--tokenizer-file PATH] FILE     ids of the whole file, one line
//   kd_text decode --tokenizer qwen3|gpt2 [--tokenizer-file PATH] [FILE]  ids (FILE or stdin) -> text
//   kd_text stats  [--threads N] [FILE|FOLDER...]     tokens, bytes/token, coverage, alignment, numerals
//   kd_text align  [--offset B] [--bytes N] [FILE]    a passage with both tokenizations
// Without files, corpus/stats/align use the default corpus (KJV + Austen) from the data folder: .data/
// of the source tree, or $KD_TEXT_DATA (--data DIR). --tokenizer-file (or $KD_TOKENIZER_FILE) names an HF
// tokenizer.json, or a folder holding GPT-2's encoder.json and vocab.bpe.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include <kd/text/align.hpp>
#include <kd/text/corpus.hpp>
#include <kd/text/shard.hpp>
#include <kd/text/tokenizer.hpp>

namespace fs = std::filesystem;

namespace {

struct args {
  std::string cmd, data, tokenizer, tokenizer_file, out, split = "tail:0.02";
  unsigned threads = 0;
  std::size_t offset = 0, bytes = 400;
  std::vector<std::string> files;
};

int usage() {
  std::cerr << "usage: kd_text corpus|encode|decode|stats|align [options] [FILE...]\n"
               "  --data DIR            data folder (default $KD_TEXT_DATA or " KD_TEXT_DEFAULT_DATA ")\n"
               "  --tokenizer NAME      qwen3 or gpt2 (encode, decode)\n"
               "  --tokenizer-file P    tokenizer.json, or a folder with encoder.json + vocab.bpe ($KD_TOKENIZER_FILE)\n"
               "  --out DIR             corpus: where train.txt, valid.txt and split.txt go (default DATA/corpus/split)\n"
               "  --split tail:F|doc:N  corpus: last fraction F of each document, or the named documents (default tail:0.02)\n"
               "  --threads N           stats: encoding threads (default: all)\n"
               "  --offset B --bytes N  align: the passage to show\n"
               "The data comes from scripts/fetch_text_data.sh.\n";
  return 2;
}

kd::status load(const args& a, const std::string& name, kd::text::tokenizer& t) {
  std::string file = a.tokenizer_file;
  if (file.empty())
    if (const char* e = std::getenv("KD_TOKENIZER_FILE")) file = e;
  if (file.empty()) return kd::text::load_tokenizer(name, a.data, t);
  if (fs::is_directory(file)) return kd::text::tokenizer::from_gpt2(file + "/encoder.json", file + "/vocab.bpe", t);
  return kd::text::tokenizer::from_hf_json(file, t);
}

kd::status documents(const args& a, std::vector<kd::text::document>& docs) {
  if (a.files.empty()) return kd::text::default_corpus(a.data, docs);
  for (const auto& f : a.files) KD_TRY(kd::text::read_documents(f, docs));
  return kd::ok_status();
}

std::string joined(const std::vector<kd::text::document>& docs) {
  std::string all;
  for (const auto& d : docs) {
    all += d.text;
    if (!all.empty() && all.back() != '\n') all += '\n';
  }
  return all;
}

kd::status cmd_corpus(const args& a) {
  std::vector<kd::text::document> docs;
  KD_TRY(documents(a, docs));
  kd::text::split_spec spec;
  if (a.split.rfind("tail:", 0) == 0) {
    spec.fraction = std::atof(a.split.c_str() + 5);
  } else if (a.split.rfind("doc:", 0) == 0) {
    spec.kind = kd::text::split_spec::by_document;
    std::stringstream ss(a.split.substr(4));
    for (std::string n; std::getline(ss, n, ',');) spec.validation_docs.push_back(n);
  } else {
    return {kd::errc::invalid_argument, "--split must be tail:F or doc:NAME[,NAME...]"};
  }
  std::string train, valid;
  KD_TRY(kd::text::split_corpus(docs, spec, train, valid));
  const std::string out = a.out.empty() ? a.data + "/corpus/split" : a.out;
  fs::create_directories(out);
  std::ofstream(out + "/train.txt", std::ios::binary) << train;
  std::ofstream(out + "/valid.txt", std::ios::binary) << valid;
  std::ostringstream m;
  m << "split " << spec.describe() << "\n";
  for (const auto& d : docs) m << "document " << d.name << " bytes " << d.text.size() << "\n";
  m << "train bytes " << train.size() << " fnv1a64 " << std::hex << kd::text::text_hash(train) << std::dec << "\n";
  m << "valid bytes " << valid.size() << " fnv1a64 " << std::hex << kd::text::text_hash(valid) << std::dec << "\n";
  std::ofstream(out + "/split.txt") << m.str();
  std::cout << m.str() << "written to " << out << "\n";
  return kd::ok_status();
}

kd::status cmd_encode(const args& a) {
  if (a.files.size() != 1) return {kd::errc::invalid_argument, "encode takes one FILE"};
  kd::text::tokenizer t;
  KD_TRY(load(a, a.tokenizer, t));
  std::string text;
  KD_TRY(kd::text::read_file(a.files[0], text));
  kd::text::encoding e;
  KD_TRY(kd::text::encode_parallel(t, text, e, a.threads, a.files[0]));
  std::string line;
  line.reserve(e.ids.size() * 6);
  for (std::size_t i = 0; i < e.ids.size(); ++i) {
    if (i) line += ' ';
    line += std::to_string(e.ids[i]);
  }
  line += '\n';
  std::fwrite(line.data(), 1, line.size(), stdout);
  return kd::ok_status();
}

kd::status cmd_decode(const args& a) {
  kd::text::tokenizer t;
  KD_TRY(load(a, a.tokenizer, t));
  std::string in;
  if (a.files.empty()) {
    std::ostringstream ss;
    ss << std::cin.rdbuf();
    in = ss.str();
  } else {
    KD_TRY(kd::text::read_file(a.files[0], in));
  }
  std::vector<std::uint32_t> ids;
  std::istringstream ss(in);
  for (std::string w; ss >> w;) {
    char* end = nullptr;
    const unsigned long v = std::strtoul(w.c_str(), &end, 10);
    if (*end || w[0] == '-' || v > 0xffffffffUL) return {kd::errc::invalid_argument, "not a token id: '" + w + "'"};
    ids.push_back(static_cast<std::uint32_t>(v));
  }
  std::string text;
  KD_TRY(t.decode(ids.data(), ids.size(), text));
  std::fwrite(text.data(), 1, text.size(), stdout);
  return kd::ok_status();
}

kd::status cmd_stats(const args& a) {
  std::vector<kd::text::document> docs;
  KD_TRY(documents(a, docs));
  const std::string all = joined(docs);
  kd::text::tokenizer tq, tg;
  KD_TRY(kd::text::load_tokenizer("qwen3", a.data, tq));
  KD_TRY(kd::text::load_tokenizer("gpt2", a.data, tg));
  fs::create_directories(a.data + "/shards");
  std::printf("corpus: %zu documents, %zu bytes\n", docs.size(), all.size());
  kd::text::shard sh[2];
  const char* names[2] = {"qwen3", "gpt2"};
  kd::text::tokenizer* toks[2] = {&tq, &tg};
  for (int k = 0; k < 2; ++k) {
    bool rebuilt = false;
    const auto t0 = std::chrono::steady_clock::now();
    KD_TRY(kd::text::open_or_build_shard(a.data + "/shards/" + names[k] + ".tok", *toks[k], all, sh[k], &rebuilt, a.threads));
    const double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::set<std::uint32_t> distinct(sh[k].ids().begin(), sh[k].ids().end());
    std::printf("%-6s %9zu tokens, %.3f bytes/token, %zu of %zu ids occur (%.1f%%), %s in %.2f s\n", names[k],
                sh[k].size(), double(all.size()) / double(sh[k].size()), distinct.size(), toks[k]->vocab_size(),
                100.0 * double(distinct.size()) / double(toks[k]->vocab_size()),
                rebuilt ? "encoded" : "shard reused", sec);
  }
  kd::vocab_map map;
  KD_TRY(kd::text::shared_token_map(tq, tg, 151936, 50304, map));
  kd::text::aligned_pairs pairs;
  KD_TRY(kd::text::align_positions(sh[0].end(), sh[1].end(), pairs));
  const double student_positions = double(sh[1].size() - 1);
  std::printf("vocab_map: %lld shared token strings (teacher 151,936 rows -> student 50,304 rows)\n",
              static_cast<long long>(map.size()));
  std::printf("alignment: %.2f%% of student positions aligned (same context end and next span); "
              "%.2f%% share a context boundary\n",
              100.0 * double(pairs.student.size()) / student_positions,
              100.0 * kd::text::shared_boundary_fraction(sh[0].end(), sh[1].end()));
  const auto n = kd::text::numeral_report(tq, tg, map, sh[1].ids(), pairs);
  std::printf("numerals: student vocab has %zu tokens with digits, %zu with 2+ digits (%zu of them mapped); "
              "teacher has %zu with 2+ digits\n",
              n.student_digit_tokens, n.student_multi_digit_tokens, n.multi_digit_mapped, n.teacher_multi_digit_tokens);
  std::printf("numerals: %zu student positions predict a token with digits, %zu aligned (%.1f%%)\n", n.digit_positions,
              n.digit_positions_aligned, n.digit_positions ? 100.0 * double(n.digit_positions_aligned) / double(n.digit_positions) : 0.0);
  return kd::ok_status();
}

kd::status cmd_align(const args& a) {
  std::vector<kd::text::document> docs;
  KD_TRY(documents(a, docs));
  const std::string all = joined(docs);
  if (a.offset >= all.size()) return {kd::errc::out_of_range, "--offset past the text"};
  std::size_t lo = a.offset, hi = std::min(all.size(), a.offset + a.bytes);
  while (lo > 0 && all[lo - 1] != '\n') --lo;  // whole lines keep both tokenizations as in the corpus
  while (hi < all.size() && all[hi - 1] != '\n') ++hi;
  const std::string_view passage = std::string_view(all).substr(lo, hi - lo);
  kd::text::tokenizer tq, tg;
  KD_TRY(kd::text::load_tokenizer("qwen3", a.data, tq));
  KD_TRY(kd::text::load_tokenizer("gpt2", a.data, tg));
  kd::text::encoding eq, eg;
  KD_TRY(tq.encode(passage, eq));
  KD_TRY(tg.encode(passage, eg));
  kd::text::aligned_pairs p;
  KD_TRY(kd::text::align_positions(eq.end, eg.end, p));
  std::set<std::uint32_t> aligned_ends;
  for (auto j : p.student) aligned_ends.insert(eg.end[j]);
  auto show = [&](const char* name, const kd::text::encoding& e) {
    std::string line;
    for (std::size_t i = 0; i < e.ids.size(); ++i) {
      std::string tok(passage.substr(e.begin[i], e.end[i] - e.begin[i]));
      for (auto& c : tok) if (c == '\n') c = '/';
      line += tok;
      line += aligned_ends.count(e.end[i]) ? "‖" : "|";
    }
    std::printf("%-6s %zu tokens: %s\n", name, e.ids.size(), line.c_str());
  };
  std::printf("bytes [%zu, %zu); '/' is a newline, '|' a token boundary, '‖' an aligned position (%zu of %zu student positions)\n",
              lo, hi, p.student.size(), eg.ids.size() ? eg.ids.size() - 1 : 0);
  show("qwen3", eq);
  show("gpt2", eg);
  return kd::ok_status();
}

}  // namespace

int main(int argc, char** argv) {
  args a;
  if (const char* e = std::getenv("KD_TEXT_DATA")) a.data = e;
  else a.data = KD_TEXT_DEFAULT_DATA;
  if (argc < 2) return usage();
  a.cmd = argv[1];
  for (int i = 2; i < argc; ++i) {
    const std::string s = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) { std::cerr << "kd_text: " << s << " needs a value\n"; std::exit(2); }
      return argv[++i];
    };
    if (s == "--data") a.data = value();
    else if (s == "--tokenizer") a.tokenizer = value();
    else if (s == "--tokenizer-file") a.tokenizer_file = value();
    else if (s == "--out") a.out = value();
    else if (s == "--split") a.split = value();
    else if (s == "--threads") a.threads = static_cast<unsigned>(std::stoul(value()));
    else if (s == "--offset") a.offset = std::stoul(value());
    else if (s == "--bytes") a.bytes = std::stoul(value());
    else if (s.rfind("--", 0) == 0) return usage();
    else a.files.push_back(s);
  }
  kd::status st;
  if (a.cmd == "corpus") st = cmd_corpus(a);
  else if (a.cmd == "encode" || a.cmd == "decode") {
    if (a.tokenizer.empty()) a.tokenizer = "qwen3";
    st = a.cmd == "encode" ? cmd_encode(a) : cmd_decode(a);
  } else if (a.cmd == "stats") st = cmd_stats(a);
  else if (a.cmd == "align") st = cmd_align(a);
  else return usage();
  if (!st.ok()) {
    std::cerr << "kd_text: " << to_string(st.code()) << ": " << st.message() << "\n";
    return 1;
  }
  return 0;
}

// kd_bench_tokenizer: encode throughput of kd's Qwen3 and GPT-2 tokenizers on the default corpus (or the
// files named), one thread and all threads. Each repetition starts from a fresh clone (an empty word
// cache), the best of --reps is reported. --json prints one JSON object per line for
// benchmarks/tokenizer_hf.py, which measures HF tokenizers on the same text and prints both side by side.
//   kd_bench_tokenizer [--data DIR] [--reps N] [--threads N] [--json] [--dump FILE] [FILE|FOLDER...]
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#include <kd/text/corpus.hpp>
#include <kd/text/tokenizer.hpp>

int main(int argc, char** argv) {
  std::string data = std::getenv("KD_TEXT_DATA") ? std::getenv("KD_TEXT_DATA") : KD_TEXT_DEFAULT_DATA;
  int reps = 3;
  unsigned threads = std::max(1u, std::thread::hardware_concurrency());
  bool json = false;
  std::string dump;  // --dump FILE: write the measured text and exit
  std::vector<std::string> files;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--data" && i + 1 < argc) data = argv[++i];
    else if (a == "--reps" && i + 1 < argc) reps = std::atoi(argv[++i]);
    else if (a == "--threads" && i + 1 < argc) threads = static_cast<unsigned>(std::atoi(argv[++i]));
    else if (a == "--json") json = true;
    else if (a == "--dump" && i + 1 < argc) dump = argv[++i];
    else files.push_back(a);
  }
  std::vector<kd::text::document> docs;
  kd::status st = files.empty() ? kd::text::default_corpus(data, docs) : kd::ok_status();
  for (const auto& f : files) if (st.ok()) st = kd::text::read_documents(f, docs);
  std::string text;
  for (const auto& d : docs) {
    text += d.text;
    if (!text.empty() && text.back() != '\n') text += '\n';
  }
  if (!st.ok()) {
    std::fprintf(stderr, "kd_bench_tokenizer: %s\n", st.message().c_str());
    return 1;
  }
  if (!dump.empty()) {
    std::FILE* f = std::fopen(dump.c_str(), "wb");
    const bool ok = f && std::fwrite(text.data(), 1, text.size(), f) == text.size();
    if (f) std::fclose(f);
    return ok ? 0 : 1;
  }
  const double mb = static_cast<double>(text.size()) / 1e6;
  if (!json) std::printf("%zu bytes, best of %d, %u threads for 'all'\n", text.size(), reps, threads);
  for (const char* name : {"qwen3", "gpt2"}) {
    kd::text::tokenizer tok;
    st = kd::text::load_tokenizer(name, data, tok);
    if (!st.ok()) {
      std::fprintf(stderr, "kd_bench_tokenizer: %s\n", st.message().c_str());
      return 1;
    }
    for (unsigned t : {1u, threads}) {
      double best = 1e30;
      std::size_t count = 0;
      for (int r = 0; r < reps; ++r) {
        kd::text::encoding e;
        const auto t0 = std::chrono::steady_clock::now();
        kd::check(kd::text::encode_parallel(tok, text, e, t));
        best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
        count = e.ids.size();
      }
      if (json)
        std::printf("{\"impl\": \"kd\", \"tokenizer\": \"%s\", \"threads\": %u, \"bytes\": %zu, \"tokens\": %zu, "
                    "\"seconds\": %.6f, \"mb_per_s\": %.3f}\n", name, t, text.size(), count, best, mb / best);
      else
        std::printf("%-6s %2u thread%s %9zu tokens %8.3f s %8.2f MB/s\n", name, t, t == 1 ? " " : "s", count, best,
                    mb / best);
    }
  }
  return 0;
}

// kd_train: the reference trainer. A Qwen3-MoE teacher (Qwen3 tokenizer, 151,936 rows) trained on real
// text, distilled into a dense Llama student (GPT-2 tokenizer, 50,304 rows) through the vocabulary map on
// byte-aligned positions; the same student trained on LM alone as the yardstick; evaluation in bits per
// byte; a report with pictures.
//
//   kd_train teacher | distill | scratch | eval | report | demo | grid   [flags]   (kd_train --help)
//
// A thin program: the steps are kd::train::teacher_step / distill_step / evaluate_lm
// (kd/train/distill_step.hpp), checkpoints kd::save_run_checkpoint, data kd::train::text_loader, the
// report kd::train::write_report. Built from this file for the CPU, and from kd_train.cu (which includes
// it) with the CUDA backend as well; without a GPU the CUDA build runs the CPU path and says so.
//
// Run folder (--run, default runs/kd_train): config.json (every flag), data/ (token shards), and per phase
// (teacher, distill, scratch): log.jsonl (metrics_logger lines), eval.jsonl, ckpt/step-N (resume points),
// final/ (HF config.json + model.safetensors: transformers loads it). report.html and summary.json at the top.
// Exit status: 0 done; 1 a quality check failed (demo); 2 a kd error (named); 3 other exception;
// 64 bad flag; 75 stopped by --stop-after (a simulated kill, checkpoint written); 128 + signal on
// SIGINT/SIGTERM (emergency checkpoint written).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <iostream>
#include <optional>
#include <thread>
#include <map>
#include <numbers>
#include <sstream>
#include <string>
#include <cstring>
#include <vector>

#include <unistd.h>

#include <nlohmann/json.hpp>

#include <kd/kd.hpp>
#include <kd/core/comm.hpp>
#include <kd/model/checkpoint.hpp>
#include <kd/model/ops_cpu.hpp>
#include <kd/model/transformer.hpp>
#include <kd/text/corpus.hpp>
#include <kd/text/shard.hpp>
#include <kd/text/tokenizer.hpp>
#include <kd/train/adamw.hpp>
#include <kd/train/data.hpp>
#include <kd/train/distill_step.hpp>
#include <kd/train/early_stopping.hpp>
#include <kd/train/interrupt.hpp>
#include <kd/train/report.hpp>
#include <kd/train/run_checkpoint.hpp>

#if KD_TRAIN_CUDA
#include <cuda_runtime.h>

#include <kd/kd.cuh>
#include <kd/model/cuda/ops.cuh>
#include <kd/model/cuda/profiled_ops.cuh>
#include <kd/train/step_backend.cuh>
#endif
#if KD_TRAIN_NCCL
#include <sys/wait.h>
#include <kd/cuda/nccl.cuh>
#endif

#ifndef KD_TRAIN_DEFAULT_DATA
#define KD_TRAIN_DEFAULT_DATA ".data"
#endif

namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using kd::index_t;

// ---- Flags and presets ------------------------------------------------------------------------------
struct options {
  std::string cmd, run = "runs/kd_train", data, corpus, preset, device = "auto";
  std::int64_t steps = -1, teacher_steps = -1, batch = -1, seq = -1, corpus_bytes = -1, eval_windows = -1;
  std::int64_t eval_every = -1, ckpt_every = -1, stop_after = 0, patience = 4, accum = 1;
  double lr = -1, teacher_lr = -1, w_kd = 1.0, w_feature = 0.5, w_route = 0.1, w_z = 1e-4, w_lb = 1e-2, w_rz = 1e-3;
  double t_start = 2.0, t_end = 1.0, kd_ramp = 0.3, t_ramp = 1.0;
  std::uint64_t seed = 2026;
  bool resume = false;
  bool deterministic = false;  // GPU: bitwise-repeatable runs (slower attention backward)
  // Data parallel (distill, scratch): --ranks N CPU ranks on threads; --gpus N one process per GPU over
  // NCCL. --rank R and --nccl-id F are what the GPU launcher passes to the ranks it starts.
  std::int64_t ranks = 1, gpus = 0, rank = -1;
  std::string nccl_id;
};

struct preset {
  std::string name;
  kd::model::moe_config teacher;
  kd::model::dense_config student;
  std::int64_t batch = 8, seq = 64, teacher_steps = 200, steps = 200, corpus_bytes = 0, eval_windows = 64;
  std::int64_t eval_every = 50, ckpt_every = 50;
  double teacher_lr = 3e-3, lr = 3e-3;
  index_t chunk_rows = 2048;
};

constexpr index_t kTeacherRows = 151936, kStudentRows = 50304;
constexpr std::int64_t kLogEvery = 10;  // the cadence policy: one console + JSONL line per 10 steps
using cadence = kd::log_every<kLogEvery>;

// CPU: minutes on 2 cores. Real vocabularies; narrow models; a slice of the corpus.
preset tiny_preset() {
  preset p;
  p.name = "tiny";
  auto& t = p.teacher;
  t.vocab_size = kTeacherRows;
  t.hidden_size = 32;
  t.intermediate_size = 64;
  t.num_hidden_layers = 2;
  t.num_attention_heads = 4;
  t.num_key_value_heads = 2;
  t.head_dim = 8;
  t.moe_intermediate_size = 32;
  t.num_experts = 4;
  t.num_experts_per_tok = 2;
  t.max_position_embeddings = 256;
  t.dtype = kd::model::weight_dtype::float32;
  auto& s = p.student;
  s.vocab_size = kStudentRows;
  s.hidden_size = 16;
  s.intermediate_size = 48;
  s.num_hidden_layers = 2;
  s.num_attention_heads = 2;
  s.num_key_value_heads = 1;
  s.head_dim = 8;
  s.max_position_embeddings = 256;
  s.tie_word_embeddings = true;
  s.dtype = kd::model::weight_dtype::float32;
  p.batch = 8;
  p.seq = 32;
  p.teacher_steps = 240;
  p.steps = 160;
  p.corpus_bytes = 300'000;
  p.eval_windows = 48;
  p.eval_every = 40;
  p.ckpt_every = 40;
  p.teacher_lr = 1e-2;
  p.lr = 1e-2;
  return p;
}

// GPU: the demo presets of kd/model/config.hpp (teacher 211M, student 19M), a few minutes on one card.
preset demo_preset() {
  preset p;
  p.name = "demo";
  p.teacher = kd::model::demo_teacher();
  p.student = kd::model::demo_student();
  p.teacher.max_position_embeddings = p.student.max_position_embeddings = 2048;
  p.batch = 16;
  p.seq = 256;
  p.teacher_steps = 1200;
  p.steps = 600;
  p.corpus_bytes = 0;
  p.eval_windows = 256;
  p.eval_every = 100;
  p.ckpt_every = 200;
  p.teacher_lr = 1.5e-3;
  p.lr = 2e-3;
  p.chunk_rows = 4096;
  return p;
}

constexpr const char* kUsage =
    "usage: kd_train teacher|distill|scratch|eval|report|demo|grid [flags]\n"
    "  teacher   train the MoE teacher on the corpus (LM + load balance + router z-loss)\n"
    "  distill   distill the dense student from RUN/teacher/final (LM + KD + feature + route + z-loss)\n"
    "  scratch   the same student on LM alone: same init, same batches, same token budget\n"
    "  eval      validation loss, perplexity and bits per byte of every finished model\n"
    "  report    RUN/report.html (loss curves, BPB against tokens, expert histogram) and the table\n"
    "  demo      all of the above, end to end\n"
    "  grid      compile-time policy grid: curve x feature normalization x divergence, ranked\n"
    "  bench     the distillation step at the seed geometry (978M MoE teacher, 135M student, 8 x 1024 tokens)\n"
    "flags:\n"
    "  --run DIR            run folder (default runs/kd_train)\n"
    "  --data DIR           data folder from scripts/fetch_text_data.sh (default $KD_TEXT_DATA or the source tree's .data)\n"
    "  --corpus PATH        a UTF-8 text file or a folder of them instead of the default corpus (KJV + Austen)\n"
    "  --preset tiny|demo   model and run sizes (default: demo on a GPU, tiny on the CPU)\n"
    "  --device auto|cpu|cuda\n"
    "  --steps N --teacher-steps N --batch B --seq S --lr X --teacher-lr X --corpus-bytes N\n"
    "  --eval-every N --eval-windows N --ckpt-every N --patience N --seed S\n"
    "  --accum N            students: N micro-batches of --batch rows per optimizer step (gradient accumulation)\n"
    "  --w-kd X --w-feature X --w-route X --w-z X --w-lb X --w-rz X   loss weights (route 0: off)\n"
    "  --temperature A:B    KD temperature, cosine from A to B (default 2:1)\n"
    "  --t-ramp F           ... over the first fraction F of the steps (default 1: the whole run; early stopping\n"
    "                       counts only evaluations after every schedule stopped ramping)\n"
    "  --kd-ramp F          the KD weight ramps from 0 over the first fraction F of the steps (default 0.3)\n"
    "  --resume             continue the phase from its latest checkpoint\n"
    "  --deterministic      GPU: bitwise-repeatable runs (attention backward without atomics; slower)\n"
    "  --gpus N             distill/scratch/bench data parallel over N GPUs (one process each, NCCL); --batch is per GPU\n"
    "  --ranks N            distill/scratch data parallel over N CPU ranks (threads); --batch is per rank\n"
    "  --stop-after N       stop after step N as if killed (checkpoint, exit 75): the resume test\n";

int usage(const std::string& why) {
  std::fprintf(stderr, "kd_train: %s\n%s", why.c_str(), kUsage);
  return 64;
}

bool parse_args(int argc, char** argv, options& o, std::string& err) {
  if (argc < 2) {
    err = "no command";
    return false;
  }
  o.cmd = argv[1];
  for (int i = 2; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&](std::string& out) {
      if (i + 1 >= argc) {
        err = a + " needs a value";
        return false;
      }
      out = argv[++i];
      return true;
    };
    static const char* valued[] = {"--run", "--data", "--corpus", "--preset", "--device", "--steps", "--teacher-steps", "--batch",
                                   "--seq", "--corpus-bytes", "--eval-windows", "--eval-every", "--ckpt-every",
                                   "--stop-after", "--patience", "--accum", "--seed", "--lr", "--teacher-lr", "--w-kd",
                                   "--w-feature", "--w-route", "--w-z", "--w-lb", "--w-rz", "--kd-ramp", "--t-ramp", "--temperature",
                                   "--ranks", "--gpus", "--rank", "--nccl-id"};
    if (a != "--resume" && a != "--deterministic" && std::none_of(std::begin(valued), std::end(valued), [&](const char* f) { return a == f; })) {
      err = "unknown flag " + a;
      return false;
    }
    std::string v;
    try {
      if (a == "--resume") o.resume = true;
      else if (a == "--deterministic") o.deterministic = true;
      else if (!value(v)) return false;
      else if (a == "--run") o.run = v;
      else if (a == "--data") o.data = v;
      else if (a == "--corpus") o.corpus = v;
      else if (a == "--preset") o.preset = v;
      else if (a == "--device") o.device = v;
      else if (a == "--steps") o.steps = std::stoll(v);
      else if (a == "--teacher-steps") o.teacher_steps = std::stoll(v);
      else if (a == "--batch") o.batch = std::stoll(v);
      else if (a == "--seq") o.seq = std::stoll(v);
      else if (a == "--corpus-bytes") o.corpus_bytes = std::stoll(v);
      else if (a == "--eval-windows") o.eval_windows = std::stoll(v);
      else if (a == "--eval-every") o.eval_every = std::stoll(v);
      else if (a == "--ckpt-every") o.ckpt_every = std::stoll(v);
      else if (a == "--stop-after") o.stop_after = std::stoll(v);
      else if (a == "--patience") o.patience = std::stoll(v);
      else if (a == "--accum") o.accum = std::stoll(v);
      else if (a == "--seed") o.seed = std::stoull(v);
      else if (a == "--lr") o.lr = std::stod(v);
      else if (a == "--teacher-lr") o.teacher_lr = std::stod(v);
      else if (a == "--w-kd") o.w_kd = std::stod(v);
      else if (a == "--w-feature") o.w_feature = std::stod(v);
      else if (a == "--w-route") o.w_route = std::stod(v);
      else if (a == "--w-z") o.w_z = std::stod(v);
      else if (a == "--w-lb") o.w_lb = std::stod(v);
      else if (a == "--w-rz") o.w_rz = std::stod(v);
      else if (a == "--kd-ramp") o.kd_ramp = std::stod(v);
      else if (a == "--t-ramp") o.t_ramp = std::stod(v);
      else if (a == "--ranks") o.ranks = std::stoll(v);
      else if (a == "--gpus") o.gpus = std::stoll(v);
      else if (a == "--rank") o.rank = std::stoll(v);
      else if (a == "--nccl-id") o.nccl_id = v;
      else if (a == "--temperature") {
        const auto c = v.find(':');
        o.t_start = std::stod(v.substr(0, c));
        o.t_end = c == std::string::npos ? o.t_start : std::stod(v.substr(c + 1));
      } else {
        err = "unknown flag " + a;
        return false;
      }
    } catch (const std::exception&) {
      err = "bad value '" + v + "' for " + a;
      return false;
    }
  }
  return true;
}

// Flags over the preset: the effective run configuration.
preset resolve(const options& o, preset p) {
  if (o.steps >= 0) p.steps = o.steps;
  if (o.teacher_steps >= 0) p.teacher_steps = o.teacher_steps;
  if (o.batch > 0) p.batch = o.batch;
  if (o.seq > 0) p.seq = o.seq;
  if (o.corpus_bytes >= 0) p.corpus_bytes = o.corpus_bytes;
  if (o.eval_windows > 0) p.eval_windows = o.eval_windows;
  if (o.eval_every > 0) p.eval_every = o.eval_every;
  if (o.ckpt_every > 0) p.ckpt_every = o.ckpt_every;
  if (o.lr > 0) p.lr = o.lr;
  if (o.teacher_lr > 0) p.teacher_lr = o.teacher_lr;
  return p;
}

kd::status check_flags(const options& o, const preset& p) {
  auto bad = [](const std::string& m) { return kd::status(kd::errc::invalid_argument, m); };
  if (p.steps <= 0 || p.teacher_steps <= 0) return bad("--steps and --teacher-steps must be positive");
  if (p.batch <= 0 || p.seq < 8) return bad("--batch must be positive and --seq at least 8");
  if (p.seq > p.student.max_position_embeddings) return bad("--seq exceeds the preset's max_position_embeddings");
  if (p.eval_every <= 0 || p.ckpt_every <= 0) return bad("--eval-every and --ckpt-every must be positive");
  if (o.accum < 1 || o.accum > 1024) return bad("--accum must be in [1, 1024]");
  if (o.ranks < 1 || o.ranks > 256) return bad("--ranks must be in [1, 256]");
  if (o.gpus < 0 || o.gpus > 64) return bad("--gpus must be in [0, 64]");
  if (o.ranks > 1 && o.cmd != "distill" && o.cmd != "scratch")
    return bad("--ranks / --gpus (data parallel) apply to distill and scratch; train the teacher on one rank");
  if (o.gpus > 1 && o.cmd != "distill" && o.cmd != "scratch" && o.cmd != "bench")
    return bad("--ranks / --gpus (data parallel) apply to distill and scratch (--gpus also to bench); train the teacher on one rank");
  if (o.ranks > 1 && o.gpus > 1) return bad("--ranks (CPU threads) and --gpus (GPU processes) exclude each other");
  if (o.rank >= 0 && (o.gpus < 2 || o.rank >= o.gpus || o.nccl_id.empty()))
    return bad("--rank and --nccl-id are what the --gpus launcher passes to its ranks");
  if (!(o.t_start > 0 && o.t_end > 0)) return bad("--temperature must stay > 0");
  if (!(o.kd_ramp >= 0 && o.kd_ramp <= 1)) return bad("--kd-ramp must be in [0, 1]");
  if (!(o.t_ramp >= 0 && o.t_ramp <= 1)) return bad("--t-ramp must be in [0, 1]");
  if (o.stop_after < 0 || o.stop_after % kLogEvery != 0)
    return bad("--stop-after must be a multiple of the logging cadence (" + std::to_string(kLogEvery) + " steps)");
  if (p.ckpt_every % kLogEvery != 0)
    return bad("--ckpt-every must be a multiple of the logging cadence (" + std::to_string(kLogEvery) + " steps)");
  for (double w : {o.w_kd, o.w_feature, o.w_route, o.w_z, o.w_lb, o.w_rz})
    if (!(w >= 0) || !std::isfinite(w)) return bad("loss weights must be finite and >= 0");
  return {};
}

template <class Config>
json config_json(const Config& c) {
  std::string s;
  kd::check(kd::model::to_json(c, s));
  return json::parse(s);
}

// Data-parallel ranks of the run: --ranks (CPU threads) or --gpus (GPU processes), 1 without either.
std::int64_t world_size(const options& o) { return std::max<std::int64_t>(o.ranks, std::max<std::int64_t>(o.gpus, 1)); }

json run_config_json(const options& o, const preset& p, const std::string& backend) {
  return {{"preset", p.name},       {"backend", backend},        {"seed", o.seed},  {"corpus", o.corpus.empty() ? "default" : o.corpus},
          {"global_batch", p.batch * world_size(o)}, {"seq", p.seq},              {"steps", p.steps},
          {"teacher_steps", p.teacher_steps}, {"corpus_bytes", p.corpus_bytes}, {"eval_every", p.eval_every},
          {"eval_windows", p.eval_windows}, {"ckpt_every", p.ckpt_every}, {"lr", p.lr},
          {"teacher_lr", p.teacher_lr}, {"w_kd", o.w_kd},       {"w_feature", o.w_feature},
          {"w_route", o.w_route},   {"w_z", o.w_z},              {"w_lb", o.w_lb},
          {"w_rz", o.w_rz},         {"temperature", {o.t_start, o.t_end}}, {"kd_ramp", o.kd_ramp}, {"t_ramp", o.t_ramp},
          {"patience", o.patience}, {"accum", o.accum}, {"deterministic", o.deterministic}, {"teacher", config_json(p.teacher)}, {"student", config_json(p.student)}};
}

// ---- Data: tokenizers, corpus split, token shards, the vocabulary map ------------------------------
struct text_data {
  kd::text::tokenizer ttok, stok;
  kd::text::shard t_train, s_train, t_valid, s_valid;
  kd::vocab_map map;
  index_t t_real = 0, s_real = 0;
  std::int64_t train_bytes = 0, valid_bytes = 0;
};

kd::train::token_stream stream_of(const kd::text::shard& s) { return {s.ids(), s.begin(), s.end()}; }

kd::status load_data(const std::string& data_dir, const std::string& corpus, const std::string& run,
                     std::int64_t corpus_bytes, text_data& d, bool verbose) {
  KD_TRY(kd::text::load_tokenizer("qwen3", data_dir, d.ttok));
  KD_TRY(kd::text::load_tokenizer("gpt2", data_dir, d.stok));
  d.t_real = static_cast<index_t>(d.ttok.vocab_size());
  d.s_real = static_cast<index_t>(d.stok.vocab_size());
  if (d.t_real > kTeacherRows || d.s_real > kStudentRows)
    return {kd::errc::shape_mismatch, "tokenizer vocabularies (" + std::to_string(d.t_real) + ", " +
                                          std::to_string(d.s_real) + ") exceed the heads' rows"};
  std::vector<kd::text::document> docs;
  if (corpus.empty()) KD_TRY(kd::text::default_corpus(data_dir, docs));
  else KD_TRY(kd::text::read_documents(corpus, docs));
  std::string train, valid;
  KD_TRY(kd::text::split_corpus(docs, {}, train, valid));
  if (corpus_bytes > 0 && static_cast<std::size_t>(corpus_bytes) < train.size()) {
    // A slice that keeps every document represented: the same share of each, cut at line starts.
    std::string sliced;
    const double share = static_cast<double>(corpus_bytes) / static_cast<double>(train.size());
    for (const auto& doc : docs) {
      const std::size_t want = static_cast<std::size_t>(share * static_cast<double>(doc.text.size()));
      std::size_t cut = doc.text.find('\n', want);
      cut = cut == std::string::npos ? doc.text.size() : cut + 1;
      sliced.append(doc.text, 0, std::min(cut, static_cast<std::size_t>(0.98 * static_cast<double>(doc.text.size()))));
      if (!sliced.empty() && sliced.back() != '\n') sliced += '\n';
    }
    train = std::move(sliced);
  }
  d.train_bytes = static_cast<std::int64_t>(train.size());
  d.valid_bytes = static_cast<std::int64_t>(valid.size());
  const fs::path dir = fs::path(run) / "data";
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) return {kd::errc::io_error, "cannot create " + dir.string() + ": " + ec.message()};
  bool rebuilt = false;
  KD_TRY(kd::text::open_or_build_shard((dir / "teacher_train.bin").string(), d.ttok, train, d.t_train, &rebuilt));
  KD_TRY(kd::text::open_or_build_shard((dir / "student_train.bin").string(), d.stok, train, d.s_train));
  KD_TRY(kd::text::open_or_build_shard((dir / "teacher_valid.bin").string(), d.ttok, valid, d.t_valid));
  KD_TRY(kd::text::open_or_build_shard((dir / "student_valid.bin").string(), d.stok, valid, d.s_valid));
  std::vector<std::string> tt(static_cast<std::size_t>(d.t_real)), st(static_cast<std::size_t>(d.s_real));
  for (index_t i = 0; i < d.t_real; ++i) tt[static_cast<std::size_t>(i)] = std::string(d.ttok.token_bytes(static_cast<std::uint32_t>(i)));
  for (index_t i = 0; i < d.s_real; ++i) st[static_cast<std::size_t>(i)] = std::string(d.stok.token_bytes(static_cast<std::uint32_t>(i)));
  KD_TRY(kd::vocab_map::from_tokens(tt, st, kTeacherRows, kStudentRows, d.map));
  if (verbose)
    std::printf("data: train %.2f MB -> %zu teacher / %zu student tokens, validation %.2f MB -> %zu / %zu (%s); "
                "vocab map %zu shared token strings\n",
                static_cast<double>(d.train_bytes) / 1e6, d.t_train.size(), d.s_train.size(),
                static_cast<double>(d.valid_bytes) / 1e6, d.t_valid.size(), d.s_valid.size(),
                rebuilt ? "encoded" : "cached shards", d.map.teacher_ids().size());
  return {};
}

// ---- Console: progress bar on a terminal, log lines always -------------------------------------------
struct progress {
  bool tty = ::isatty(STDOUT_FILENO) != 0;
  std::chrono::steady_clock::time_point t0 = std::chrono::steady_clock::now();
  std::int64_t first = 0;
  void show(const char* phase, std::int64_t step, std::int64_t total) const {
    if (!tty) return;
    const double el = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const double rate = step > first ? el / static_cast<double>(step - first) : 0.0;
    const int eta = static_cast<int>(rate * static_cast<double>(total - step));
    const int filled = static_cast<int>(30.0 * static_cast<double>(step) / static_cast<double>(total));
    std::printf("\r%-8s [%s%s] %lld/%lld  eta %dm%02ds ", phase, std::string(static_cast<std::size_t>(filled), '#').c_str(),
                std::string(static_cast<std::size_t>(30 - filled), ' ').c_str(), static_cast<long long>(step),
                static_cast<long long>(total), eta / 60, eta % 60);
    std::fflush(stdout);
  }
  void clear() const {
    if (tty) std::printf("\r%80s\r", "");
  }
};

// The smallest expert share as a fraction of the fair share 1/E, over every MoE layer.
double min_share_of_fair(const std::vector<std::vector<double>>& shares) {
  double m = 1e9;
  for (const auto& layer : shares)
    for (double x : layer) m = std::min(m, x * static_cast<double>(layer.size()));
  return m;
}

// A phase's JSON Lines files: truncated to the resumed step, so a resumed run's log equals an uninterrupted one's.
kd::status open_log(const fs::path& path, std::int64_t keep_through, std::ofstream& out) {
  std::vector<std::string> kept;
  if (keep_through > 0) {
    std::ifstream in(path);
    for (std::string line; std::getline(in, line);) {
      try {
        const json j = json::parse(line);
        if (j.value("step", std::int64_t{0}) <= keep_through) kept.push_back(line);
      } catch (const json::exception&) {
        break;  // a torn last line of the killed run
      }
    }
  }
  out.open(path, std::ios::trunc);
  if (!out) return {kd::errc::io_error, "cannot write " + path.string()};
  for (const auto& l : kept) out << l << '\n';
  out.flush();
  return {};
}

// An arena in backend memory as a checkpoint part (the projection and routing head of distillation).
template <class B>
kd::checkpoint_part arena_part(const std::string& name, B& b, typename B::value_type* data, std::size_t n) {
  using T = typename B::value_type;
  kd::checkpoint_part p;
  p.name = name;
  p.save = [&b, data, n](std::string& bytes) -> kd::status {
    std::vector<T> h(n);
    KD_TRY(b.download(data, n, h.data()));
    bytes.assign(reinterpret_cast<const char*>(h.data()), n * sizeof(T));
    return {};
  };
  p.load = [&b, data, n, name](std::string_view bytes, std::function<void()>& commit) -> kd::status {
    if (bytes.size() != n * sizeof(T))
      return {kd::errc::shape_mismatch, name + ": " + std::to_string(bytes.size()) + " bytes, expected " +
                                            std::to_string(n * sizeof(T))};
    auto h = std::make_shared<std::vector<T>>(n);
    std::memcpy(h->data(), bytes.data(), bytes.size());
    commit = [&b, data, n, h] { (void)b.upload(h->data(), n, data); };
    return {};
  };
  return p;
}

kd::checkpoint_part loader_part(kd::train::text_loader& loader, kd::train::loader_state& restored) {
  kd::checkpoint_part p;
  p.name = "data";
  p.save = [&loader](std::string& bytes) -> kd::status {
    const auto s = loader.state();
    bytes = json{{"epoch", s.epoch}, {"cursor", s.cursor}}.dump();
    return {};
  };
  p.load = [&restored](std::string_view bytes, std::function<void()>& commit) -> kd::status {
    kd::train::loader_state s;
    try {
      const json j = json::parse(bytes);
      s.epoch = j.at("epoch").get<std::uint64_t>();
      s.cursor = j.at("cursor").get<std::uint64_t>();
    } catch (const json::exception& e) {
      return {kd::errc::io_error, std::string("data loader state: ") + e.what()};
    }
    commit = [&restored, s] { restored = s; };
    return {};
  };
  return p;
}


// ---- The phases, on one model backend ------------------------------------------------------------

struct phase_result {
  int exit = 0;
  double best_bpb = NAN, final_bpb = NAN, tokens_per_s = 0;
  std::int64_t steps = 0, tokens = 0;
  bool stopped_early = false;
};

template <class B>
struct trainer {
  B& b;
  const options& o;
  const preset& p;
  text_data& d;
  std::string backend_name;
  using T = typename B::value_type;
  using model_t = kd::model::transformer<B>;
  // Data parallel: this rank's handle on the group (null: one process). Rank 0 writes the logs, the
  // checkpoints and the final weights; every rank reads a checkpoint to resume.
  kd::communicator* comm = nullptr;
  bool own_guard = true;  // false: the launching thread holds the process's one interrupt_guard
  [[nodiscard]] std::int64_t rank() const { return comm != nullptr ? comm->rank() : 0; }
  [[nodiscard]] std::int64_t ranks() const { return comm != nullptr ? comm->size() : 1; }

  fs::path phase_dir(const std::string& phase) const { return fs::path(o.run) / phase; }

  kd::train::text_loader_options loader_options() const {
    kd::train::text_loader_options lo;
    lo.batch = p.batch;
    lo.seq = p.seq;
    lo.teacher_seq = p.seq + p.seq / 8;
    lo.seed = o.seed;
    lo.teacher_pad = 0;
    lo.rank = rank();
    lo.ranks = ranks();
    return lo;
  }

  kd::adamw_options adamw_for(double peak, std::int64_t steps) const {
    kd::adamw_options a;
    a.weight_decay = 0.01;
    a.max_grad_norm = 1.0;
    a.schedule = {.peak = peak, .floor = 0.1 * peak, .warmup_steps = std::max<std::int64_t>(1, steps / 20),
                  .total_steps = steps};
    return a;
  }

  template <class Model>
  kd::status evaluate(Model& m, const kd::text::shard& valid, index_t vocab, kd::train::lm_eval_result& r) {
    return kd::train::evaluate_lm(m, stream_of(valid), p.batch, p.seq, vocab, p.eval_windows, p.chunk_rows, r);
  }

  // Writes one evaluation to eval.jsonl and, unless quiet, the console.
  static void log_eval(std::ofstream& f, const char* phase, std::int64_t step, std::int64_t tokens,
                       const kd::train::lm_eval_result& r, bool counted, bool quiet = false) {
    f << json{{"step", step},         {"tokens", tokens},       {"val_loss", r.loss},
              {"val_ppl", r.ppl},     {"val_bpb", r.bits_per_byte}, {"counted", counted}}
             .dump()
      << '\n';
    f.flush();
    if (!quiet)
      std::printf("  eval %s step %lld | val loss %.4f | ppl %.1f | %.4f bits/byte%s\n", phase, static_cast<long long>(step),
                r.loss, r.ppl, r.bits_per_byte, counted ? "" : " | ramping (not counted for early stopping)");
  }

  // -- teacher --
  phase_result run_teacher() {
    phase_result out;
    const fs::path dir = phase_dir("teacher");
    fs::create_directories(dir);
    model_t t(b, kd::model::make_arch(p.teacher));
    kd::check(t.allocate(true));
    kd::check(t.initialize(p.teacher.initializer_range, o.seed));
    kd::objective obj;
    obj.add("z_loss", kd::fixed(o.w_z)).add("load_balance", kd::fixed(o.w_lb)).add("router_z", kd::fixed(o.w_rz));
    kd::check(obj.validate());
    kd::train::teacher_step<model_t> step;
    kd::train::step_options so;
    so.chunk_rows = p.chunk_rows;
    so.vocab = d.t_real;
    so.window = kLogEvery;
    kd::check(step.init(t, obj, so, adamw_for(p.teacher_lr, p.teacher_steps)));
    kd::train::text_loader loader;
    kd::train::loader_state restored;
    std::int64_t s0 = 0;
    const std::string cfg = run_config_json(o, p, backend_name).dump();
    kd::run_state<B, kd::model::moe_config, typename kd::train::step_backend<B>::optimizer> st;
    st.model = &t;
    st.model_config = &p.teacher;
    st.optimizer = &step.optimizer();
    st.step = &s0;
    st.run_config = cfg;
    st.objective = &obj;
    st.extra.push_back(loader_part(loader, restored));
    if (o.resume) resume_from(dir / "ckpt", st, s0);
    kd::check(loader.init(stream_of(d.t_train), stream_of(d.s_train), loader_options(), restored));
    std::ofstream log, evals;
    kd::check(open_log(dir / "log.jsonl", s0, log));
    kd::check(open_log(dir / "eval.jsonl", s0, evals));
    kd::metrics_logger<cadence> logger(&std::cout, &log);
    kd::interrupt_guard guard;
    progress bar;
    bar.first = s0;
    const std::int64_t tokens_per_step = p.batch * p.seq;
    std::vector<kd::train::step_record> recs;
    std::printf("teacher: Qwen3-MoE %lld layers, hidden %lld, %lld experts top-%lld, %zu parameters, %s; %lld steps of %lld tokens%s\n",
                static_cast<long long>(p.teacher.num_hidden_layers), static_cast<long long>(p.teacher.hidden_size),
                static_cast<long long>(p.teacher.num_experts), static_cast<long long>(p.teacher.num_experts_per_tok),
                t.table().size(), backend_name.c_str(), static_cast<long long>(p.teacher_steps),
                static_cast<long long>(tokens_per_step), s0 > 0 ? (" (resumed at step " + std::to_string(s0) + ")").c_str() : "");
    const auto t0 = std::chrono::steady_clock::now();
    for (std::int64_t s = s0 + 1; s <= p.teacher_steps; ++s) {
      kd::train::text_batch tb;
      kd::check(loader.next(tb));
      kd::check(step.step(tb.teacher_ids, tb.teacher_labels, tb.batch, tb.teacher_seq, s));
      const bool due = cadence::due(s) || s == p.teacher_steps;
      if (due) {
        kd::check(step.flush(recs));
        for (const auto& r : recs) {
          kd::objective_evaluation ev;
          kd::check(obj.combine(r.step, r.values, ev));
          kd::record(logger, ev);
          if (r.step == s) {
            // expert utilization over the window: the collapse alarm
            const auto shares = step.take_expert_shares();
            const double min_fair = min_share_of_fair(shares);
            logger.record("expert_min_share_of_fair", min_fair);
            if (min_fair < 0.25) std::printf("  ALARM step %lld: an expert gets %.1f%% of its fair share of tokens (collapse)\n",
                                              static_cast<long long>(s), 100 * min_fair);
          }
          bar.clear();
          kd::check(logger.end_step(r.step));
        }
      }
      bar.show("teacher", s, p.teacher_steps);
      if (s % p.eval_every == 0 || s == p.teacher_steps) {
        kd::train::lm_eval_result r;
        kd::check(evaluate(t, d.t_valid, d.t_real, r));
        bar.clear();
        log_eval(evals, "teacher", s, s * tokens_per_step, r, true);
        out.final_bpb = r.bits_per_byte;
        out.best_bpb = std::fmin(out.best_bpb, r.bits_per_byte);  // fmin skips the initial NaN
      }
      s0 = s;
      if (due && (s % p.ckpt_every == 0 || guard.requested() || s == o.stop_after)) checkpoint(dir / "ckpt", st);
      if (due && (guard.requested() || s == o.stop_after)) {
        bar.clear();
        std::printf("teacher: stopped at step %lld (%s); resume with --resume\n", static_cast<long long>(s),
                    guard.requested() ? "signal" : "--stop-after");
        out.exit = guard.requested() ? 128 + guard.signal_number() : 75;
        return out;
      }
    }
    bar.clear();
    kd::check(logger.finish());
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    out.steps = p.teacher_steps;
    out.tokens = p.teacher_steps * tokens_per_step;
    out.tokens_per_s = static_cast<double>((p.teacher_steps - bar.first) * tokens_per_step) / std::max(secs, 1e-9);
    kd::check(kd::model::save_checkpoint(t, p.teacher, (dir / "final").string()));
    // Expert utilization on the validation text, for the report's histogram.
    kd::train::lm_eval_result r;
    kd::check(evaluate(t, d.t_valid, d.t_real, r));
    json layers = json::array();
    const auto moe = step.moe_layers();
    for (std::size_t i = 0; i < r.expert_shares.size(); ++i) {
      json counts = json::array();
      for (double x : r.expert_shares[i]) counts.push_back(x * static_cast<double>(r.tokens));
      layers.push_back({{"layer", moe[i]}, {"counts", counts}});
    }
    std::ofstream(dir / "experts.json") << json{{"layers", layers}}.dump(1) << '\n';
    std::printf("teacher: done, %.0f tokens/s, final val %.4f bits/byte; saved %s\n", out.tokens_per_s, out.final_bpb,
                (dir / "final").string().c_str());
    return out;
  }

  template <class State>
  void checkpoint(const fs::path& dir, State& st) {
    std::string written;
    kd::check(kd::save_run_checkpoint(dir.string(), st, {}, &written));
  }

  template <class State>
  void resume_from(const fs::path& dir, State& st, std::int64_t& s0) {
    std::string found;
    kd::check(kd::find_latest_checkpoint(dir.string(), found));
    kd::check(kd::load_run_checkpoint(found, st));
    if (rank() == 0) std::printf("resumed from %s (step %lld)\n", found.c_str(), static_cast<long long>(s0));
  }

  // -- student: distill (teacher != nullptr) or scratch --
  template <class Policy = kd::train::distill_policy<>>
  phase_result run_student(bool distill, const std::string& phase, bool quiet = false, std::int64_t steps_override = 0) {
    phase_result out;
    const std::int64_t steps = steps_override > 0 ? steps_override : p.steps;
    const fs::path dir = phase_dir(phase);
    fs::create_directories(dir);
    std::unique_ptr<model_t> teacher;
    if (distill) {
      const fs::path tdir = phase_dir("teacher") / "final";
      kd::model::any_config tc;
      kd::check(kd::model::read_config(tdir.string(), tc));
      teacher = std::make_unique<model_t>(b, kd::model::make_arch(tc));
      kd::check(teacher->allocate(false));
      kd::check(kd::model::load_weights(*teacher, tdir.string()));
    }
    model_t s(b, kd::model::make_arch(p.student));
    kd::check(s.allocate(true));
    kd::check(s.initialize(p.student.initializer_range, o.seed ^ 0x57u));  // the same init for distill and scratch
    kd::objective obj;
    obj.add("z_loss", kd::fixed(o.w_z));
    const auto ramp = static_cast<std::int64_t>(o.kd_ramp * static_cast<double>(steps));
    if (distill) {
      obj.add("kd", kd::schedule<typename Policy::kd_curve>{0.0, o.w_kd, ramp, 0, 0});
      if (o.w_feature > 0) obj.add("feature", kd::fixed(o.w_feature));
      if (o.w_route > 0) obj.add("route", kd::fixed(o.w_route));
      obj.temperature(kd::schedule<kd::curve::cosine>{
          o.t_start, o.t_end, static_cast<std::int64_t>(o.t_ramp * static_cast<double>(steps)), 0, 0});
    }
    kd::check(obj.validate());
    kd::train::distill_step<model_t, model_t, Policy> step;
    kd::train::distill_options so;
    so.chunk_rows = p.chunk_rows;
    so.vocab = d.s_real;
    so.window = kLogEvery;
    so.seed = o.seed;
    so.comm = comm;
    kd::check(step.init(teacher.get(), s, &d.map, obj, so, adamw_for(p.lr, steps)));
    kd::train::text_loader loader;
    kd::train::loader_state restored;
    std::int64_t s0 = 0;
    kd::early_stopping stopper({.patience = o.patience, .min_delta = 1e-4});
    json cj = run_config_json(o, p, backend_name);
    cj["phase"] = phase;
    cj["policy"] = {std::string(Policy::curve_name), std::string(Policy::feature_name), std::string(Policy::divergence_name)};
    const std::string cfg = cj.dump();
    kd::run_state<B, kd::model::dense_config, typename kd::train::step_backend<B>::optimizer> st;
    st.model = &s;
    st.model_config = &p.student;
    st.optimizer = &step.optimizer();
    st.step = &s0;
    st.run_config = cfg;
    st.objective = &obj;
    st.early_stopping = &stopper;
    st.extra.push_back(loader_part(loader, restored));
    if (distill && step.side().size() > 0) {
      st.extra.push_back(arena_part("side_params", b, step.side().params.data(), step.side().size()));
      st.extra.push_back(kd::optimizer_part("side_optimizer", step.side_optimizer()));
    }
    if (o.resume && !quiet) resume_from(dir / "ckpt", st, s0);
    kd::check(loader.init(stream_of(d.t_train), stream_of(d.s_train), loader_options(), restored));
    const bool lead = rank() == 0;  // the rank that writes; the others compute the same decisions
    if (!lead) quiet = true;
    std::ofstream log, evals;
    if (lead) {
      kd::check(open_log(dir / "log.jsonl", s0, log));
      kd::check(open_log(dir / "eval.jsonl", s0, evals));
    }
    kd::metrics_logger<cadence> logger(quiet ? nullptr : &std::cout, lead ? &log : nullptr);
    std::optional<kd::interrupt_guard> guard;
    if (own_guard) guard.emplace();
    const auto interrupted = [] { return kd::detail::interrupt_signal().load(); };
    progress bar;
    bar.tty = bar.tty && !quiet;
    bar.first = s0;
    const std::int64_t tokens_per_step = o.accum * p.batch * p.seq * ranks();
    std::vector<kd::train::text_batch> micro(static_cast<std::size_t>(o.accum));
    if (!quiet)
      std::printf("%s: Llama %lld layers, hidden %lld, %zu parameters, %s; %lld steps of %lld tokens; %s%s\n", phase.c_str(),
                  static_cast<long long>(p.student.num_hidden_layers), static_cast<long long>(p.student.hidden_size),
                  s.table().size(), backend_name.c_str(), static_cast<long long>(steps), static_cast<long long>(tokens_per_step),
                  distill ? "LM + KD (vocab map, aligned positions) + feature + route + z-loss" : "LM + z-loss only",
                  s0 > 0 ? (" (resumed at step " + std::to_string(s0) + ")").c_str() : "");
    const auto t0 = std::chrono::steady_clock::now();
    std::vector<kd::train::step_record> recs;
    for (std::int64_t k = s0 + 1; k <= steps; ++k) {
      for (auto& tb : micro) kd::check(loader.next(tb));
      kd::check(step.step(std::span<const kd::train::text_batch>(micro), k));
      const bool due = cadence::due(k) || k == steps;
      if (due) {
        kd::check(step.flush(recs));
        bar.clear();
        for (const auto& r : recs) {
          kd::objective_evaluation ev;
          kd::check(obj.combine(r.step, r.values, ev));  // a NaN/Inf component stops the run here, named
          kd::record(logger, ev);
          if (distill) logger.record("temperature", ev.temperature);
          kd::check(logger.end_step(r.step));
        }
      }
      bar.show(phase.c_str(), k, steps);
      bool stop = false;
      if (k % p.eval_every == 0 || k == steps) {
        kd::train::lm_eval_result r;
        kd::check(evaluate(s, d.s_valid, d.s_real, r));
        bar.clear();
        const bool ramping = obj.ramping(k) && k < steps;
        log_eval(evals, phase.c_str(), k, k * tokens_per_step, r, !ramping, quiet);
        out.final_bpb = r.bits_per_byte;
        out.best_bpb = std::fmin(out.best_bpb, r.bits_per_byte);  // fmin skips the initial NaN
        kd::check(stopper.update(r.loss, ramping, stop));
        if (comm != nullptr) {  // rank 0's decision for every rank
          std::int64_t flag = stop ? 1 : 0;
          kd::check(comm->broadcast_host(&flag, sizeof flag, 0));
          stop = flag != 0;
        }
      }
      s0 = k;
      // A signal seen by any rank stops every rank at the same logged step.
      std::int64_t signal = due ? interrupted() : 0;
      if (due && comm != nullptr) kd::check(comm->all_reduce_host(&signal, 1, kd::reduce_op::max));
      if (due && (k % p.ckpt_every == 0 || signal != 0 || k == o.stop_after || stop) && !quiet) checkpoint(dir / "ckpt", st);
      if (due && (signal != 0 || k == o.stop_after)) {
        bar.clear();
        if (lead)
          std::printf("%s: stopped at step %lld (%s); resume with --resume\n", phase.c_str(), static_cast<long long>(k),
                      signal != 0 ? "signal" : "--stop-after");
        out.exit = signal != 0 ? 128 + static_cast<int>(signal) : 75;
        return out;
      }
      if (stop) {
        out.stopped_early = true;
        if (!quiet) std::printf("%s: early stop at step %lld (best counted val loss %.4f)\n", phase.c_str(),
                                static_cast<long long>(k), stopper.best());
        break;
      }
    }
    bar.clear();
    kd::check(logger.finish());
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    out.steps = s0;
    out.tokens = s0 * tokens_per_step;
    out.tokens_per_s = static_cast<double>((s0 - bar.first) * tokens_per_step) / std::max(secs, 1e-9);
    if (!quiet) {
      kd::check(kd::model::save_checkpoint(s, p.student, (dir / "final").string()));
      std::printf("%s: done, %.0f tokens/s, final val %.4f bits/byte; saved %s\n", phase.c_str(), out.tokens_per_s,
                  out.final_bpb, (dir / "final").string().c_str());
    }
    return out;
  }

  // -- eval: every finished model on the whole validation text --
  int run_eval(json& summary) {
    for (const char* phase : {"teacher", "distill", "scratch"}) {
      const fs::path dir = phase_dir(phase) / "final";
      if (!fs::exists(dir / "config.json")) {
        std::printf("eval: %s: no finished model in %s\n", phase, dir.string().c_str());
        continue;
      }
      kd::model::any_config c;
      kd::check(kd::model::read_config(dir.string(), c));
      model_t m(b, kd::model::make_arch(c));
      kd::check(m.allocate(false));
      kd::check(kd::model::load_weights(m, dir.string()));
      const bool is_teacher = std::string(phase) == "teacher";
      kd::train::lm_eval_result r;
      kd::check(kd::train::evaluate_lm(m, stream_of(is_teacher ? d.t_valid : d.s_valid), p.batch, p.seq,
                                       is_teacher ? d.t_real : d.s_real, 0, p.chunk_rows, r));
      std::printf("eval %-8s | %s | val loss %.4f nats/token | ppl %8.2f | %.4f bits/byte | %lld tokens, %lld bytes\n",
                  phase, is_teacher ? "qwen3 tokens" : "gpt2 tokens ", r.loss, r.ppl, r.bits_per_byte,
                  static_cast<long long>(r.tokens), static_cast<long long>(r.bytes));
      summary[std::string(phase) + "_val_bpb"] = r.bits_per_byte;
      summary[std::string(phase) + "_val_loss"] = r.loss;
      summary[std::string(phase) + "_val_ppl"] = r.ppl;
      if (is_teacher && !r.expert_shares.empty()) {
        const double min_fair = min_share_of_fair(r.expert_shares);
        summary["teacher_min_expert_share_of_fair"] = min_fair;
      }
    }
    return 0;
  }
};

// ---- The compile-time policy grid ----------------------------------------------------------------
template <class B, class... Policies>
struct grid_runner {
  static void run(trainer<B>& tr, std::vector<std::pair<std::string, phase_result>>& rows, std::int64_t steps) {
    (run_one<Policies>(tr, rows, steps), ...);
  }
  template <class Policy>
  static void run_one(trainer<B>& tr, std::vector<std::pair<std::string, phase_result>>& rows, std::int64_t steps) {
    const std::string name = std::string(Policy::curve_name) + " x " + std::string(Policy::feature_name) + " x " +
                             std::string(Policy::divergence_name);
    const std::string dir = "grid/" + std::to_string(rows.size());
    auto r = tr.template run_student<Policy>(true, dir, true, steps);
    std::printf("  %-34s val %.4f bits/byte (best %.4f)\n", name.c_str(), r.final_bpb, r.best_bpb);
    rows.emplace_back(name, r);
  }
};

template <class B>
int run_grid(trainer<B>& tr, std::int64_t steps) {
  using namespace kd;
  using namespace kd::train;
  std::vector<std::pair<std::string, phase_result>> rows;
  std::printf("grid: 12 distillation policies (curve x feature normalization x divergence), %lld steps each\n",
              static_cast<long long>(steps));
  grid_runner<B,
              distill_policy<forward_kl, rms_mse, curve::linear>, distill_policy<forward_kl, rms_mse, curve::cosine>,
              distill_policy<forward_kl, rms_mse, curve::constant>, distill_policy<forward_kl, kd::cosine, curve::linear>,
              distill_policy<forward_kl, kd::cosine, curve::cosine>, distill_policy<forward_kl, kd::cosine, curve::constant>,
              distill_policy<jsd, rms_mse, curve::linear>, distill_policy<jsd, rms_mse, curve::cosine>,
              distill_policy<jsd, rms_mse, curve::constant>, distill_policy<jsd, kd::cosine, curve::linear>,
              distill_policy<jsd, kd::cosine, curve::cosine>, distill_policy<jsd, kd::cosine, curve::constant>>::run(tr, rows, steps);
  std::sort(rows.begin(), rows.end(), [](const auto& a, const auto& b) { return a.second.best_bpb < b.second.best_bpb; });
  std::printf("\nrank | policy (kd curve x feature normalization x divergence) | best val bits/byte | final\n");
  for (std::size_t i = 0; i < rows.size(); ++i)
    std::printf("%4zu | %-56s | %.4f | %.4f\n", i + 1, rows[i].first.c_str(), rows[i].second.best_bpb,
                rows[i].second.final_bpb);
  std::ofstream f(fs::path(tr.o.run) / "grid.json");
  json j = json::array();
  for (const auto& [n, r] : rows) j.push_back({{"policy", n}, {"best_bpb", r.best_bpb}, {"final_bpb", r.final_bpb}});
  f << j.dump(1) << '\n';
  return 0;
}


// ---- bench: the distillation step at the seed geometry (random weights and tokens, every position aligned) --
// Teacher Qwen3-MoE 978M frozen, student SmolLM-135M geometry, 8 x 1024 tokens, LM + KD (T = 2, forward KL
// through the vocab map) + feature loss (projected final hidden states), AdamW: the step of
// ../shared/baselines/torch_distill_step.py. Prints ms/step, tokens/s, model FLOP utilisation and peak memory.
template <class B>
int run_bench(B& b, const options& o, const std::string& backend_name, std::int64_t steps, double peak_tflops,
              const std::function<std::int64_t()>& used_bytes, const std::function<void()>& sync,
              kd::communicator* group = nullptr) {
  // Data parallel (--gpus N): every rank steps on its own 8 x 1024 tokens with replicas of both models
  // (same seeds), gradients all-reduced in buckets; rank 0 prints, tokens/s counts the whole group.
  const int ranks = group != nullptr ? group->size() : 1;
  const bool lead = group == nullptr || group->rank() == 0;
  using model_t = kd::model::transformer<B>;
  const auto tc = kd::model::seed_teacher();
  const auto sc = kd::model::seed_student();
  const std::int64_t batch = o.batch > 0 ? o.batch : 8, seq = o.seq > 0 ? o.seq : 1024, n = batch * seq;
  model_t t(b, kd::model::make_arch(tc)), s(b, kd::model::make_arch(sc));
  kd::check(t.allocate(false));
  kd::check(t.initialize(tc.initializer_range, o.seed));
  kd::check(s.allocate(true));
  kd::check(s.initialize(sc.initializer_range, o.seed ^ 0x57u));
  // A map like the real one: 42,257 shared strings, injective into the student's 50,257 ids.
  kd::rng r(o.seed + 7919u * static_cast<std::uint64_t>(group != nullptr ? group->rank() : 0));  // each rank its own tokens
  std::vector<std::pair<std::int32_t, std::int32_t>> pairs;
  for (std::int32_t i = 0; i < 42257; ++i) pairs.emplace_back(i * 3 + 1, i);
  kd::vocab_map map;
  kd::check(kd::vocab_map::from_pairs(pairs, kTeacherRows, kStudentRows, map));
  kd::objective obj;
  obj.add("kd", kd::fixed(1.0)).add("feature", kd::fixed(1.0));
  obj.temperature(kd::schedule<kd::curve::constant>{2.0, 2.0, 0, 0, 0});
  kd::train::distill_step<model_t, model_t> step;
  kd::train::distill_options so;
  so.chunk_rows = 2048;
  so.vocab = 50257;
  so.window = kLogEvery;  // as the trainer runs: losses read (one synchronisation) once per logged step
  so.comm = group;
  kd::adamw_options ao;
  ao.schedule = {.peak = 1e-4, .floor = 1e-5, .warmup_steps = 1, .total_steps = 1000};
  kd::check(step.init(&t, s, &map, obj, so, ao));
  kd::train::text_batch tb;
  tb.batch = batch;
  tb.seq = tb.teacher_seq = seq;
  for (std::int64_t i = 0; i < n; ++i) {
    tb.student_ids.push_back(static_cast<std::int32_t>(r.below(50257)));
    tb.teacher_ids.push_back(static_cast<std::int32_t>(r.below(151643)));
    tb.aligned_student.push_back(static_cast<std::int32_t>(i));
    tb.aligned_teacher.push_back(static_cast<std::int32_t>(i));
  }
  tb.student_labels.assign(tb.student_ids.begin() + 1, tb.student_ids.end());
  tb.student_labels.push_back(kd::default_ignore_index);
  tb.teacher_labels = tb.student_labels;
  std::vector<kd::train::step_record> recs;
  std::int64_t peak = 0;
  auto one = [&](std::int64_t k) {
    kd::check(step.step(tb, k));
    if (k % kLogEvery == 0) {
      peak = std::max(peak, used_bytes());
      kd::check(step.flush(recs));  // every loss value of the window, checked
    }
  };
  for (std::int64_t k = 1; k <= kLogEvery; ++k) one(k);  // warm-up: one logging window
  sync();
  peak = std::max(peak, used_bytes());
  const std::int64_t timed = (steps + kLogEvery - 1) / kLogEvery * kLogEvery;  // whole windows
  const auto t0 = std::chrono::steady_clock::now();
  for (std::int64_t k = kLogEvery + 1; k <= kLogEvery + timed; ++k) one(k);
  sync();
  const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / static_cast<double>(timed);
  // Model FLOPs: teacher forward 2 x active parameters, student 6 x parameters, per token, plus attention
  // (causal: half of the 4 x seq x width per layer forward, x3 for the student's backward).
  // Teacher: active parameters (top-k of E experts) less the embedding table (a lookup, not a product).
  const double ta = static_cast<double>(t.table().size()) -
                    static_cast<double>(tc.num_hidden_layers * (tc.num_experts - tc.num_experts_per_tok) * 3 *
                                        tc.hidden_size * tc.moe_intermediate_size) -
                    static_cast<double>(tc.vocab_size * tc.hidden_size);
  const double sp = static_cast<double>(s.table().size());
  const double attn_t = 2.0 * 24 * seq * 16 * 64, attn_s = 6.0 * 30 * seq * 9 * 64;
  const double flops = static_cast<double>(n) * (2.0 * ta + 6.0 * sp + attn_t + attn_s);
  if (lead) {
    std::printf("bench (%s): seed geometry %lld x %lld tokens%s, teacher %zu params frozen, student %zu params, "
                "LM + KD (T=2, vocab map) + feature, AdamW\n",
                backend_name.c_str(), static_cast<long long>(batch), static_cast<long long>(seq),
                ranks > 1 ? (" per GPU x " + std::to_string(ranks) + " data-parallel ranks (NCCL)").c_str() : "",
                t.table().size(), s.table().size());
    std::printf("kd: %.1f ms/step, %.0f tokens/s (%d GPU%s, %.0f per GPU), %.1f TFLOP/s model FLOPs per GPU (MFU %.1f%% of %.0f), "
                "peak %.2f GB in use\n",
                dt * 1e3, static_cast<double>(n * ranks) / dt, ranks, ranks > 1 ? "s" : "", static_cast<double>(n) / dt,
                flops / dt / 1e12, 100.0 * flops / dt / 1e12 / peak_tflops, peak_tflops, static_cast<double>(peak) / 1e9);
    for (const auto& [name, v] : recs.back().values) std::printf("  %s %.4f", name.c_str(), v);
    std::printf("\n");
  }
  if (ranks > 1) return 0;  // the breakdown and the profile below are the one-GPU step's
  // Where the time goes: the frozen teacher's forward alone, and the student's LM-only step (same batch).
  kd::model::forward_options fo;
  fo.training = false;
  fo.logits = false;
  auto time_it = [&](auto&& fn) {
    fn(0);
    sync();
    const auto a = std::chrono::steady_clock::now();
    for (std::int64_t k = 1; k <= steps; ++k) fn(k);
    sync();
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - a).count() / static_cast<double>(steps);
  };
  const double t_fwd = time_it([&](std::int64_t) { kd::check(t.forward(tb.teacher_ids, batch, seq, fo)); });
  kd::objective lm_only;
  kd::train::distill_step<model_t, model_t> lm_step;
  kd::check(lm_step.init(nullptr, s, nullptr, lm_only, so, ao));
  const double t_lm = time_it([&](std::int64_t k) {
    kd::check(lm_step.step(tb, k + 1));
    if ((k + 1) % kLogEvery == 0 || k == steps) kd::check(lm_step.flush(recs));
  });
  std::printf("breakdown: teacher forward %.1f ms, student LM-only step %.1f ms, distillation terms (teacher logits, KD, "
              "feature, gathers) %.1f ms\n",
              t_fwd * 1e3, t_lm * 1e3, (dt - t_fwd - t_lm) * 1e3);
  if constexpr (requires(std::vector<typename B::row> rows) { b.report(rows); }) {
    // One more logging window with every op, loss and optimizer step bracketed by CUDA events: GPU time
    // per op and per step; what the ops leave of the wall time is the GPU waiting for the host.
    b.enable(true);
    b.reset();
    const auto a = std::chrono::steady_clock::now();
    for (std::int64_t k = 1; k <= kLogEvery; ++k) one(2 * kLogEvery + timed + k);
    std::vector<typename B::row> rows;
    kd::check(b.report(rows));
    const double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - a).count() * 1e3 / kLogEvery;
    b.enable(false);
    double gpu = 0;
    for (const auto& row : rows) gpu += row.ms;
    gpu /= kLogEvery;
    std::printf("profile (one window, events around every op; ms per step): wall %.2f, GPU ops %.2f, GPU idle %.2f\n", wall,
                gpu, wall - gpu);
    for (const auto& row : rows)
      if (row.ms / kLogEvery >= 0.05)
        std::printf("  %-34s %6lld calls %8.3f ms %5.1f%%\n", row.op.c_str(), row.calls / kLogEvery, row.ms / kLogEvery,
                    100.0 * row.ms / kLogEvery / gpu);
  }
  return 0;
}

// --ranks N on the CPU: one thread per rank, each with its own backend and models, over one thread_group;
// this thread holds the process's interrupt guard. A rank that fails fails the group (the others' next
// collective returns an error instead of waiting) and its error is the run's.
template <class B>
phase_result run_thread_ranks(const options& o, const preset& p, text_data& d, const std::string& backend,
                              bool distill, const std::string& phase) {
  const auto n = static_cast<int>(o.ranks);
  kd::thread_group group(n, std::chrono::minutes(10));
  kd::interrupt_guard guard;
  std::vector<phase_result> results(static_cast<std::size_t>(n));
  std::vector<std::string> errors(static_cast<std::size_t>(n));
  std::vector<std::thread> threads;
  for (int r = 0; r < n; ++r)
    threads.emplace_back([&, r] {
      try {
        B br;
        trainer<B> tr{br, o, p, d, backend};
        tr.comm = &group.member(r);
        tr.own_guard = false;
        results[static_cast<std::size_t>(r)] = tr.run_student(distill, phase);
      } catch (const std::exception& e) {
        errors[static_cast<std::size_t>(r)] = e.what();
        group.fail("rank " + std::to_string(r) + " stopped: " + e.what());
      }
    });
  for (auto& t : threads) t.join();
  for (int r = 0; r < n; ++r)  // the first rank that failed on its own (not by the group's failure)
    if (!errors[static_cast<std::size_t>(r)].empty() && errors[static_cast<std::size_t>(r)].find("the group failed") == std::string::npos)
      kd::check(kd::status(kd::errc::backend_error, "rank " + std::to_string(r) + ": " + errors[static_cast<std::size_t>(r)]));
  for (int r = 0; r < n; ++r)
    if (!errors[static_cast<std::size_t>(r)].empty())
      kd::check(kd::status(kd::errc::backend_error, "rank " + std::to_string(r) + ": " + errors[static_cast<std::size_t>(r)]));
  std::printf("%s: %d data-parallel CPU ranks, global batch %lld x %lld tokens per step\n", phase.c_str(), n,
              static_cast<long long>(o.accum * p.batch * n), static_cast<long long>(p.seq));
  return results[0];
}

template <class B>
int run_command(B& b, const options& o, const preset& p, const std::string& backend_name,
                kd::communicator* comm = nullptr) {
  const std::string data = !o.data.empty() ? o.data : std::getenv("KD_TEXT_DATA") ? std::getenv("KD_TEXT_DATA") : KD_TRAIN_DEFAULT_DATA;
  const std::int64_t rank = comm != nullptr ? comm->rank() : 0;
  fs::create_directories(o.run);
  if (rank == 0) {  // the run's identity (a checkpoint's too: the global batch, not the rank count) + the ranks
    json cj = run_config_json(o, p, backend_name);
    cj["ranks"] = world_size(o);
    cj["batch_per_rank"] = p.batch;
    std::ofstream cfg(fs::path(o.run) / "config.json");
    cfg << cj.dump(2) << '\n';
  }
  // Rank 0 builds the token shards in the run folder first; the other ranks then open them.
  text_data d;
  if (rank == 0) kd::check(load_data(data, o.corpus, o.run, p.corpus_bytes, d, true));
  if (comm != nullptr) kd::check(comm->barrier());
  if (rank != 0) kd::check(load_data(data, o.corpus, o.run, p.corpus_bytes, d, false));
  trainer<B> tr{b, o, p, d, backend_name};
  tr.comm = comm;
  json summary = json::object();
  {
    std::ifstream in(fs::path(o.run) / "summary.json");
    if (in) try { summary = json::parse(in); } catch (const json::exception&) { summary = json::object(); }
  }
  auto save_summary = [&] {
    if (rank == 0) std::ofstream(fs::path(o.run) / "summary.json") << summary.dump(2) << '\n';
  };
  auto record = [&](const char* phase, const phase_result& r) {
    summary[std::string(phase) + "_tokens_per_s"] = r.tokens_per_s;
    summary[std::string(phase) + "_steps"] = r.steps;
    summary[std::string(phase) + "_tokens"] = r.tokens;
    save_summary();
  };
  const auto& c = o.cmd;
  if (c == "teacher" || c == "demo") {
    const auto r = tr.run_teacher();
    if (r.exit) return r.exit;
    record("teacher", r);
  }
  // CPU data parallel (--ranks N): N ranks of this process on threads, one thread_group.
  auto student = [&](bool distill, const char* phase) {
    if constexpr (std::is_default_constructible_v<B>) {
      if (o.ranks > 1 && comm == nullptr) return run_thread_ranks<B>(o, p, d, backend_name, distill, phase);
    }
    return tr.run_student(distill, phase);
  };
  if (c == "distill" || c == "demo") {
    const auto r = student(true, "distill");
    if (r.exit) return r.exit;
    record("distill", r);
  }
  if (c == "scratch" || c == "demo") {
    const auto r = student(false, "scratch");
    if (r.exit) return r.exit;
    record("scratch", r);
  }
  if (c == "grid") return run_grid(tr, std::max<std::int64_t>(10, p.steps / 2));
  if (c == "eval" || c == "demo") {
    tr.run_eval(summary);
    save_summary();
  }
  if (c == "report" || c == "demo") {
    summary["backend"] = backend_name;
    summary["preset"] = p.name;
    save_summary();
    kd::train::report_summary rs;
    kd::check(kd::train::write_report(o.run, rs));
    std::printf("\n%s\nreport: %s\n", rs.table.c_str(), (fs::path(o.run) / "report.html").string().c_str());
    if (c == "demo") {
      const double t = summary.value("teacher_val_bpb", NAN), dd = summary.value("distill_val_bpb", NAN),
                   sc = summary.value("scratch_val_bpb", NAN);
      const double closed = (sc - dd) / (sc - t);
      std::printf("whole validation text: distilled student %.4f vs scratch %.4f bits/byte (teacher %.4f): %s, %.0f%% of the gap closed\n", dd, sc, t,
                  dd < sc ? "distillation helps" : "distillation did NOT help", 100 * closed);
      return dd < sc ? 0 : 1;
    }
  }
  return 0;
}

#if KD_TRAIN_NCCL
// --gpus N: starts this program once per GPU (--rank r --nccl-id RUN/nccl_id), then waits. A rank that
// fails (exit code or signal) stops the others (SIGTERM: they checkpoint at their next logged step, or
// their collectives time out); a signal to the launcher is passed on to every rank.
int launch_gpu_ranks(int argc, char** argv, const options& o) {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices < o.gpus)
    return usage("--gpus " + std::to_string(o.gpus) + ": this machine has " + std::to_string(devices) + " CUDA devices");
  ::setenv("NCCL_NVLS_ENABLE", "0", 1);  // NVLink multicast stays off (shared machines)
  fs::create_directories(o.run);
  const std::string id_file = (fs::path(o.run) / "nccl_id").string();
  std::error_code ec;
  fs::remove(id_file, ec);  // a stale id from an earlier run must not be read
  std::vector<pid_t> pids;
  for (std::int64_t r = 0; r < o.gpus; ++r) {
    const pid_t pid = ::fork();
    if (pid < 0) {
      std::perror("kd_train: fork");
      for (pid_t q : pids) ::kill(q, SIGTERM);
      return 3;
    }
    if (pid == 0) {
      std::vector<std::string> args(argv, argv + argc);
      args.insert(args.end(), {"--rank", std::to_string(r), "--nccl-id", id_file});
      std::vector<char*> cargs;
      for (auto& a : args) cargs.push_back(a.data());
      cargs.push_back(nullptr);
      ::execv("/proc/self/exe", cargs.data());
      std::perror("kd_train: exec");
      ::_exit(127);
    }
    pids.push_back(pid);
  }
  kd::interrupt_guard guard;
  bool forwarded = false;
  int result = 0, failed_rank = -1;
  std::size_t running = pids.size();
  while (running > 0) {
    int status = 0;
    const pid_t done = ::waitpid(-1, &status, WNOHANG);
    if (done == 0) {
      if (guard.requested() && !forwarded) {
        for (pid_t q : pids) ::kill(q, SIGTERM);
        forwarded = true;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
      continue;
    }
    if (done < 0) break;
    --running;
    const auto r = static_cast<int>(std::find(pids.begin(), pids.end(), done) - pids.begin());
    const int code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    if (code != 0 && result == 0) {
      result = code;
      failed_rank = r;
      if (code != 75 && code < 128) {  // an error, not a requested stop: the other ranks cannot go on
        std::fprintf(stderr, "kd_train: rank %d failed (exit %d); stopping the other ranks\n", r, code);
        for (pid_t q : pids)
          if (q != done) ::kill(q, SIGTERM);
      }
    }
  }
  if (result != 0 && result != 75)
    std::fprintf(stderr, "kd_train: data-parallel run stopped: rank %d exited with %d\n", failed_rank, result);
  return result;
}

// One rank of --gpus N joins the group: the NCCL id (rank 0 makes it, the others read it), then the
// communicator on the rank's context (its GPU already current).
kd::status join_gpu_group(const options& o, kd::cuda::context& ctx, std::unique_ptr<kd::cuda::nccl_communicator>& comm) {
  ncclUniqueId id;
  if (o.rank == 0) {
    if (ncclGetUniqueId(&id) != ncclSuccess) return {kd::errc::backend_error, "ncclGetUniqueId failed"};
    KD_TRY(kd::cuda::write_nccl_id(o.nccl_id, id));
  } else {
    KD_TRY(kd::cuda::read_nccl_id(o.nccl_id, id, std::chrono::minutes(2)));
  }
  return kd::cuda::nccl_communicator::create(ctx, static_cast<int>(o.rank), static_cast<int>(o.gpus), id,
                                             std::chrono::minutes(10), comm);
}
#endif

#if KD_TRAIN_CUDA
// This process's GPU group: none for one GPU; a rank of --gpus N joins its NCCL group on construction.
class gpu_group {
 public:
  gpu_group(const options& o, kd::cuda::context& ctx) {
#if KD_TRAIN_NCCL
    if (o.gpus > 1) kd::check(join_gpu_group(o, ctx, nccl_));
#else
    (void)o;
    (void)ctx;
#endif
  }
  kd::communicator* get() const {
#if KD_TRAIN_NCCL
    return nccl_.get();
#else
    return nullptr;
#endif
  }

 private:
#if KD_TRAIN_NCCL
  std::unique_ptr<kd::cuda::nccl_communicator> nccl_;
#endif
};
#endif

bool have_gpu() {
#if KD_TRAIN_CUDA
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
#else
  return false;
#endif
}

}  // namespace

int main(int argc, char** argv) {
  options o;
  std::string err;
  if (argc >= 2 && (std::string(argv[1]) == "--help" || std::string(argv[1]) == "-h")) {
    std::printf("%s", kUsage);
    return 0;
  }
  if (!parse_args(argc, argv, o, err)) return usage(err);
  static const char* cmds[] = {"teacher", "distill", "scratch", "eval", "report", "demo", "grid", "bench"};
  if (std::none_of(std::begin(cmds), std::end(cmds), [&](const char* c) { return o.cmd == c; }))
    return usage("unknown command '" + o.cmd + "'");
  try {
    const bool gpu = have_gpu();
    bool use_gpu = false;
    if (o.device == "cuda") {
      if (!gpu) return usage("--device cuda: no CUDA device (or a CPU-only build)");
      use_gpu = true;
    } else if (o.device == "auto") {
      use_gpu = gpu;
    } else if (o.device != "cpu") {
      return usage("--device must be auto, cpu or cuda");
    }
    std::string pname = o.preset.empty() ? (use_gpu ? "demo" : "tiny") : o.preset;
    preset p;
    if (pname == "tiny") p = tiny_preset();
    else if (pname == "demo") p = demo_preset();
    else return usage("--preset must be tiny or demo");
    p = resolve(o, p);
    if (auto s = check_flags(o, p); !s.ok()) return usage(s.message());
    if (!use_gpu)
      std::printf("kd_train: %s, on the CPU reference backend (float) with the '%s' preset%s\n",
                  gpu ? "--device cpu" : "no GPU", p.name.c_str(),
                  p.name == "tiny" ? ": narrow models on a slice of the corpus, real tokenizers and vocabularies" : "");
    if (use_gpu && o.ranks > 1) return usage("--ranks runs CPU ranks (with --device cpu); on GPUs use --gpus N");
    if (!use_gpu && o.gpus > 1) return usage("--gpus " + std::to_string(o.gpus) + ": no CUDA device");
#if KD_TRAIN_NCCL
    if (o.gpus > 1 && o.rank < 0) return launch_gpu_ranks(argc, argv, o);  // this process starts the ranks
    if (o.gpus > 1 && cudaSetDevice(static_cast<int>(o.rank)) != cudaSuccess)
      return usage("--rank " + std::to_string(o.rank) + ": no such CUDA device");
#else
    if (o.gpus > 1) return usage("--gpus: this kd_train was built without NCCL");
#endif
    if (o.cmd == "bench") {
      const std::int64_t steps = o.steps > 0 ? o.steps : 10;
#if KD_TRAIN_CUDA
      if (use_gpu) {
        kd::cuda::context ctx;
        gpu_group group(o, ctx);
        kd::model::profiled_ops<kd::bfloat16> b(ctx);  // events off but for the last, profiled window
        b.enable(false);
        cudaDeviceProp prop{};
        int dev = 0;
        cudaGetDevice(&dev);
        cudaGetDeviceProperties(&prop, dev);
        std::size_t free0 = 0, total = 0;
        cudaMemGetInfo(&free0, &total);
        const std::int64_t base = static_cast<std::int64_t>(total - free0);  // other processes and the context
        auto used = [&] {
          std::size_t f = 0, t = 0;
          cudaMemGetInfo(&f, &t);
          return static_cast<std::int64_t>(t - f) - base;
        };
        return run_bench(b, o, std::string("cuda bf16 ") + prop.name, steps, 989.0, used,
                         [&] { kd::check(ctx.sync_status()); }, group.get());
      }
#endif
      kd::model::cpu_ops<float> b;
      return run_bench(b, o, "cpu float32", steps, 1.0, [] { return std::int64_t{0}; }, [] {});
    }
    if (!use_gpu) {
      kd::model::cpu_ops<float> b;
      p.teacher.dtype = p.student.dtype = kd::model::weight_dtype::float32;
      return run_command(b, o, p, "cpu float32");
    }
#if KD_TRAIN_CUDA
    kd::cuda::context ctx;
    kd::model::cuda_ops<kd::bfloat16> b(ctx);
    b.set_deterministic(o.deterministic);
    p.teacher.dtype = p.student.dtype = kd::model::weight_dtype::bfloat16;
    cudaDeviceProp prop{};
    int dev = 0;
    cudaGetDevice(&dev);
    cudaGetDeviceProperties(&prop, dev);
    gpu_group joined(o, ctx);
    kd::communicator* group = joined.get();  // a rank of --gpus N: its group
    if (group == nullptr)
      std::printf("kd_train: %s, CUDA bf16 (fp32 accumulation, fp32 AdamW master weights), '%s' preset\n", prop.name,
                  p.name.c_str());
    else if (group->rank() == 0)
      std::printf("kd_train: %d data-parallel ranks over NCCL, %s each, CUDA bf16, '%s' preset; global batch %lld x %lld\n",
                  group->size(), prop.name, p.name.c_str(), static_cast<long long>(o.accum * p.batch * group->size()),
                  static_cast<long long>(p.seq));
    return run_command(b, o, p, std::string("cuda bf16 ") + prop.name, group);
#endif
  } catch (const kd::error& e) {
    std::fprintf(stderr, "kd_train: %s\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "kd_train: %s\n", e.what());
    return 3;
  }
  return 0;
}

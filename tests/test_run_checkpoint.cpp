// Run checkpoints (kd/train/run_checkpoint.hpp) and the interrupt guard (kd/train/interrupt.hpp).
#include <doctest/doctest.h>

#include <csignal>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include <kd/model/config.hpp>
#include <kd/model/ops_cpu.hpp>
#include <kd/train/adamw.hpp>
#include <kd/train/run_checkpoint.hpp>
#include <kd/train/interrupt.hpp>

#include "test_util.hpp"

namespace fs = std::filesystem;
namespace km = kd::model;
using cpu = km::cpu_ops<float>;
using model_t = km::transformer<cpu>;

namespace {

using kdtest::temp_dir;

std::string read_all(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  std::ostringstream s;
  s << f.rdbuf();
  return s.str();
}
void write_all(const fs::path& p, const std::string& bytes) {
  std::ofstream f(p, std::ios::binary | std::ios::trunc);
  f << bytes;
}

// A live training run on the CPU: every kind of state a checkpoint holds, advanced by `seed`-driven
// steps so two runs built from different seeds differ in every part.
template <class Config>
struct live_run {
  cpu backend;
  Config config;
  model_t model;
  kd::adamw<float> optimizer;
  std::int64_t step = 0;
  kd::rng data_rng{1}, dropout_rng{2};
  kd::early_stopping stopping{{3, 0.0}};
  kd::dynamic_loss_scaler scaler{{1024.0, 2.0, 0.5, 2, 1.0, 65536.0}};
  kd::objective objective;
  std::string loader_state = "shard-0:offset-0";  // an extension part's live state (a data loader's position)
  kd::run_state<cpu, Config, kd::adamw<float>> state;

  live_run(const Config& c, std::uint64_t seed, std::int64_t steps) : config(c), model(backend, km::make_arch(c)) {
    kd::check(model.allocate(false));
    kd::check(model.initialize(0.3, seed));
    kd::adamw_options o;
    o.schedule.total_steps = 100;
    o.schedule.warmup_steps = 2;
    o.max_grad_norm = 1.0;
    std::span<float> params(model.params(), model.table().size());
    kd::check(optimizer.init(kd::model_segments(model.table()), params, o));
    data_rng.state = seed;
    advance(steps);
    objective.add("kd", kd::schedule<kd::curve::cosine>{0.0, 1.0, 50, 0, 0}).temperature(kd::schedule<kd::curve::linear>{4.0, 1.0, 40, 0, 0});

    state.model = &model;
    state.model_config = &config;
    state.optimizer = &optimizer;
    state.step = &step;
    state.run_config = R"({"lr": 0.001, "batch": 8, "preset": "tiny"})";
    state.rngs = {{"data", &data_rng}, {"dropout", &dropout_rng}};
    state.early_stopping = &stopping;
    state.loss_scaler = &scaler;
    state.objective = &objective;
    state.extra.push_back(loader_part());
  }
  live_run(const live_run&) = delete;

  // `n` training steps: gradients drawn from data_rng (so a resumed run must restore it to continue
  // the same way), an optimizer step, an evaluation and a loss-scaler update each.
  void advance(std::int64_t n) {
    std::span<float> params(model.params(), model.table().size());
    std::vector<float> grads(params.size());
    for (std::int64_t i = 0; i < n; ++i) {
      for (float& g : grads) g = static_cast<float>(data_rng.normal());
      kd::adamw_step_result r;
      kd::check(optimizer.step(params, std::span<const float>(grads), r));
      const auto t = step++;
      (void)dropout_rng.next();
      bool stop = false;
      kd::check(stopping.update(3.0 - 0.1 * static_cast<double>(t) + 0.2 * static_cast<double>(t % 2), false, stop));
      (void)scaler.update(t == 1);
      loader_state = "shard-0:offset-" + std::to_string(step * 4096);
    }
  }

  kd::checkpoint_part loader_part() {
    return {"data",
            [this](std::string& bytes) {
              bytes = loader_state;
              return kd::status{};
            },
            [this](std::string_view bytes, std::function<void()>& commit) {
              if (!bytes.starts_with("shard-")) return kd::status{kd::errc::io_error, "not a loader position"};
              commit = [this, s = std::string(bytes)] { loader_state = s; };
              return kd::status{};
            }};
  }

  // Every bit of the live state, to compare runs and to prove a refused load changed nothing.
  std::string fingerprint() const {
    std::ostringstream os(std::ios::binary);
    os.write(reinterpret_cast<const char*>(model.params()), static_cast<std::streamsize>(model.table().size() * sizeof(float)));
    kd::check(optimizer.save(os));
    const auto es = stopping.state();
    const auto sc = scaler.state();
    os << '|' << step << '|' << data_rng.state << '|' << dropout_rng.state << '|' << kd::detail::ckpt::bits(es.best) << '|'
       << es.bad << '|' << es.stop << '|' << kd::detail::ckpt::bits(sc.scale) << '|' << sc.clean << '|' << sc.skipped << '|'
       << loader_state;
    return std::move(os).str();
  }
};

template <class Config>
void round_trip(const Config& c) {
  temp_dir dir;
  live_run<Config> a(c, 11, 3);
  std::string written;
  REQUIRE(kd::save_run_checkpoint(dir.path.string(), a.state, {}, &written));
  CHECK(written == (dir.path / "step-3").string());
  CHECK(read_all(dir.path / "latest") == "step-3\n");

  live_run<Config> b(c, 99, 5);
  REQUIRE(a.fingerprint() != b.fingerprint());
  std::string found;
  REQUIRE(kd::find_latest_checkpoint(dir.path.string(), found));
  CHECK(found == written);
  const kd::status s = kd::load_run_checkpoint(found, b.state);
  INFO(s.message());
  REQUIRE(s);
  CHECK(b.fingerprint() == a.fingerprint());
  CHECK(std::memcmp(a.model.params(), b.model.params(), a.model.table().size() * sizeof(float)) == 0);
  CHECK(b.optimizer.steps_taken() == 3);
  CHECK(b.step == 3);
  CHECK(b.data_rng.state == a.data_rng.state);
  CHECK(b.stopping.best() == a.stopping.best());
  CHECK(b.scaler.scale() == a.scaler.scale());
  CHECK(b.loader_state == a.loader_state);

  // The model half is a plain HF directory: config.json names the arena's dtype and the weights load alone.
  km::any_config back;
  REQUIRE(km::read_config(written, back));
  REQUIRE(std::holds_alternative<Config>(back));
  CHECK(std::get<Config>(back).dtype == km::weight_dtype::float32);
  cpu cb;
  model_t alone(cb, km::make_arch(back));
  REQUIRE(alone.allocate(false));
  REQUIRE(km::load_weights(alone, written));
  CHECK(std::memcmp(a.model.params(), alone.params(), a.model.table().size() * sizeof(float)) == 0);
}

// Saves a checkpoint of a fresh run, applies `damage` to a copy of it and loads it into another run:
// the load must fail naming `part` and `what`, and leave the live run as it was.
template <class Damage>
void refused(const std::string& part, const std::string& what, Damage damage,
             const km::dense_config& live_config = km::tiny_student()) {
  temp_dir dir;
  std::string written;
  {
    live_run<km::dense_config> a(km::tiny_student(), 11, 3);
    REQUIRE(kd::save_run_checkpoint(dir.path.string(), a.state, {}, &written));
  }
  live_run<km::dense_config> b(live_config, 99, 5);
  damage(fs::path(written), b);
  const std::string before = b.fingerprint();
  const kd::status s = kd::load_run_checkpoint(written, b.state);
  INFO(s.message());
  REQUIRE_FALSE(s);
  CHECK(kdtest::contains(s.message(), "part '" + part + "'"));
  CHECK(kdtest::contains(s.message(), what));
  CHECK(b.fingerprint() == before);
}

std::vector<std::pair<std::string, std::string>> manifest_parts(const fs::path& dir) {
  const auto j = nlohmann::json::parse(read_all(dir / "manifest.json"));
  std::vector<std::pair<std::string, std::string>> out;
  for (const auto& p : j.at("parts")) out.emplace_back(p.at("name").get<std::string>(), p.at("file").get<std::string>());
  return out;
}

// Replaces a part's contents and fixes up the manifest, so only the part's own parsing can object.
void rewrite_part(const fs::path& dir, const std::string& file, const std::string& bytes) {
  write_all(dir / file, bytes);
  auto j = nlohmann::json::parse(read_all(dir / "manifest.json"));
  for (auto& p : j.at("parts"))
    if (p.at("file") == file) {
      p["size"] = bytes.size();
      p["fnv1a64"] = kd::detail::ckpt::hex(kd::fnv1a64(bytes.data(), bytes.size()));
    }
  write_all(dir / "manifest.json", j.dump());
}

}  // namespace

TEST_CASE("fnv1a64: published test vectors") {
  CHECK(kd::fnv1a64("", 0) == 0xcbf29ce484222325ull);
  CHECK(kd::fnv1a64("a", 1) == 0xaf63dc4c8601ec8cull);
  CHECK(kd::fnv1a64("foobar", 6) == 0x85944171f73967e8ull);
  // Chunked equals whole.
  CHECK(kd::fnv1a64("bar", 3, kd::fnv1a64("foo", 3)) == 0x85944171f73967e8ull);
}

TEST_CASE("run checkpoint: every part round-trips bit for bit (tiny student and tiny MoE teacher)") {
  SUBCASE("student") { round_trip(km::tiny_student()); }
  SUBCASE("teacher") { round_trip(km::tiny_teacher()); }
}

TEST_CASE("run checkpoint: a resumed run continues exactly as the uninterrupted one") {
  temp_dir dir;
  live_run<km::dense_config> whole(km::tiny_student(), 5, 6);
  live_run<km::dense_config> first(km::tiny_student(), 5, 3);
  REQUIRE(kd::save_run_checkpoint(dir.path.string(), first.state));
  live_run<km::dense_config> resumed(km::tiny_student(), 8, 1);  // another seed: only the load makes it agree
  std::string found;
  REQUIRE(kd::find_latest_checkpoint(dir.path.string(), found));
  REQUIRE(kd::load_run_checkpoint(found, resumed.state));
  resumed.advance(3);
  CHECK(resumed.step == 6);
  CHECK(resumed.fingerprint() == whole.fingerprint());
}

TEST_CASE("run checkpoint: a damaged part is refused by name and the live run is untouched") {
  live_run<km::dense_config> probe(km::tiny_student(), 1, 1);
  temp_dir dir;
  std::string written;
  REQUIRE(kd::save_run_checkpoint(dir.path.string(), probe.state, {}, &written));
  const auto parts = manifest_parts(written);
  REQUIRE(parts.size() == 10);  // model, model_config, optimizer, progress, rng, early_stopping, loss_scaler, objective, run_config, data
  for (const auto& [name, file] : parts) {
    CAPTURE(name);
    refused(name, "checksum mismatch", [file = file](const fs::path& d, auto&) {
      std::string bytes = read_all(d / file);
      bytes[bytes.size() / 2] = static_cast<char>(bytes[bytes.size() / 2] ^ 0x20);
      write_all(d / file, bytes);
    });
    refused(name, "truncated", [file = file](const fs::path& d, auto&) {
      const std::string bytes = read_all(d / file);
      write_all(d / file, bytes.substr(0, bytes.size() - 1));
    });
    refused(name, "missing", [file = file](const fs::path& d, auto&) { fs::remove(d / file); });
  }
}

TEST_CASE("run checkpoint: a mismatched or unparsable checkpoint is refused by name, the live run untouched") {
  SUBCASE("format version") {
    refused("manifest", "format version 99", [](const fs::path& d, auto&) {
      auto j = nlohmann::json::parse(read_all(d / "manifest.json"));
      j["version"] = 99;
      write_all(d / "manifest.json", j.dump());
    });
  }
  SUBCASE("manifest unparsable") {
    refused("manifest", "unparsable", [](const fs::path& d, auto&) { write_all(d / "manifest.json", "{\"format\": "); });
  }
  SUBCASE("manifest missing") {
    refused("manifest", "missing", [](const fs::path& d, auto&) { fs::remove(d / "manifest.json"); });
  }
  SUBCASE("model config differs from the run's") {
    km::dense_config other = km::tiny_student();
    other.rope_theta = 500000.0;  // same arena size: only the config check can see it
    refused("model_config", "differs from this run's", [](const fs::path&, auto&) {}, other);
  }
  SUBCASE("weights of another dtype than the run's arena") {
    refused("model_config", "another dtype", [](const fs::path& d, auto&) {
      auto j = nlohmann::json::parse(read_all(d / "config.json"));
      REQUIRE(j.at("dtype") == "float32");
      j["dtype"] = "bfloat16";
      if (j.contains("torch_dtype")) j["torch_dtype"] = "bfloat16";
      rewrite_part(d, "config.json", j.dump());
    });
  }
  SUBCASE("a model of another architecture") {
    // The teacher's config.json and weights in place of the student's (manifest fixed up).
    refused("model_config", "another architecture", [](const fs::path& d, auto&) {
      temp_dir t;
      live_run<km::moe_config> teacher(km::tiny_teacher(), 3, 0);
      REQUIRE(km::save_checkpoint(teacher.model, kd::detail::ckpt::stored_config<cpu>(teacher.config), t.path.string()));
      for (const char* f : {"config.json", "model.safetensors"}) rewrite_part(d, f, read_all(t.path / f));
    });
  }
  SUBCASE("optimizer of another arena size") {
    refused("optimizer", "arena of", [](const fs::path& d, auto&) {
      std::string bytes = read_all(d / "optimizer.bin");
      std::uint64_t n = 0;
      std::memcpy(&n, bytes.data() + 24, 8);  // header: magic, storage size, step, arena size
      n += 1;
      std::memcpy(bytes.data() + 24, &n, 8);
      rewrite_part(d, "optimizer.bin", bytes);
    });
  }
  SUBCASE("unparsable JSON part") {
    refused("progress", "unparsable", [](const fs::path& d, auto&) { rewrite_part(d, "progress.json", "{\"step\": "); });
    refused("rng", "dropout", [](const fs::path& d, auto&) {
      rewrite_part(d, "rng.json", R"({"streams": {"data": 1, "noise": 2}})");
    });
  }
  SUBCASE("objective schedule changed") {
    refused("objective", "component 'kd'", [](const fs::path&, auto& run) {
      run.objective.add("kd", kd::schedule<kd::curve::linear>{0.0, 1.0, 50, 0, 0});
    });
    refused("objective", "components", [](const fs::path&, auto& run) { run.objective.add("feature", kd::fixed(0.5)); });
  }
  SUBCASE("run config changed") {
    refused("run_config", "'lr'", [](const fs::path&, auto& run) {
      run.state.run_config = R"({"lr": 0.002, "batch": 8, "preset": "tiny"})";
    });
  }
  SUBCASE("a part the run does not have, and one it lacks") {
    refused("data", "no such part", [](const fs::path&, auto& run) { run.state.extra.clear(); });
    refused("ema", "not listed", [](const fs::path&, auto& run) {
      run.state.extra.push_back({"ema", [](std::string&) { return kd::status{}; },
                                 [](std::string_view, std::function<void()>&) { return kd::status{}; }});
    });
  }
  SUBCASE("the last part to load refuses: nothing earlier was committed") {
    refused("data", "not a loader position", [](const fs::path& d, auto&) { rewrite_part(d, "data.bin", "garbage"); });
  }
}

TEST_CASE("run checkpoint: crashes leave a loadable checkpoint") {
  temp_dir dir;
  const std::string run = dir.path.string();
  live_run<km::dense_config> a(km::tiny_student(), 11, 3);
  REQUIRE(kd::save_run_checkpoint(run, a.state));
  const std::string step3 = (dir.path / "step-3").string();
  std::string found;

  SUBCASE("a leftover step-N.tmp (crash while writing) is ignored, then replaced") {
    fs::create_directories(dir.path / "step-5.tmp");
    write_all(dir.path / "step-5.tmp" / "optimizer.bin", "partial");
    REQUIRE(kd::find_latest_checkpoint(run, found));
    CHECK(found == step3);
    live_run<km::dense_config> b(km::tiny_student(), 99, 5);
    REQUIRE(kd::load_run_checkpoint(found, b.state));
    CHECK(b.fingerprint() == a.fingerprint());
    REQUIRE(kd::save_run_checkpoint(run, a.state));  // step 3 again: replaces it
    live_run<km::dense_config> c(km::tiny_student(), 7, 5);
    REQUIRE(kd::save_run_checkpoint(run, c.state));
    CHECK_FALSE(fs::exists(dir.path / "step-5.tmp"));
    REQUIRE(kd::find_latest_checkpoint(run, found));
    CHECK(found == (dir.path / "step-5").string());
  }
  SUBCASE("a stale latest (names a directory that is gone or incomplete)") {
    write_all(dir.path / "latest", "step-7\n");
    REQUIRE(kd::find_latest_checkpoint(run, found));
    CHECK(found == step3);
    fs::create_directories(dir.path / "step-9");  // no manifest: never completed
    write_all(dir.path / "latest", "step-9\n");
    REQUIRE(kd::find_latest_checkpoint(run, found));
    CHECK(found == step3);
    write_all(dir.path / "latest", "../../etc\n");
    REQUIRE(kd::find_latest_checkpoint(run, found));
    CHECK(found == step3);
    fs::remove(dir.path / "latest");
    REQUIRE(kd::find_latest_checkpoint(run, found));
    CHECK(found == step3);
  }
  SUBCASE("no checkpoint at all") {
    temp_dir empty;
    const kd::status s = kd::find_latest_checkpoint(empty.path.string(), found);
    CHECK_FALSE(s);
    CHECK(kdtest::contains(s.message(), "no complete checkpoint"));
  }
}

TEST_CASE("run checkpoint: keep the last K") {
  temp_dir dir;
  live_run<km::dense_config> a(km::tiny_student(), 11, 0);
  for (std::int64_t t = 1; t <= 5; ++t) {
    a.step = t;
    REQUIRE(kd::save_run_checkpoint(dir.path.string(), a.state, {2}));
  }
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(dir.path)) names.push_back(e.path().filename().string());
  std::sort(names.begin(), names.end());
  CHECK(names == std::vector<std::string>{"latest", "step-4", "step-5"});
  a.step = 6;
  REQUIRE(kd::save_run_checkpoint(dir.path.string(), a.state, {0}));  // 0: keep everything
  CHECK(fs::exists(dir.path / "step-4"));
  CHECK(fs::exists(dir.path / "step-6"));
}

namespace {
volatile std::sig_atomic_t custom_hits = 0;
extern "C" void custom_handler(int) { custom_hits = custom_hits + 1; }
}  // namespace

TEST_CASE("interrupt_guard: a signal sets the flag; handlers are restored; a second signal kills") {
  struct sigaction mine {}, seen {};
  mine.sa_handler = custom_handler;
  sigemptyset(&mine.sa_mask);
  REQUIRE(::sigaction(SIGINT, &mine, nullptr) == 0);
  {
    kd::interrupt_guard guard;
    REQUIRE(guard.installed());
    CHECK_FALSE(guard.requested());
    REQUIRE(std::raise(SIGINT) == 0);
    CHECK(guard.requested());
    CHECK(guard.signal_number() == SIGINT);
    CHECK(custom_hits == 0);
  }
  REQUIRE(::sigaction(SIGINT, nullptr, &seen) == 0);
  CHECK((seen.sa_handler == custom_handler));
  REQUIRE(std::raise(SIGINT) == 0);
  CHECK(custom_hits == 1);
  struct sigaction dfl {};
  dfl.sa_handler = SIG_DFL;
  REQUIRE(::sigaction(SIGINT, &dfl, nullptr) == 0);

  {
    kd::interrupt_guard guard;
    CHECK_FALSE(guard.requested());  // a new guard starts clear
    REQUIRE(std::raise(SIGTERM) == 0);
    CHECK(guard.signal_number() == SIGTERM);
  }

  // The second signal: in a child, which must die of it.
  const pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    kd::interrupt_guard guard;
    std::raise(SIGTERM);
    if (!guard.requested()) ::_exit(2);
    std::raise(SIGTERM);
    ::_exit(3);  // survived the second one: wrong
  }
  int wstatus = 0;
  REQUIRE(::waitpid(pid, &wstatus, 0) == pid);
  CHECK(WIFSIGNALED(wstatus));
  CHECK(WTERMSIG(wstatus) == SIGTERM);
}

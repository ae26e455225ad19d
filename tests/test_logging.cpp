// Logging cadences and the metrics logger (kd/policy/logging.hpp).
#include <doctest/doctest.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include <kd/kd.hpp>

#include "test_util.hpp"

namespace {

std::vector<std::string> split_lines(const std::string& text) {
  std::vector<std::string> lines;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) lines.push_back(line);
  return lines;
}

bool starts_with(const std::string& s, std::string_view p) { return s.rfind(p, 0) == 0; }

// The seven components of a MoE distillation run, as the seed logged them.
const char* const components[] = {"lm", "kd", "feature", "attention", "load_balance", "router_z", "z_loss"};

// The seed printed 36 lines per optimizer step: 36 x 24,914 steps = 896,904 lines.
static_assert(36 * 24914 == 896904);

}  // namespace

TEST_CASE("cadence policies") {
  static_assert(kd::LogCadence<kd::log_every<1>> && kd::LogCadence<kd::log_geometric<3>>);
  CHECK_FALSE(kd::log_every<100>::due(0));
  CHECK_FALSE(kd::log_every<100>::due(99));
  CHECK(kd::log_every<100>::due(100));
  CHECK(kd::log_every<100>::due(24900));
  CHECK_FALSE(kd::log_every<100>::due(24914));
  CHECK(kd::log_every<1>::due(1));
  CHECK_FALSE(kd::log_every<1>::due(0));
  CHECK_FALSE(kd::log_every<1>::due(-1));

  std::vector<std::int64_t> due2, due3;
  for (std::int64_t s = -3; s <= 100; ++s) {
    if (kd::log_geometric<2>::due(s)) due2.push_back(s);
    if (kd::log_geometric<3>::due(s)) due3.push_back(s);
    CHECK_FALSE(kd::log_never::due(s));
  }
  CHECK(due2 == std::vector<std::int64_t>{1, 2, 4, 8, 16, 32, 64});
  CHECK(due3 == std::vector<std::int64_t>{1, 3, 9, 27, 81});
}

TEST_CASE("log_every<100> over 24,914 steps x 7 components prints 250 lines, each with lm") {
  // The seed: 36 lines per step x 24,914 steps = 896,904 lines, and no LM loss after step 0.
  std::ostringstream human, jsonl;
  kd::metrics_logger<kd::log_every<100>> log(&human, &jsonl);
  constexpr std::int64_t steps = 24914;
  for (std::int64_t step = 1; step <= steps; ++step) {
    for (int c = 0; c < 7; ++c) log.record(components[c], 1.0 + 0.01 * c + 1e-5 * static_cast<double>(step));
    const kd::status st = log.end_step(step);
    REQUIRE(st.ok());
  }
  REQUIRE(log.finish().ok());
  CHECK(log.lines() == 250);  // 249 on the cadence + the final 14-step window

  const std::string h = human.str();
  CHECK(std::count(h.begin(), h.end(), '\n') == 250);
  const auto hl = split_lines(h);
  REQUIRE(hl.size() == 250);
  for (const auto& line : hl) {
    CAPTURE(line);
    REQUIRE(kdtest::contains(line, "lm "));
    REQUIRE(starts_with(line, "step "));
    for (const char* c : components) REQUIRE(kdtest::contains(line, std::string("| ") + c + " "));
  }
  CHECK(starts_with(hl.front(), "step 100 |"));
  CHECK(starts_with(hl[248], "step 24900 |"));
  CHECK(starts_with(hl.back(), "step 24914 |"));

  const std::string j = jsonl.str();
  CHECK(std::count(j.begin(), j.end(), '\n') == 250);
  const auto jl = split_lines(j);
  REQUIRE(jl.size() == 250);
  for (const auto& line : jl) {
    CAPTURE(line);
    REQUIRE(starts_with(line, "{\"step\":"));
    REQUIRE(line.back() == '}');
    REQUIRE(kdtest::contains(line, "\"lm\":{\"mean\":"));
    REQUIRE(std::count(line.begin(), line.end(), '{') == std::count(line.begin(), line.end(), '}'));
    REQUIRE_FALSE(kdtest::contains(line, "nan"));
  }
  CHECK(starts_with(jl.back(), "{\"step\":24914,\"window\":14,"));
  CHECK(starts_with(jl.front(), "{\"step\":100,\"window\":100,"));

  // Finishing right after a due step prints nothing more.
  CHECK(log.finish().ok());
  CHECK(log.lines() == 250);
}

TEST_CASE("mean and max over the window") {
  std::ostringstream human, jsonl;
  kd::metrics_logger<kd::log_every<4>> log(&human, &jsonl);
  const double lm[] = {1.0, 2.0, 3.0, 6.0};
  const double kdv[] = {0.5, 0.25, 0.125, 0.125};
  for (std::int64_t step = 1; step <= 4; ++step) {
    log.record("lm", lm[step - 1]);
    log.record("kd", kdv[step - 1]);
    REQUIRE(log.end_step(step).ok());
  }
  CHECK(human.str() == "step 4 | lm 3 (max 6) | kd 0.25 (max 0.5)\n");
  CHECK(jsonl.str() == "{\"step\":4,\"window\":4,\"lm\":{\"mean\":3,\"max\":6},\"kd\":{\"mean\":0.25,\"max\":0.5}}\n");

  // The next window starts empty: its numbers do not mix with the previous window's.
  human.str("");
  jsonl.str("");
  for (std::int64_t step = 5; step <= 8; ++step) {
    log.record("lm", -1.0 * static_cast<double>(step));
    REQUIRE(log.end_step(step).ok());
  }
  CHECK(human.str() == "step 8 | lm -6.5 (max -5)\n");
  CHECK(jsonl.str() == "{\"step\":8,\"window\":4,\"lm\":{\"mean\":-6.5,\"max\":-5}}\n");

  // A one-step window prints no max in the human line.
  std::ostringstream one;
  kd::metrics_logger<kd::log_every<1>> log1(&one);
  log1.record("lm", 2.5);
  REQUIRE(log1.end_step(1).ok());
  CHECK(one.str() == "step 1 | lm 2.5\n");
}

TEST_CASE("log_geometric<2> logs at 1, 2, 4, 8, ...") {
  std::ostringstream human;
  kd::metrics_logger<kd::log_geometric<2>> log(&human);
  for (std::int64_t step = 1; step <= 100; ++step) {
    log.record("lm", 1.0);
    REQUIRE(log.end_step(step).ok());
  }
  REQUIRE(log.finish().ok());
  std::vector<std::int64_t> steps;
  for (const auto& line : split_lines(human.str())) {
    REQUIRE(starts_with(line, "step "));
    steps.push_back(std::stoll(line.substr(5)));
  }
  // The cadence, then the final partial window (65..100) from finish().
  CHECK(steps == std::vector<std::int64_t>{1, 2, 4, 8, 16, 32, 64, 100});
  CHECK(log.lines() == 8);
}

TEST_CASE("log_never prints nothing, even at finish") {
  std::ostringstream human, jsonl;
  kd::metrics_logger<kd::log_never> log(&human, &jsonl);
  for (std::int64_t step = 1; step <= 1000; ++step) {
    log.record("lm", 1.0);
    log.record("kd", 2.0);
    REQUIRE(log.end_step(step).ok());
  }
  CHECK(log.finish().ok());
  CHECK(human.str().empty());
  CHECK(jsonl.str().empty());
  CHECK(log.lines() == 0);
}

TEST_CASE("a window without lm fails and names 'lm'") {
  std::ostringstream human;
  kd::metrics_logger<kd::log_every<10>> log(&human);
  for (std::int64_t step = 1; step < 10; ++step) {
    log.record("kd", 1.0);
    CHECK(log.end_step(step).ok());  // not due: no check yet
  }
  log.record("kd", 1.0);
  const kd::status st = log.end_step(10);
  CHECK_FALSE(st.ok());
  CHECK(st.code() == kd::errc::invalid_argument);
  CHECK(kdtest::contains(st.message(), "'lm'"));
  CHECK(kdtest::contains(st.message(), "step 10"));
  CHECK(human.str().empty());
  CHECK(log.lines() == 0);

  // finish() applies the same rule.
  kd::metrics_logger<kd::log_every<100>> log2(&human);
  log2.record("feature", 1.0);
  REQUIRE(log2.end_step(1).ok());
  const kd::status fin = log2.finish();
  CHECK(fin.code() == kd::errc::invalid_argument);
  CHECK(kdtest::contains(fin.message(), "'lm'"));

  // Custom required metrics.
  kd::metrics_logger<kd::log_every<1>> log3(&human, nullptr, {"lm", "kd"});
  log3.record("lm", 1.0);
  const kd::status st3 = log3.end_step(1);
  CHECK(kdtest::contains(st3.message(), "'kd'"));

  // No requirement at all.
  std::ostringstream free_out;
  kd::metrics_logger<kd::log_every<1>> log4(&free_out, nullptr, {});
  log4.record("kd", 1.0);
  CHECK(log4.end_step(1).ok());
  CHECK(free_out.str() == "step 1 | kd 1\n");
}

TEST_CASE("non-finite values print as nan/inf in human lines and null in JSON") {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const double inf = std::numeric_limits<double>::infinity();
  {
    std::ostringstream human, jsonl;
    kd::metrics_logger<kd::log_every<1>> log(&human, &jsonl);
    log.record("lm", nan);
    log.record("kd", inf);
    log.record("feature", -inf);
    REQUIRE(log.end_step(1).ok());
    CHECK(human.str() == "step 1 | lm nan | kd inf | feature -inf\n");
    CHECK(jsonl.str() ==
          "{\"step\":1,\"window\":1,\"lm\":{\"mean\":null,\"max\":null},\"kd\":{\"mean\":null,\"max\":null},"
          "\"feature\":{\"mean\":null,\"max\":null}}\n");
  }
  {
    // A NaN inside a longer window makes both its mean and its max NaN (std::max alone would drop it).
    std::ostringstream human, jsonl;
    kd::metrics_logger<kd::log_every<3>> log(&human, &jsonl);
    const double lm[] = {1.0, nan, 2.0};
    for (std::int64_t step = 1; step <= 3; ++step) {
      log.record("lm", lm[step - 1]);
      REQUIRE(log.end_step(step).ok());
    }
    CHECK(human.str() == "step 3 | lm nan (max nan)\n");
    CHECK(jsonl.str() == "{\"step\":3,\"window\":3,\"lm\":{\"mean\":null,\"max\":null}}\n");
  }
}

TEST_CASE("JSON output escapes metric names") {
  std::ostringstream jsonl;
  kd::metrics_logger<kd::log_every<1>> log(nullptr, &jsonl);
  log.record("lm", 1.0);
  log.record("a\"b\\c", 2.0);
  REQUIRE(log.end_step(1).ok());
  CHECK(jsonl.str() == "{\"step\":1,\"window\":1,\"lm\":{\"mean\":1,\"max\":1},\"a\\\"b\\\\c\":{\"mean\":2,\"max\":2}}\n");
}

TEST_CASE("both streams may be null; lines are still counted") {
  kd::metrics_logger<kd::log_every<2>> log(nullptr);
  for (std::int64_t step = 1; step <= 10; ++step) {
    log.record("lm", 1.0);
    REQUIRE(log.end_step(step).ok());
  }
  CHECK(log.lines() == 5);
}

// kd/policy/logging.hpp: logging cadence policies and the metrics logger.
//
// The seed run printed 36 lines per step (896,000 lines) and dropped the LM loss after step 0. Here a
// cadence policy decides which steps emit a line, metrics are aggregated over the window between two
// lines (mean and max per component), and the logger refuses to emit a line without its required
// components (by default "lm"). A 24,914-step run logging every 100 steps prints 250 lines: 249 on
// the cadence plus one for the final partial window.
#pragma once

#include <algorithm>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <ostream>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include <kd/core/status.hpp>

namespace kd {

// Steps are counted from 1 (the first completed optimizer step is step 1).
template <std::int64_t N>
struct log_every {
  static_assert(N >= 1, "kd: log_every needs a period of at least one step.");
  static constexpr std::string_view name = "every";
  static constexpr bool due(std::int64_t step) noexcept { return step >= 1 && step % N == 0; }
};
// Steps 1, B, B^2, ...: dense early, sparse late.
template <std::int64_t B = 2>
struct log_geometric {
  static_assert(B >= 2, "kd: log_geometric needs a base of at least 2.");
  static constexpr std::string_view name = "geometric";
  static constexpr bool due(std::int64_t step) noexcept {
    if (step < 1) return false;
    while (step % B == 0) step /= B;
    return step == 1;
  }
};
struct log_never {
  static constexpr std::string_view name = "never";
  static constexpr bool due(std::int64_t) noexcept { return false; }
};

template <class C>
concept LogCadence = requires(std::int64_t s) {
  { C::due(s) } -> std::same_as<bool>;
  { C::name } -> std::convertible_to<std::string_view>;
};
static_assert(LogCadence<log_every<100>> && LogCadence<log_geometric<>> && LogCadence<log_never>);
static_assert(log_geometric<2>::due(1) && log_geometric<2>::due(8) && !log_geometric<2>::due(6));
static_assert(log_every<100>::due(200) && !log_every<100>::due(150));

// Aggregates named metrics over a window of steps and writes one line per due step, as a human line
// and/or a JSON Lines record. Either stream may be null.
template <LogCadence Cadence>
class metrics_logger {
 public:
  explicit metrics_logger(std::ostream* human, std::ostream* jsonl = nullptr,
                          std::vector<std::string> required = {"lm"})
      : human_(human), jsonl_(jsonl), required_(std::move(required)) {}

  // Adds one observation of a metric to the current window.
  void record(std::string_view name, double value) {
    auto it = std::find_if(window_.begin(), window_.end(), [&](const entry& e) { return e.name == name; });
    if (it == window_.end()) {
      window_.push_back({std::string(name)});
      it = window_.end() - 1;
    }
    it->sum += value;
    // std::max would drop a NaN (NaN < x is false); a NaN anywhere in the window makes its max NaN.
    it->max = (std::isnan(value) || std::isnan(it->max)) ? std::numeric_limits<double>::quiet_NaN()
                                                          : std::max(it->max, value);
    ++it->count;
  }

  // Closes step `step`; emits a line when the cadence says so.
  status end_step(std::int64_t step) {
    ++window_steps_;
    last_step_ = step;
    if (!Cadence::due(step)) return {};
    return flush(step);
  }

  // Emits the last partial window (call once after the final step), unless the cadence is never.
  status finish() {
    if (std::is_same_v<Cadence, log_never> || window_steps_ == 0) return {};
    return flush(last_step_);
  }

  [[nodiscard]] std::int64_t lines() const noexcept { return lines_; }

 private:
  struct entry {
    std::string name;
    double sum = 0.0;
    double max = -std::numeric_limits<double>::infinity();
    std::int64_t count = 0;
  };

  static std::string number(double v) {
    if (!std::isfinite(v)) return std::isnan(v) ? "nan" : (v > 0 ? "inf" : "-inf");
    char buf[32];
    std::snprintf(buf, sizeof buf, "%.6g", v);
    return buf;
  }
  static std::string json_number(double v) { return std::isfinite(v) ? number(v) : "null"; }
  // A metric name as a JSON string body: quotes, backslashes and control characters escaped.
  static std::string json_escape(std::string_view s) {
    std::string r;
    for (const char ch : s) {
      const auto u = static_cast<unsigned char>(ch);
      if (ch == '"' || ch == '\\') {
        r += '\\';
        r += ch;
      } else if (u < 0x20) {
        char buf[8];
        std::snprintf(buf, sizeof buf, "\\u%04x", static_cast<unsigned>(u));
        r += buf;
      } else {
        r += ch;
      }
    }
    return r;
  }

  status flush(std::int64_t step) {
    for (const auto& r : required_) {
      if (std::none_of(window_.begin(), window_.end(), [&](const entry& e) { return e.name == r; }))
        return {errc::invalid_argument, "the log line for step " + std::to_string(step) +
                                            " lacks the required metric '" + r + "'"};
    }
    if (human_ != nullptr) {
      std::string line = "step " + std::to_string(step);
      for (const auto& e : window_) {
        line += " | " + e.name + " " + number(e.sum / static_cast<double>(e.count));
        if (window_steps_ > 1) line += " (max " + number(e.max) + ")";
      }
      *human_ << line << '\n';
    }
    if (jsonl_ != nullptr) {
      std::string line = "{\"step\":" + std::to_string(step) + ",\"window\":" + std::to_string(window_steps_);
      for (const auto& e : window_)
        line += ",\"" + json_escape(e.name) + "\":{\"mean\":" + json_number(e.sum / static_cast<double>(e.count)) +
                ",\"max\":" + json_number(e.max) + "}";
      *jsonl_ << line << "}\n";
    }
    ++lines_;
    window_.clear();
    window_steps_ = 0;
    return {};
  }

  std::ostream* human_;
  std::ostream* jsonl_;
  std::vector<std::string> required_;
  std::vector<entry> window_;
  std::int64_t window_steps_ = 0;
  std::int64_t last_step_ = 0;
  std::int64_t lines_ = 0;
};

}  // namespace kd

// kd/train/report.hpp: a distillation run's report page (one self-contained HTML file, inline SVG charts)
// and a plain-text summary for the console.
//
// Reads a run folder RUN (any part may be missing: the page lists what is missing and draws the rest):
//   RUN/<run>/log.jsonl       run = teacher, distill, scratch: kd::metrics_logger records,
//                             {"step":N,"window":W,"lm":{"mean":x,"max":y},...,"lr":1e-3}; object-valued
//                             members are loss components (plotted), plain numbers (tokens, lr, ...) are not
//   RUN/<run>/eval.jsonl      one record per evaluation: step, tokens, val_loss, val_ppl, val_bpb, counted
//   RUN/teacher/experts.json  {"layers":[{"layer":0,"counts":[tokens routed to each expert]},...]}
//   RUN/summary.json          optional {key: number or string}, shown as a table on top
// and writes RUN/report.html with
//   - per run: every component's window mean against step (log y when all values are positive and
//     span more than a factor 20, so z_loss-sized terms are not flattened against lm);
//   - validation bits per byte against tokens for teacher, distilled and scratch student. Bits per byte,
//     not loss, because the teacher's and the students' tokenizers differ (loss is per token of each);
//   - per MoE layer, each expert's share of routed tokens, with the fair share 1/E and 25% of it dashed;
//   - a table of final and best val_bpb / val_loss / ppl and steps per run, the gap closed by
//     distillation (scratch - distill) / (scratch - teacher) on final val_bpb, and the smallest expert
//     share as a fraction of the fair share.
// Errors (kd::status, never an exception): a line that is not JSON, or a record of the wrong shape, is an
// io_error naming the file and the line number. The one exception is the file's last line when the parser
// ran off its end: a write cut short by an interrupted run; it is skipped and the page says so. A run
// resumed from a checkpoint logs steps again: a record whose step is not after the previous record's
// replaces the records from that step on. The output is deterministic (no timestamps), so two reports of
// the same folder compare equal.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <fstream>
#include <limits>
#include <sstream>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include <kd/core/status.hpp>

namespace kd::train {

// The three runs a distillation experiment has, in the order they are reported.
inline constexpr std::array<std::string_view, 3> report_runs = {"teacher", "distill", "scratch"};

// One run's results. Values are NaN when the run has no evaluation with that value.
struct run_result {
  std::string name;            // "teacher", "distill" or "scratch"
  bool found = false;          // RUN/<name>/ has a log.jsonl or an eval.jsonl
  std::int64_t steps = 0;      // last logged step (the last evaluation's step when there is no log)
  std::int64_t log_records = 0;
  std::int64_t evals = 0;
  double final_tokens = std::numeric_limits<double>::quiet_NaN();
  double final_bpb = std::numeric_limits<double>::quiet_NaN(), best_bpb = std::numeric_limits<double>::quiet_NaN();
  double final_loss = std::numeric_limits<double>::quiet_NaN(), best_loss = std::numeric_limits<double>::quiet_NaN();
  double final_ppl = std::numeric_limits<double>::quiet_NaN(), best_ppl = std::numeric_limits<double>::quiet_NaN();
};

struct report_summary {
  std::vector<run_result> runs;       // one per report_runs entry, same order
  std::vector<std::string> missing;   // runs not found
  double gap_closed = std::numeric_limits<double>::quiet_NaN();  // NaN unless all three final bpb exist
  double min_expert_share_of_fair = std::numeric_limits<double>::quiet_NaN();  // NaN without experts.json
  std::int64_t min_expert_layer = -1, min_expert = -1;  // where that minimum is
  int charts = 0;                     // <svg> charts on the page
  std::vector<std::string> notes;     // skipped lines, missing files, caveats (also on the page)
  std::string table;                  // the plain-text summary for the console
  std::string html_path;              // RUN/report.html once written

  [[nodiscard]] const run_result* run(std::string_view name) const {
    for (const auto& r : runs)
      if (r.name == name) return &r;
    return nullptr;
  }
};

namespace detail::report {

namespace fs = std::filesystem;
using ojson = nlohmann::ordered_json;  // ordered: components keep the order the logger wrote them in
inline constexpr double nan = std::numeric_limits<double>::quiet_NaN();

// ------------------------------------------------------------------------------------------------
// Text helpers
// ------------------------------------------------------------------------------------------------

inline std::string format(const char* fmt, double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, fmt, v);
  return buf;
}
inline std::string num(double v, const char* fmt = "%.4f") { return std::isfinite(v) ? format(fmt, v) : "n/a"; }

inline std::string html_escape(std::string_view s) {
  std::string r;
  r.reserve(s.size());
  for (const char c : s) {
    switch (c) {
      case '&': r += "&amp;"; break;
      case '<': r += "&lt;"; break;
      case '>': r += "&gt;"; break;
      case '"': r += "&quot;"; break;
      case '\'': r += "&#39;"; break;
      default: r += c;
    }
  }
  return r;
}

// SVG coordinates: one decimal is below a pixel and keeps the file small.
inline std::string px(double v) { return format("%.1f", v); }

// 25600 -> "25.6k": token counts stay readable on an axis.
inline std::string si(double v) {
  const double a = std::fabs(v);
  const char* suffix = "";
  double d = 1.0;
  if (a >= 1e12) suffix = "T", d = 1e12;
  else if (a >= 1e9) suffix = "G", d = 1e9;
  else if (a >= 1e6) suffix = "M", d = 1e6;
  else if (a >= 1e3) suffix = "k", d = 1e3;
  return format("%.4g", v / d) + suffix;
}

// ------------------------------------------------------------------------------------------------
// Reading
// ------------------------------------------------------------------------------------------------

// Reads a whole file; `exists` false (and ok) when there is no such file.
inline status read_text(const fs::path& path, const std::string& shown, std::string& out, bool& exists) {
  std::error_code ec;
  exists = fs::is_regular_file(path, ec);
  if (!exists) return {};
  std::ifstream f(path, std::ios::binary);
  if (!f) return {errc::io_error, shown + ": cannot open the file"};
  std::ostringstream s;
  s << f.rdbuf();
  if (f.bad()) return {errc::io_error, shown + ": read error"};
  out = std::move(s).str();
  return {};
}

// A line without its end: trailing whitespace and NULs (a crash may leave a zero-filled tail).
inline std::string_view trim(std::string_view s) {
  const auto not_space = [](char c) { return c != ' ' && c != '\t' && c != '\r' && c != '\n' && c != '\0'; };
  while (!s.empty() && !not_space(s.back())) s.remove_suffix(1);
  while (!s.empty() && !not_space(s.front())) s.remove_prefix(1);
  return s;
}

// nlohmann's message minus its "parse error at line 1, column N:" prefix (each JSONL line is parsed alone,
// so its line is always 1 and would contradict ours).
inline std::string parse_reason(const nlohmann::json::parse_error& e) {
  const std::string w = e.what();
  const auto col = w.find("column ");
  const auto colon = col == std::string::npos ? std::string::npos : w.find(": ", col);
  return colon == std::string::npos ? w : w.substr(colon + 2);
}

struct jsonl_record {
  std::size_t line = 0;  // 1-based
  ojson value;
};

// Parses a JSON Lines file into objects. Blank lines are skipped. A line that does not parse is an error
// naming it, except the last non-blank line when the parser ran past its end: that is a record cut short
// by an interrupted write, skipped with a note.
inline status parse_jsonl(std::string_view text, const std::string& shown, std::vector<jsonl_record>& out,
                          std::vector<std::string>& notes) {
  out.clear();
  std::vector<std::pair<std::size_t, std::string_view>> lines;
  std::size_t line_no = 0;
  for (std::size_t pos = 0; pos < text.size();) {
    const auto nl = text.find('\n', pos);
    const auto end = nl == std::string_view::npos ? text.size() : nl;
    ++line_no;
    const auto l = trim(text.substr(pos, end - pos));
    if (!l.empty()) lines.emplace_back(line_no, l);
    pos = end + 1;
  }
  for (std::size_t i = 0; i < lines.size(); ++i) {
    const auto [n, l] = lines[i];
    try {
      ojson j = ojson::parse(l);
      if (!j.is_object())
        return {errc::io_error, shown + ": line " + std::to_string(n) + ": not a JSON object"};
      out.push_back({n, std::move(j)});
    } catch (const nlohmann::json::parse_error& e) {
      if (i + 1 == lines.size() && e.byte > l.size()) {
        notes.push_back(shown + ": line " + std::to_string(n) +
                        " is cut short (an interrupted write?) and was skipped");
        break;
      }
      return {errc::io_error, shown + ": line " + std::to_string(n) + " is not valid JSON: " + parse_reason(e)};
    } catch (const nlohmann::json::exception& e) {
      return {errc::io_error, shown + ": line " + std::to_string(n) + ": " + e.what()};
    }
  }
  return {};
}

// A member that must be a number or null when present; NaN when absent or null.
inline status number_field(const ojson& j, const char* key, double& v, const std::string& where) {
  v = nan;
  const auto it = j.find(key);
  if (it == j.end() || it->is_null()) return {};
  if (!it->is_number()) return {errc::io_error, where + ": '" + key + "' is not a number"};
  v = it->get<double>();
  return {};
}

inline status step_field(const ojson& j, double& step, const std::string& where) {
  KD_TRY(number_field(j, "step", step, where));
  if (!std::isfinite(step)) return {errc::io_error, where + ": no numeric 'step'"};
  if (!(std::fabs(step) < 1e15)) return {errc::io_error, where + ": 'step' is out of range"};  // fits int64
  return {};
}

// Where the records from `step` on start: a resumed run re-logs steps after its checkpoint, and the new
// records replace the old ones.
inline std::size_t resume_cut(const std::vector<double>& steps, double step) {
  return static_cast<std::size_t>(std::lower_bound(steps.begin(), steps.end(), step) - steps.begin());
}

struct log_data {
  std::vector<double> steps;
  std::vector<std::string> components;      // in order of first appearance
  std::vector<std::vector<double>> means;   // [component][record], NaN where absent or null
};

inline status read_log(const std::vector<jsonl_record>& recs, const std::string& shown, log_data& d,
                       std::vector<std::string>& notes) {
  std::int64_t replaced = 0;
  for (const auto& r : recs) {
    const std::string where = shown + ": line " + std::to_string(r.line);
    double step = nan;
    KD_TRY(step_field(r.value, step, where));
    if (!d.steps.empty() && step <= d.steps.back()) {
      const auto cut = resume_cut(d.steps, step);
      replaced += static_cast<std::int64_t>(d.steps.size() - cut);
      d.steps.resize(cut);
      for (auto& m : d.means) m.resize(cut);
    }
    d.steps.push_back(step);
    for (auto& m : d.means) m.push_back(nan);
    for (const auto& [key, val] : r.value.items()) {
      if (!val.is_object()) continue;  // step, window, tokens, lr, temperature: not components
      double mean = nan;
      KD_TRY(number_field(val, "mean", mean, where + ": '" + key + "'"));
      auto it = std::find(d.components.begin(), d.components.end(), key);
      if (it == d.components.end()) {
        d.components.push_back(key);
        d.means.emplace_back(d.steps.size(), nan);
        it = d.components.end() - 1;
      }
      d.means[static_cast<std::size_t>(it - d.components.begin())].back() = mean;
    }
  }
  if (replaced > 0)
    notes.push_back(shown + ": " + std::to_string(replaced) +
                    " record(s) were logged again after a resume; the later ones are used");
  return {};
}

struct eval_point {
  double step = nan, tokens = nan, loss = nan, ppl = nan, bpb = nan;
  bool counted = true;
};

inline status read_eval(const std::vector<jsonl_record>& recs, const std::string& shown,
                        std::vector<eval_point>& out, std::vector<std::string>& notes) {
  std::vector<double> steps;
  std::int64_t replaced = 0;
  for (const auto& r : recs) {
    const std::string where = shown + ": line " + std::to_string(r.line);
    eval_point p;
    KD_TRY(step_field(r.value, p.step, where));
    KD_TRY(number_field(r.value, "tokens", p.tokens, where));
    KD_TRY(number_field(r.value, "val_loss", p.loss, where));
    KD_TRY(number_field(r.value, "val_ppl", p.ppl, where));
    KD_TRY(number_field(r.value, "val_bpb", p.bpb, where));
    if (std::isnan(p.ppl) && !std::isnan(p.loss)) p.ppl = std::exp(p.loss);
    if (const auto it = r.value.find("counted"); it != r.value.end() && !it->is_null()) {
      if (!it->is_boolean()) return {errc::io_error, where + ": 'counted' is not a boolean"};
      p.counted = it->get<bool>();
    }
    if (!steps.empty() && p.step <= steps.back()) {
      const auto cut = resume_cut(steps, p.step);
      replaced += static_cast<std::int64_t>(steps.size() - cut);
      steps.resize(cut);
      out.resize(cut);
    }
    steps.push_back(p.step);
    out.push_back(p);
  }
  if (replaced > 0)
    notes.push_back(shown + ": " + std::to_string(replaced) +
                    " evaluation(s) were repeated after a resume; the later ones are used");
  return {};
}

struct expert_layer {
  std::int64_t layer = 0;
  std::vector<double> counts;
};

inline status read_experts(const std::string& text, const std::string& shown, std::vector<expert_layer>& out) {
  try {
    const ojson j = ojson::parse(text);
    const auto layers = j.is_object() ? j.find("layers") : j.end();
    if (!j.is_object() || layers == j.end() || !layers->is_array())
      return {errc::io_error, shown + ": expected an object with a 'layers' array"};
    for (std::size_t i = 0; i < layers->size(); ++i) {
      const auto& l = (*layers)[i];
      const std::string where = shown + ": layers[" + std::to_string(i) + "]";
      if (!l.is_object()) return {errc::io_error, where + " is not an object"};
      expert_layer e;
      e.layer = static_cast<std::int64_t>(i);
      if (const auto it = l.find("layer"); it != l.end()) {
        if (!it->is_number_integer()) return {errc::io_error, where + ": 'layer' is not an integer"};
        e.layer = it->get<std::int64_t>();
      }
      const auto counts = l.find("counts");
      if (counts == l.end() || !counts->is_array() || counts->empty())
        return {errc::io_error, where + ": 'counts' is not a non-empty array"};
      for (const auto& c : *counts) {
        if (!c.is_number() || !(c.get<double>() >= 0.0))
          return {errc::io_error, where + ": 'counts' holds a value that is not a non-negative number"};
        e.counts.push_back(c.get<double>());
      }
      out.push_back(std::move(e));
    }
  } catch (const nlohmann::json::parse_error& e) {
    return {errc::io_error, shown + ": not valid JSON: " + parse_reason(e)};
  } catch (const nlohmann::json::exception& e) {
    return {errc::io_error, shown + ": " + e.what()};
  }
  return {};
}

// ------------------------------------------------------------------------------------------------
// SVG charts
// ------------------------------------------------------------------------------------------------

// Colors: a component keeps its color across the three runs' charts.
inline std::string component_color(std::string_view name, std::size_t index) {
  static constexpr std::array<std::pair<std::string_view, std::string_view>, 8> known = {{
      {"lm", "#2563eb"}, {"kd", "#dc2626"}, {"feature", "#16a34a"}, {"z_loss", "#9333ea"},
      {"route", "#ea580c"}, {"load_balance", "#0891b2"}, {"router_z", "#ca8a04"}, {"total", "#111827"}}};
  static constexpr std::array<std::string_view, 6> others = {"#db2777", "#4f46e5", "#65a30d",
                                                             "#0d9488", "#a16207", "#7c3aed"};
  for (const auto& [n, c] : known)
    if (n == name) return std::string(c);
  return std::string(others[index % others.size()]);
}
inline std::string run_color(std::string_view run) {
  return run == "teacher" ? "#111827" : run == "distill" ? "#dc2626" : "#2563eb";
}
inline std::string run_label(std::string_view run) {
  return run == "teacher" ? "teacher" : run == "distill" ? "distilled student" : "scratch student";
}

struct axis {
  double lo = 0.0, hi = 1.0;
  bool log = false;
  std::vector<double> ticks;
  double step = 1.0;  // linear tick spacing (decides the decimals of the labels)
};

// 1, 2 or 5 times a power of ten, giving about `target` intervals over `range`.
inline double nice_step(double range, double target = 5.0) {
  const double raw = range / target;
  const double mag = std::pow(10.0, std::floor(std::log10(raw)));
  const double f = raw / mag;
  return (f < 1.5 ? 1.0 : f < 3.0 ? 2.0 : f < 7.0 ? 5.0 : 10.0) * mag;
}

// `margin` (a fraction of the range) keeps extreme points off the frame.
inline axis linear_axis(double mn, double mx, double target = 5.0, double margin = 0.0) {
  if (!(mx > mn)) {  // one value: a range around it
    const double pad = mn != 0.0 ? std::fabs(mn) * 0.1 : 1.0;
    mn -= pad;
    mx += pad;
  }
  const double m = (mx - mn) * margin;
  mn -= m;
  mx += m;
  axis a;
  a.step = nice_step(mx - mn, target);
  a.lo = std::floor(mn / a.step + 1e-9) * a.step;
  a.hi = std::ceil(mx / a.step - 1e-9) * a.step;
  const auto n = static_cast<int>(std::lround((a.hi - a.lo) / a.step));
  for (int i = 0; i <= n && i <= 50; ++i) {
    double t = a.lo + i * a.step;
    if (std::fabs(t) < a.step * 1e-9) t = 0.0;  // no "-0.00"
    a.ticks.push_back(t);
  }
  return a;
}

// Bounds 4% of the span beyond the data; 1-2-5 ticks over up to three decades, decades (thinned) beyond.
// Used only when the data spans more than a factor 20, so there are always ticks inside.
inline axis log_axis(double mn, double mx) {
  axis a;
  a.log = true;
  const double t0 = std::log10(mn), t1 = std::log10(mx);
  const double margin = 0.04 * std::max(t1 - t0, 1.0);
  a.lo = std::pow(10.0, t0 - margin);
  a.hi = std::pow(10.0, t1 + margin);
  const int d0 = static_cast<int>(std::floor(t0 - margin));
  const int d1 = static_cast<int>(std::ceil(t1 + margin));
  const int span = d1 - d0;
  const int every = std::max(1, (span + 7) / 8);
  for (int d = d0; d <= d1; ++d) {
    if ((d - d0) % every != 0) continue;
    for (const double m : {1.0, 2.0, 5.0}) {
      if (m != 1.0 && span > 4) continue;
      const double v = m * std::pow(10.0, d);
      if (v >= a.lo && v <= a.hi) a.ticks.push_back(v);
    }
  }
  return a;
}

// `use_si`: 25.6k, 1.2M, applied to every label of an axis that reaches 10,000 (not 5000 beside 10k).
inline std::string tick_label(const axis& a, double v, bool use_si) {
  if (a.log || !(a.step > 0.0 && std::isfinite(a.step))) return format("%g", v);  // (a range overflowed)
  if (use_si && std::max(std::fabs(a.lo), std::fabs(a.hi)) >= 1e4) return si(v);
  if (std::fabs(v) >= 1e6) return format("%.3g", v);
  const int decimals = std::clamp(static_cast<int>(-std::floor(std::log10(a.step) + 1e-9)), 0, 8);
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.*f", decimals, v);
  return buf;
}

struct plot_series {
  std::string name, color;
  std::vector<double> x, y;
  double width = 1.6;
  bool markers = false;
  std::vector<char> hollow;  // per point (optional): drawn as an open marker
};
struct plot_reference {  // a horizontal dashed line across the plot
  std::string name, color;
  double y = nan;
};
struct line_chart {
  std::string title, x_label, y_label;
  std::vector<plot_series> series;
  std::vector<plot_reference> references;
  bool allow_log_y = false;
  bool x_si = true;  // label large x values as 25.6k, 1.2M
};

inline std::string svg_open(double w, double h, std::string_view title) {
  return "<svg class=\"chart\" viewBox=\"0 0 " + px(w) + " " + px(h) + "\" width=\"" + px(w) + "\" height=\"" +
         px(h) + "\" role=\"img\"><title>" + html_escape(title) + "</title>\n" +
         "<rect x=\"0\" y=\"0\" width=\"" + px(w) + "\" height=\"" + px(h) + "\" fill=\"#ffffff\"/>\n";
}
inline std::string svg_text(double x, double y, std::string_view s, std::string_view attrs = {}) {
  std::string r = "<text x=\"" + px(x) + "\" y=\"" + px(y) + "\"";
  if (!attrs.empty()) r += " " + std::string(attrs);
  return r + ">" + html_escape(s) + "</text>\n";
}
inline std::string svg_line(double x1, double y1, double x2, double y2, std::string_view stroke, double width,
                            std::string_view dash = {}) {
  std::string r = "<line x1=\"" + px(x1) + "\" y1=\"" + px(y1) + "\" x2=\"" + px(x2) + "\" y2=\"" + px(y2) +
                  "\" stroke=\"" + std::string(stroke) + "\" stroke-width=\"" + format("%.2g", width) + "\"";
  if (!dash.empty()) r += " stroke-dasharray=\"" + std::string(dash) + "\"";
  return r + "/>\n";
}

// Keeps, per pixel column, the first, lowest, highest and last point: a 100,000-step log stays a few
// thousand points and its spikes survive.
inline void decimate(const std::vector<std::pair<double, double>>& in, std::vector<std::pair<double, double>>& out) {
  out.clear();
  for (std::size_t i = 0; i < in.size();) {
    const double col = std::floor(in[i].first);
    std::size_t j = i, lo = i, hi = i;
    while (j < in.size() && std::floor(in[j].first) == col) {
      if (in[j].second > in[lo].second) lo = j;  // SVG y grows downwards: larger y is the lower value
      if (in[j].second < in[hi].second) hi = j;
      ++j;
    }
    std::array<std::size_t, 4> keep = {i, std::min(lo, hi), std::max(lo, hi), j - 1};
    for (std::size_t k = 0; k < keep.size(); ++k)
      if (k == 0 || keep[k] != keep[k - 1]) out.push_back(in[keep[k]]);
    i = j;
  }
}

inline std::string render_line_chart(const line_chart& c) {
  constexpr double w = 780, h = 340, left = 70, right = 190, top = 34, bottom = 50;
  const double pw = w - left - right, ph = h - top - bottom;
  std::string s = svg_open(w, h, c.title);
  s += svg_text(left, 20, c.title, "class=\"title\"");

  // Data range over finite points (and, for a log axis, positive ones).
  double xmin = INFINITY, xmax = -INFINITY, ymin = INFINITY, ymax = -INFINITY;
  bool all_positive = true;
  for (const auto& sr : c.series)
    for (std::size_t i = 0; i < sr.x.size(); ++i) {
      if (!std::isfinite(sr.x[i]) || !std::isfinite(sr.y[i])) continue;
      xmin = std::min(xmin, sr.x[i]);
      xmax = std::max(xmax, sr.x[i]);
      ymin = std::min(ymin, sr.y[i]);
      ymax = std::max(ymax, sr.y[i]);
      all_positive = all_positive && sr.y[i] > 0.0;
    }
  for (const auto& r : c.references)
    if (std::isfinite(r.y)) {
      ymin = std::min(ymin, r.y);
      ymax = std::max(ymax, r.y);
      all_positive = all_positive && r.y > 0.0;
    }
  if (!(ymax >= ymin)) {
    s += svg_text(left + pw / 2, top + ph / 2, "no finite values to plot", "text-anchor=\"middle\" class=\"muted\"");
    return s + "</svg>\n";
  }
  if (!(xmax >= xmin)) xmin = xmax = 0.0;  // only reference lines
  const bool log_y = c.allow_log_y && all_positive && ymax / ymin > 20.0;
  const axis ax = linear_axis(xmin, xmax, 6.0);
  const axis ay = log_y ? log_axis(ymin, ymax) : linear_axis(ymin, ymax, 5.0, 0.02);
  const auto tx = [&](double x) { return left + (x - ax.lo) / (ax.hi - ax.lo) * pw; };
  const auto ty = [&](double y) {
    const double t = log_y ? (std::log10(y) - std::log10(ay.lo)) / (std::log10(ay.hi) - std::log10(ay.lo))
                           : (y - ay.lo) / (ay.hi - ay.lo);
    return top + ph - t * ph;
  };

  // Grid, axes, ticks.
  for (const double t : ay.ticks) {
    s += svg_line(left, ty(t), left + pw, ty(t), "#e5e7eb", 1);
    s += svg_text(left - 6, ty(t) + 4, tick_label(ay, t, false), "text-anchor=\"end\" class=\"tick\"");
  }
  for (const double t : ax.ticks) {
    s += svg_line(tx(t), top, tx(t), top + ph, "#f1f5f9", 1);
    s += svg_text(tx(t), top + ph + 16, tick_label(ax, t, c.x_si), "text-anchor=\"middle\" class=\"tick\"");
  }
  s += svg_line(left, top + ph, left + pw, top + ph, "#374151", 1);
  s += svg_line(left, top, left, top + ph, "#374151", 1);
  s += svg_text(left + pw / 2, h - 10, c.x_label, "text-anchor=\"middle\" class=\"label\"");
  const std::string ylab = c.y_label + (log_y ? " (log scale)" : "");
  s += "<text transform=\"translate(16," + px(top + ph / 2) + ") rotate(-90)\" text-anchor=\"middle\" class=\"label\">" +
       html_escape(ylab) + "</text>\n";

  // Reference lines, then series: one polyline per run of finite points (a NaN leaves a gap).
  for (const auto& r : c.references)
    if (std::isfinite(r.y)) s += svg_line(left, ty(r.y), left + pw, ty(r.y), r.color, 1.6, "6 4");
  std::vector<std::pair<double, double>> seg, thin;
  const auto flush = [&](const plot_series& sr) {
    if (seg.size() == 1 && !sr.markers) {
      s += "<circle cx=\"" + px(seg[0].first) + "\" cy=\"" + px(seg[0].second) + "\" r=\"2\" fill=\"" + sr.color + "\"/>\n";
    } else if (seg.size() > 1) {
      decimate(seg, thin);
      s += "<polyline fill=\"none\" stroke=\"" + sr.color + "\" stroke-width=\"" + format("%.2g", sr.width) +
           "\" stroke-linejoin=\"round\" points=\"";
      for (std::size_t i = 0; i < thin.size(); ++i) {
        if (i > 0) s += ' ';
        s += px(thin[i].first);
        s += ',';
        s += px(thin[i].second);
      }
      s += "\"/>\n";
    }
    seg.clear();
  };
  for (const auto& sr : c.series) {
    for (std::size_t i = 0; i < sr.x.size(); ++i) {
      const bool ok = std::isfinite(sr.x[i]) && std::isfinite(sr.y[i]) && (!log_y || sr.y[i] > 0.0);
      if (ok) seg.emplace_back(tx(sr.x[i]), ty(sr.y[i]));
      else flush(sr);
    }
    flush(sr);
    if (sr.markers && sr.x.size() <= 400)
      for (std::size_t i = 0; i < sr.x.size(); ++i) {
        if (!std::isfinite(sr.x[i]) || !std::isfinite(sr.y[i])) continue;
        const bool open = i < sr.hollow.size() && sr.hollow[i];
        s += "<circle cx=\"" + px(tx(sr.x[i])) + "\" cy=\"" + px(ty(sr.y[i])) + "\" r=\"3\" fill=\"" +
             (open ? std::string("#ffffff") : sr.color) + "\" stroke=\"" + sr.color + "\" stroke-width=\"1.2\"/>\n";
      }
  }

  // Legend, right of the plot.
  double ly = top + 8;
  const double lx = left + pw + 16;
  for (const auto& sr : c.series) {
    const bool any = std::any_of(sr.y.begin(), sr.y.end(), [](double v) { return std::isfinite(v); });
    s += svg_line(lx, ly, lx + 22, ly, sr.color, std::max(2.0, sr.width));
    s += svg_text(lx + 28, ly + 4, sr.name + (any ? "" : " (no values)"), "class=\"legend\"");
    ly += 18;
  }
  for (const auto& r : c.references) {
    s += svg_line(lx, ly, lx + 22, ly, r.color, 1.6, "6 4");
    s += svg_text(lx + 28, ly + 4, r.name, "class=\"legend\"");
    ly += 18;
  }
  const bool any_hollow = std::any_of(c.series.begin(), c.series.end(), [](const plot_series& sr) {
    return std::any_of(sr.hollow.begin(), sr.hollow.end(), [](char h) { return h != 0; });
  });
  if (any_hollow) {
    s += "<circle cx=\"" + px(lx + 11) + "\" cy=\"" + px(ly) + "\" r=\"3\" fill=\"#ffffff\" stroke=\"#6b7280\" stroke-width=\"1.2\"/>\n";
    s += svg_text(lx + 28, ly + 4, "not counted", "class=\"legend\"");
  }
  return s + "</svg>\n";
}

// One MoE layer: each expert's share of routed tokens as bars, fair share 1/E and 25% of it dashed.
// Experts below 25% of fair are drawn red.
inline std::string render_share_histogram(const expert_layer& l, double total) {
  constexpr double w = 460, h = 250, left = 56, right = 14, top = 50, bottom = 40;
  const double pw = w - left - right, ph = h - top - bottom;
  const auto e = static_cast<double>(l.counts.size());
  const double fair = 100.0 / e;
  double max_share = 0.0, min_ratio = INFINITY;
  for (const double c : l.counts) {
    max_share = std::max(max_share, 100.0 * c / total);
    min_ratio = std::min(min_ratio, c / total * e);
  }
  const std::string title = "layer " + std::to_string(l.layer) + ": " + std::to_string(l.counts.size()) +
                            " experts, smallest share " + format("%.2f", min_ratio) + " of fair";
  std::string s = svg_open(w, h, title);
  s += svg_text(left, 18, title, "class=\"title\"");
  // Legend on one row under the title.
  s += "<rect x=\"" + px(left) + "\" y=\"28\" width=\"12\" height=\"9\" fill=\"#2563eb\"/>\n";
  s += svg_text(left + 16, 37, "share", "class=\"legend\"");
  s += svg_line(left + 62, 33, left + 84, 33, "#111827", 1.4, "6 4");
  s += svg_text(left + 88, 37, "fair 1/E", "class=\"legend\"");
  s += svg_line(left + 150, 33, left + 172, 33, "#dc2626", 1.4, "3 3");
  s += svg_text(left + 176, 37, "25% of fair", "class=\"legend\"");

  const axis ay = linear_axis(0.0, std::max(max_share, fair) * 1.05, 4.0);
  const auto ty = [&](double y) { return top + ph - (y - ay.lo) / (ay.hi - ay.lo) * ph; };
  for (const double t : ay.ticks) {
    s += svg_line(left, ty(t), left + pw, ty(t), "#e5e7eb", 1);
    s += svg_text(left - 6, ty(t) + 4, tick_label(ay, t, false), "text-anchor=\"end\" class=\"tick\"");
  }
  const double band = pw / e;
  const auto label_every = static_cast<std::size_t>(std::max(1.0, std::ceil(e / 16.0)));
  for (std::size_t i = 0; i < l.counts.size(); ++i) {
    const double share = 100.0 * l.counts[i] / total;
    const double x = left + band * static_cast<double>(i);
    const bool starved = share < 0.25 * fair;
    s += "<rect x=\"" + px(x + band * 0.1) + "\" y=\"" + px(ty(share)) + "\" width=\"" + px(band * 0.8) +
         "\" height=\"" + px(top + ph - ty(share)) + "\" fill=\"" + (starved ? "#dc2626" : "#2563eb") + "\"><title>expert " +
         std::to_string(i) + ": " + format("%.2f", share) + "% (" + format("%.0f", l.counts[i]) + " tokens)</title></rect>\n";
    if (i % label_every == 0)
      s += svg_text(x + band / 2, top + ph + 14, std::to_string(i), "text-anchor=\"middle\" class=\"tick\"");
  }
  s += svg_line(left, ty(fair), left + pw, ty(fair), "#111827", 1.4, "6 4");
  s += svg_line(left, ty(0.25 * fair), left + pw, ty(0.25 * fair), "#dc2626", 1.4, "3 3");
  s += svg_line(left, top + ph, left + pw, top + ph, "#374151", 1);
  s += svg_line(left, top, left, top + ph, "#374151", 1);
  s += svg_text(left + pw / 2, h - 8, "expert", "text-anchor=\"middle\" class=\"label\"");
  s += "<text transform=\"translate(14," + px(top + ph / 2) +
       ") rotate(-90)\" text-anchor=\"middle\" class=\"label\">share of tokens (%)</text>\n";
  return s + "</svg>\n";
}

// ------------------------------------------------------------------------------------------------
// Page and table
// ------------------------------------------------------------------------------------------------

inline constexpr std::string_view css = R"(
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; color: #111827; margin: 24px auto;
       max-width: 1000px; padding: 0 16px; line-height: 1.4; }
h1 { font-size: 1.5em; margin-bottom: 0; } h2 { font-size: 1.15em; margin-top: 1.8em; border-bottom: 1px solid #e5e7eb; }
.path { color: #6b7280; margin-top: 4px; font-family: ui-monospace, monospace; }
table { border-collapse: collapse; margin: 8px 0; font-size: 0.92em; }
th, td { border: 1px solid #e5e7eb; padding: 3px 9px; text-align: right; }
th { background: #f9fafb; } td:first-child, th:first-child { text-align: left; }
.missing { color: #b91c1c; } .notes li { color: #92400e; }
.grid { display: flex; flex-wrap: wrap; gap: 8px; }
svg.chart { border: 1px solid #e5e7eb; max-width: 100%; height: auto; }
svg text { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; fill: #111827; }
svg .title { font-size: 14px; font-weight: 600; } svg .tick { font-size: 11px; fill: #4b5563; }
svg .label { font-size: 12px; } svg .legend { font-size: 12px; } svg .muted { fill: #9ca3af; font-size: 13px; }
)";

inline std::string pad(std::string s, std::size_t width, bool right_align = true) {
  if (s.size() >= width) return s;
  return right_align ? std::string(width - s.size(), ' ') + s : s + std::string(width - s.size(), ' ');
}

inline std::string text_table(const report_summary& r) {
  std::string t = pad("run", 9, false) + pad("steps", 9) + pad("evals", 7) + pad("final bpb", 11) +
                  pad("best bpb", 10) + pad("final loss", 12) + pad("best loss", 11) + pad("final ppl", 11) +
                  pad("best ppl", 10) + "\n";
  for (const auto& x : r.runs) {
    t += pad(x.name, 9, false);
    if (!x.found) {
      t += pad("missing", 9) + "\n";
      continue;
    }
    t += pad(std::to_string(x.steps), 9) + pad(std::to_string(x.evals), 7) + pad(num(x.final_bpb), 11) +
         pad(num(x.best_bpb), 10) + pad(num(x.final_loss), 12) + pad(num(x.best_loss), 11) +
         pad(num(x.final_ppl, "%.2f"), 11) + pad(num(x.best_ppl, "%.2f"), 10) + "\n";
  }
  t += "gap closed by distillation: ";
  if (std::isfinite(r.gap_closed)) {
    t += format("%.3f", r.gap_closed) + " (final val_bpb: scratch " + num(r.runs[2].final_bpb) + ", distilled " +
         num(r.runs[1].final_bpb) + ", teacher " + num(r.runs[0].final_bpb) + ")\n";
  } else {
    t += "n/a (needs the final val_bpb of teacher, distill and scratch)\n";
  }
  t += "smallest expert share: ";
  if (std::isfinite(r.min_expert_share_of_fair))
    t += format("%.3f", r.min_expert_share_of_fair) + " of fair (layer " + std::to_string(r.min_expert_layer) +
         ", expert " + std::to_string(r.min_expert) + ")\n";
  else
    t += "n/a (no teacher/experts.json)\n";
  for (const auto& n : r.notes) t += "note: " + n + "\n";
  return t;
}

inline std::string html_table(const report_summary& r) {
  std::string t = "<table><tr><th>run</th><th>steps</th><th>evals</th><th>final tokens</th><th>final val_bpb</th>"
                  "<th>best val_bpb</th><th>final val_loss</th><th>best val_loss</th><th>final ppl</th><th>best ppl</th></tr>\n";
  for (const auto& x : r.runs) {
    t += "<tr><td>" + html_escape(run_label(x.name)) + "</td>";
    if (!x.found) {
      t += "<td class=\"missing\" colspan=\"9\">missing</td></tr>\n";
      continue;
    }
    t += "<td>" + std::to_string(x.steps) + "</td><td>" + std::to_string(x.evals) + "</td><td>" +
         (std::isfinite(x.final_tokens) ? si(x.final_tokens) : "n/a") + "</td><td>" + num(x.final_bpb) + "</td><td>" +
         num(x.best_bpb) + "</td><td>" + num(x.final_loss) + "</td><td>" + num(x.best_loss) + "</td><td>" +
         num(x.final_ppl, "%.2f") + "</td><td>" + num(x.best_ppl, "%.2f") + "</td></tr>\n";
  }
  return t + "</table>\n";
}

inline std::string summary_value(const ojson& v) {
  if (v.is_string()) return v.get<std::string>();
  if (v.is_number_integer() || v.is_number_unsigned()) return v.dump();
  if (v.is_number_float()) return format("%.6g", v.get<double>());
  return v.dump();
}

}  // namespace detail::report

// Reads RUN and renders the page into `html` without writing anything. `out` is filled either way as far
// as the reading got.
inline status render_report(const std::string& run_dir, report_summary& out, std::string& html) {
  namespace d = detail::report;
  namespace fs = std::filesystem;
  out = report_summary{};
  html.clear();
  try {
    std::error_code ec;
    if (!fs::is_directory(run_dir, ec)) return {errc::io_error, "report: '" + run_dir + "' is not a directory"};
    const fs::path root(run_dir);
    const auto shown = [&](const fs::path& rel) { return (root / rel).string(); };

    // summary.json (optional).
    d::ojson summary_json;
    {
      std::string text;
      bool exists = false;
      const std::string name = shown("summary.json");
      KD_TRY(d::read_text(root / "summary.json", name, text, exists));
      if (exists) {
        try {
          summary_json = d::ojson::parse(text);
        } catch (const nlohmann::json::parse_error& e) {
          return {errc::io_error, name + ": not valid JSON: " + d::parse_reason(e)};
        }
        if (!summary_json.is_object()) return {errc::io_error, name + ": not a JSON object"};
      }
    }

    // The runs.
    std::vector<d::log_data> logs(report_runs.size());
    std::vector<std::vector<d::eval_point>> evals(report_runs.size());
    std::vector<bool> has_log(report_runs.size(), false), has_eval(report_runs.size(), false);
    for (std::size_t k = 0; k < report_runs.size(); ++k) {
      run_result rr;
      rr.name = std::string(report_runs[k]);
      const fs::path dir = root / rr.name;
      std::vector<d::jsonl_record> recs;
      std::string text;
      bool exists = false;

      const std::string log_name = shown(fs::path(rr.name) / "log.jsonl");
      KD_TRY(d::read_text(dir / "log.jsonl", log_name, text, exists));
      if (exists) {
        has_log[k] = true;
        KD_TRY(d::parse_jsonl(text, log_name, recs, out.notes));
        KD_TRY(d::read_log(recs, log_name, logs[k], out.notes));
        rr.log_records = static_cast<std::int64_t>(logs[k].steps.size());
        if (!logs[k].steps.empty()) rr.steps = static_cast<std::int64_t>(logs[k].steps.back());
      }
      const std::string eval_name = shown(fs::path(rr.name) / "eval.jsonl");
      KD_TRY(d::read_text(dir / "eval.jsonl", eval_name, text, exists));
      if (exists) {
        has_eval[k] = true;
        KD_TRY(d::parse_jsonl(text, eval_name, recs, out.notes));
        KD_TRY(d::read_eval(recs, eval_name, evals[k], out.notes));
      }
      rr.found = has_log[k] || has_eval[k];
      if (!rr.found) {
        out.missing.push_back(rr.name);
      } else {
        if (!has_log[k]) out.notes.push_back(log_name + " does not exist");
        if (!has_eval[k]) out.notes.push_back(eval_name + " does not exist");
      }
      const auto& ev = evals[k];
      rr.evals = static_cast<std::int64_t>(ev.size());
      if (!ev.empty()) {
        rr.final_tokens = ev.back().tokens;
        rr.final_bpb = ev.back().bpb;
        rr.final_loss = ev.back().loss;
        rr.final_ppl = ev.back().ppl;
        if (logs[k].steps.empty()) rr.steps = static_cast<std::int64_t>(ev.back().step);
      }
      // fmin ignores NaN: best is over the evaluations that have the value.
      for (const auto& p : ev) {
        rr.best_bpb = std::fmin(rr.best_bpb, p.bpb);
        rr.best_loss = std::fmin(rr.best_loss, p.loss);
        rr.best_ppl = std::fmin(rr.best_ppl, p.ppl);
      }
      out.runs.push_back(std::move(rr));
    }

    // Gap closed by distillation, on final values (each student's last evaluation).
    const double tb = out.runs[0].final_bpb, db = out.runs[1].final_bpb, sb = out.runs[2].final_bpb;
    if (std::isfinite(tb) && std::isfinite(db) && std::isfinite(sb)) {
      if (sb != tb) out.gap_closed = (sb - db) / (sb - tb);
      if (!(sb > tb))
        out.notes.push_back("the teacher's final val_bpb is not below the scratch student's: the gap closed is not meaningful");
      const double dt = out.runs[1].final_tokens, st = out.runs[2].final_tokens;
      if (std::isfinite(dt) && std::isfinite(st) && std::fabs(dt - st) > 0.01 * std::max(dt, st))
        out.notes.push_back("the distilled and scratch students' last evaluations are at different token counts (" +
                            d::si(dt) + " and " + d::si(st) + ")");
    }

    // Expert utilization.
    std::vector<d::expert_layer> layers;
    {
      std::string text;
      bool exists = false;
      const std::string name = shown(fs::path("teacher") / "experts.json");
      KD_TRY(d::read_text(root / "teacher" / "experts.json", name, text, exists));
      if (exists) KD_TRY(d::read_experts(text, name, layers));
      else out.notes.push_back(name + " does not exist: no expert utilization");
    }
    std::vector<double> totals;
    for (const auto& l : layers) {
      double total = 0.0;
      for (const double c : l.counts) total += c;
      totals.push_back(total);
      if (!(total > 0.0)) {
        out.notes.push_back("experts.json: layer " + std::to_string(l.layer) + " routed no tokens");
        continue;
      }
      for (std::size_t i = 0; i < l.counts.size(); ++i) {
        const double ratio = l.counts[i] / total * static_cast<double>(l.counts.size());
        if (!(ratio >= out.min_expert_share_of_fair)) {  // also takes the first (NaN start)
          out.min_expert_share_of_fair = ratio;
          out.min_expert_layer = l.layer;
          out.min_expert = static_cast<std::int64_t>(i);
        }
      }
    }

    // Charts.
    std::string charts_loss, chart_eval, charts_experts;
    for (std::size_t k = 0; k < report_runs.size(); ++k) {
      const auto& lg = logs[k];
      if (lg.steps.empty()) {
        if (has_log[k]) out.notes.push_back(shown(fs::path(out.runs[k].name) / "log.jsonl") + " has no records");
        continue;
      }
      d::line_chart c;
      c.title = d::run_label(out.runs[k].name) + ": training loss components (window mean)";
      c.x_label = "step";
      c.y_label = "loss";
      c.allow_log_y = true;
      c.x_si = true;
      for (std::size_t i = 0; i < lg.components.size(); ++i) {
        d::plot_series sr;
        sr.name = lg.components[i];
        sr.color = d::component_color(sr.name, i);
        sr.width = sr.name == "total" ? 2.4 : 1.6;
        sr.x = lg.steps;
        sr.y = lg.means[i];
        c.series.push_back(std::move(sr));
      }
      charts_loss += d::render_line_chart(c);
      ++out.charts;
    }

    bool any_bpb = false;
    for (const auto& ev : evals)
      for (const auto& p : ev) any_bpb = any_bpb || std::isfinite(p.bpb);
    if (any_bpb) {
      d::line_chart c;
      c.title = "validation bits per byte";
      c.x_label = "tokens (each model's own tokenizer)";
      c.y_label = "val bits per byte";
      for (std::size_t k = 0; k < report_runs.size(); ++k) {
        const auto& ev = evals[k];
        const std::string& run = out.runs[k].name;
        std::size_t finite = 0;
        for (const auto& p : ev) finite += std::isfinite(p.bpb) ? 1 : 0;
        if (finite == 0) continue;
        if (run == "teacher" && ev.size() == 1) {  // one point: a reference level, not a curve
          c.references.push_back({"teacher (final " + d::num(ev[0].bpb) + ")", d::run_color(run), ev[0].bpb});
          continue;
        }
        d::plot_series sr;
        sr.name = d::run_label(run);
        sr.color = d::run_color(run);
        sr.markers = true;
        for (const auto& p : ev) {
          sr.x.push_back(p.tokens);
          sr.y.push_back(p.bpb);
          sr.hollow.push_back(p.counted ? 0 : 1);
        }
        if (std::any_of(ev.begin(), ev.end(), [](const d::eval_point& p) { return std::isnan(p.tokens); }))
          out.notes.push_back(shown(fs::path(run) / "eval.jsonl") + ": evaluations without 'tokens' are not plotted");
        c.series.push_back(std::move(sr));
      }
      chart_eval = d::render_line_chart(c);
      ++out.charts;
    }

    for (std::size_t i = 0; i < layers.size(); ++i) {
      if (!(totals[i] > 0.0)) continue;
      charts_experts += d::render_share_histogram(layers[i], totals[i]);
      ++out.charts;
    }

    out.table = d::text_table(out);

    // The page.
    const std::string title = fs::path(run_dir).lexically_normal().filename().string();
    html = "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>kd report: " +
           d::html_escape(title) + "</title>\n<style>" + std::string(d::css) + "</style>\n</head>\n<body>\n";
    html += "<h1>Distillation run report</h1>\n<div class=\"path\">" + d::html_escape(run_dir) + "</div>\n";
    if (summary_json.is_object() && !summary_json.empty()) {
      html += "<h2>Run</h2>\n<table>\n";
      for (const auto& [k, v] : summary_json.items())
        html += "<tr><td>" + d::html_escape(k) + "</td><td>" + d::html_escape(d::summary_value(v)) + "</td></tr>\n";
      html += "</table>\n";
    }
    html += "<h2>Results</h2>\n" + d::html_table(out);
    html += "<p>Gap closed by distillation, (scratch &minus; distilled) / (scratch &minus; teacher) on final val_bpb: <b>" +
            (std::isfinite(out.gap_closed) ? d::format("%.3f", out.gap_closed) + " (" + d::format("%.1f", 100.0 * out.gap_closed) + "%)"
                                           : std::string("n/a")) + "</b></p>\n";
    html += "<p>Smallest expert share, as a fraction of the fair share 1/E: <b>" +
            (std::isfinite(out.min_expert_share_of_fair)
                 ? d::format("%.3f", out.min_expert_share_of_fair) + "</b> (layer " + std::to_string(out.min_expert_layer) +
                       ", expert " + std::to_string(out.min_expert) + ")"
                 : std::string("n/a</b>")) + "</p>\n";
    if (!out.missing.empty()) {
      html += "<p class=\"missing\">Missing runs (no log.jsonl or eval.jsonl):";
      for (const auto& m : out.missing) html += " " + d::html_escape(m);
      html += "</p>\n";
    }
    if (!out.notes.empty()) {
      html += "<h2>Notes</h2>\n<ul class=\"notes\">\n";
      for (const auto& n : out.notes) html += "<li>" + d::html_escape(n) + "</li>\n";
      html += "</ul>\n";
    }
    html += "<h2>Validation</h2>\n" + (chart_eval.empty() ? std::string("<p>No evaluation with val_bpb.</p>\n") : chart_eval);
    html += "<h2>Training losses</h2>\n" +
            (charts_loss.empty() ? std::string("<p>No training log.</p>\n") : charts_loss);
    html += "<h2>Expert utilization (teacher)</h2>\n" +
            (charts_experts.empty() ? std::string("<p>No expert counts.</p>\n")
                                    : "<div class=\"grid\">\n" + charts_experts + "</div>\n");
    html += "</body>\n</html>\n";
  } catch (const std::exception& e) {  // bad_alloc, a filesystem error: a status, never an escape
    return {errc::io_error, std::string("report: ") + e.what()};
  }
  return {};
}

// Reads RUN, writes RUN/report.html (through a temporary file, so a reader never sees half a page) and
// fills `out`, whose `table` is meant for the console.
inline status write_report(const std::string& run_dir, report_summary& out) {
  namespace fs = std::filesystem;
  std::string html;
  KD_TRY(render_report(run_dir, out, html));
  const fs::path path = fs::path(run_dir) / "report.html";
  const fs::path tmp = fs::path(run_dir) / "report.html.tmp";
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    f << html;
    f.close();
    if (!f) return {errc::io_error, "cannot write " + tmp.string()};
  }
  std::error_code ec;
  fs::rename(tmp, path, ec);
  if (ec) {
    const std::string why = ec.message();
    fs::remove(tmp, ec);
    return {errc::io_error, "cannot write " + path.string() + ": " + why};
  }
  out.html_path = path.string();
  return {};
}

}  // namespace kd::train

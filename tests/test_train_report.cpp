// The run report (kd/train/report.hpp): charts per input, the summary numbers, and how bad input is told apart
// from an interrupted run.
#include <doctest/doctest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

#include <kd/train/report.hpp>

#include "test_util.hpp"

namespace fs = std::filesystem;

namespace {

using kdtest::contains;
using kdtest::temp_dir;

void write_all(const fs::path& p, const std::string& bytes) {
  fs::create_directories(p.parent_path());
  std::ofstream f(p, std::ios::binary | std::ios::trunc);
  f << bytes;
}
std::string read_all(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  std::ostringstream s;
  s << f.rdbuf();
  return s.str();
}
std::size_t count(const std::string& hay, const std::string& needle) {
  std::size_t n = 0;
  for (auto p = hay.find(needle); p != std::string::npos; p = hay.find(needle, p + 1)) ++n;
  return n;
}

// Final val_bpb: teacher 1.16 (one evaluation), distill 1.21, scratch 1.30 (best 1.29 earlier).
constexpr double teacher_bpb = 1.16, distill_bpb = 1.21, scratch_bpb = 1.30;

void write_teacher(const fs::path& run) {
  write_all(run / "teacher" / "log.jsonl",
            R"({"step":100,"window":100,"lm":{"mean":4.0,"max":5.0},"load_balance":{"mean":1.02,"max":1.1},"router_z":{"mean":0.003,"max":0.004},"total":{"mean":4.05,"max":5.1},"tokens":25600,"lr":0.001}
{"step":200,"window":100,"lm":{"mean":3.4,"max":4.0},"load_balance":{"mean":1.01,"max":1.05},"router_z":{"mean":null,"max":null},"total":{"mean":3.45,"max":4.1},"tokens":51200,"lr":0.001}
{"step":300,"window":100,"lm":{"mean":3.0,"max":3.5},"load_balance":{"mean":1.0,"max":1.02},"router_z":{"mean":0.002,"max":0.003},"total":{"mean":3.05,"max":3.6},"tokens":76800,"lr":0.0005}
)");
  write_all(run / "teacher" / "eval.jsonl",
            R"({"step":300,"tokens":76800,"val_loss":2.9,"val_ppl":18.17,"val_bpb":1.16,"counted":true}
)");
  // Layer 1: shares 50/30/15/5 %, fair 25 %: expert 3 has 0.2 of its fair share.
  write_all(run / "teacher" / "experts.json",
            R"({"layers":[{"layer":0,"counts":[10,10,10,10]},{"layer":1,"counts":[50,30,15,5]}]})");
}

void write_students(const fs::path& run) {
  // The distilled student's log ends in a record cut short (no newline): an interrupted run.
  write_all(run / "distill" / "log.jsonl",
            R"({"step":100,"window":100,"lm":{"mean":5.0,"max":6.0},"kd":{"mean":2.0,"max":2.5},"feature":{"mean":0.5,"max":0.6},"z_loss":{"mean":0.0001,"max":0.0002},"route":{"mean":0.1,"max":0.2},"total":{"mean":7.6,"max":9.0},"temperature":2.0}
{"step":200,"window":100,"lm":{"mean":4.2,"max":5.0},"kd":{"mean":1.5,"max":2.0},"feature":{"mean":0.4,"max":0.5},"z_loss":{"mean":0.0001,"max":0.0002},"route":{"mean":0.08,"max":0.1},"total":{"mean":6.2,"max":7.0},"temperature":1.5}
{"step":300,"window":100,"lm":{"mean":3.8,"max":4.4},"kd":{"mean":1.2,"max":1.6},"feature":{"mean":0.3,"max":0.4},"z_loss":{"mean":0.0001,"max":0.0002},"route":{"mean":0.07,"max":0.09},"total":{"mean":5.4,"max":6.0},"temperature":1.0}
{"step":400,"window":100,"lm":{"mea)");
  write_all(run / "distill" / "eval.jsonl",
            R"({"step":100,"tokens":25600,"val_loss":3.6,"val_ppl":36.6,"val_bpb":1.40,"counted":false}
{"step":200,"tokens":51200,"val_loss":3.3,"val_ppl":27.1,"val_bpb":1.28,"counted":true}
{"step":300,"tokens":76800,"val_loss":3.1,"val_ppl":22.2,"val_bpb":1.21,"counted":true}
)");
  write_all(run / "scratch" / "log.jsonl",
            R"({"step":100,"window":100,"lm":{"mean":5.2,"max":6.1},"total":{"mean":5.2,"max":6.1}}
{"step":200,"window":100,"lm":{"mean":4.5,"max":5.0},"total":{"mean":4.5,"max":5.0}}
{"step":300,"window":100,"lm":{"mean":4.3,"max":4.6},"total":{"mean":4.3,"max":4.6}}
)");
  write_all(run / "scratch" / "eval.jsonl",
            R"({"step":100,"tokens":25600,"val_loss":3.7,"val_ppl":40.4,"val_bpb":1.45,"counted":true}
{"step":200,"tokens":51200,"val_loss":3.35,"val_ppl":28.5,"val_bpb":1.29,"counted":true}
{"step":300,"tokens":76800,"val_loss":3.36,"val_ppl":28.8,"val_bpb":1.30,"counted":true}
)");
}

}  // namespace

TEST_CASE("report: a complete run gives one chart per input and the summary numbers") {
  temp_dir tmp("kd_report_");
  const fs::path run = tmp.path / "run";
  write_teacher(run);
  write_students(run);
  write_all(run / "summary.json", R"({"teacher_params":123456,"corpus":"synthetic <test> & co","lr":0.0003})");

  kd::train::report_summary s;
  const auto st = kd::train::write_report(run.string(), s);
  REQUIRE_MESSAGE(st.ok(), st.message());
  REQUIRE(fs::is_regular_file(run / "report.html"));
  CHECK(!fs::exists(run / "report.html.tmp"));
  CHECK(s.html_path == (run / "report.html").string());
  const std::string html = read_all(run / "report.html");

  // 3 runs' loss charts + 1 validation chart + 2 MoE layers.
  CHECK(s.charts == 6);
  CHECK(count(html, "<svg") == 6);
  CHECK(count(html, "</svg>") == 6);
  // Self-contained: nothing fetched from elsewhere.
  CHECK(!contains(html, "<script"));
  CHECK(!contains(html, "http"));
  CHECK(!contains(html, "src="));
  // summary.json on top, escaped.
  CHECK(contains(html, "teacher_params"));
  CHECK(contains(html, "synthetic &lt;test&gt; &amp; co"));
  // The teacher's single evaluation is a reference line; the students are curves with one marker per evaluation.
  CHECK(contains(html, "teacher (final 1.1600)"));
  CHECK(contains(html, "stroke-dasharray"));
  // Components are plotted, plain numeric fields are not.
  CHECK(contains(html, ">load_balance<"));
  CHECK(contains(html, ">z_loss<"));
  CHECK(contains(html, "class=\"legend\">load_balance<"));
  CHECK(!contains(html, "class=\"legend\">lr<"));
  CHECK(!contains(html, "class=\"legend\">temperature<"));
  CHECK(!contains(html, "class=\"legend\">tokens<"));
  CHECK(!contains(html, "class=\"legend\">window<"));

  REQUIRE(s.runs.size() == 3);
  CHECK(s.missing.empty());
  const auto* t = s.run("teacher");
  const auto* d = s.run("distill");
  const auto* sc = s.run("scratch");
  REQUIRE((t && d && sc));
  CHECK(t->final_bpb == doctest::Approx(teacher_bpb));
  CHECK(t->steps == 300);
  CHECK(d->log_records == 3);  // the cut-short 4th record is skipped
  CHECK(d->steps == 300);
  CHECK(d->evals == 3);
  CHECK(d->final_loss == doctest::Approx(3.1));
  CHECK(sc->final_bpb == doctest::Approx(scratch_bpb));
  CHECK(sc->best_bpb == doctest::Approx(1.29));
  CHECK(sc->best_loss == doctest::Approx(3.35));
  CHECK(sc->final_ppl == doctest::Approx(28.8));

  const double gap = (scratch_bpb - distill_bpb) / (scratch_bpb - teacher_bpb);
  CHECK(s.gap_closed == doctest::Approx(gap).epsilon(1e-12));
  CHECK(s.min_expert_share_of_fair == doctest::Approx(0.2).epsilon(1e-12));
  CHECK(s.min_expert_layer == 1);
  CHECK(s.min_expert == 3);

  // The skipped line is on the page and in the console table, by file and line.
  bool noted = false;
  for (const auto& n : s.notes) noted = noted || (contains(n, "log.jsonl") && contains(n, "line 4") && contains(n, "cut short"));
  CHECK(noted);
  CHECK(contains(html, "line 4 is cut short"));
  CHECK(contains(s.table, "gap closed by distillation: 0.643"));
  CHECK(contains(s.table, "0.200 of fair (layer 1, expert 3)"));
  CHECK(contains(s.table, "note:"));

  // Deterministic: the same folder renders the same page.
  kd::train::report_summary s2;
  std::string again;
  REQUIRE(kd::train::render_report(run.string(), s2, again).ok());
  CHECK(again == html);
}

TEST_CASE("report: a malformed line in the middle is an error naming the file and line") {
  temp_dir tmp("kd_report_");
  const fs::path run = tmp.path / "run";
  write_teacher(run);
  write_students(run);
  kd::train::report_summary s;

  SUBCASE("not JSON") {
    write_all(run / "distill" / "log.jsonl",
              "{\"step\":100,\"window\":100,\"lm\":{\"mean\":5.0,\"max\":6.0}}\n"
              "{\"step\":200,oops}\n"
              "{\"step\":300,\"window\":100,\"lm\":{\"mean\":3.8,\"max\":4.4}}\n");
    const auto st = kd::train::write_report(run.string(), s);
    CHECK(!st.ok());
    CHECK(st.code() == kd::errc::io_error);
    CHECK(contains(st.message(), (fs::path("distill") / "log.jsonl").string()));
    CHECK(contains(st.message(), "line 2"));
    CHECK(!fs::exists(run / "report.html"));
  }
  SUBCASE("a cut-short record that is not the last line is an error too") {
    write_all(run / "distill" / "log.jsonl",
              "{\"step\":100,\"window\":100,\"lm\":{\"mean\":5.0,\"max\":6.0}}\n"
              "{\"step\":200,\"window\":100,\"lm\":{\"me\n"
              "{\"step\":300,\"window\":100,\"lm\":{\"mean\":3.8,\"max\":4.4}}\n");
    const auto st2 = kd::train::write_report(run.string(), s);
    CHECK(!st2.ok());
    CHECK(contains(st2.message(), "line 2"));
  }
  SUBCASE("a complete but invalid last line is not mistaken for an interrupted write") {
    write_all(run / "scratch" / "eval.jsonl",
              "{\"step\":100,\"tokens\":25600,\"val_bpb\":1.45}\n{\"step\":200}x\n");
    const auto st2 = kd::train::write_report(run.string(), s);
    CHECK(!st2.ok());
    CHECK(contains(st2.message(), "eval.jsonl"));
    CHECK(contains(st2.message(), "line 2"));
  }
  SUBCASE("a record of the wrong shape names its line and field") {
    write_all(run / "scratch" / "eval.jsonl",
              "{\"step\":100,\"tokens\":25600,\"val_bpb\":1.45}\n\n{\"step\":200,\"val_bpb\":\"low\"}\n");
    const auto st2 = kd::train::write_report(run.string(), s);
    CHECK(!st2.ok());
    CHECK(contains(st2.message(), "line 3"));  // blank lines still count
    CHECK(contains(st2.message(), "val_bpb"));
  }
}

TEST_CASE("report: missing runs are listed and the rest is drawn") {
  temp_dir tmp("kd_report_");
  const fs::path run = tmp.path / "run";
  write_teacher(run);  // no students, no summary.json
  kd::train::report_summary s;
  const auto st = kd::train::write_report(run.string(), s);
  REQUIRE_MESSAGE(st.ok(), st.message());
  const std::string html = read_all(run / "report.html");
  REQUIRE(s.missing.size() == 2);
  CHECK(s.missing[0] == "distill");
  CHECK(s.missing[1] == "scratch");
  CHECK(!s.run("distill")->found);
  CHECK(std::isnan(s.gap_closed));
  // The teacher's losses, its validation level, and the 2 layers.
  CHECK(s.charts == 4);
  CHECK(count(html, "<svg") == 4);
  CHECK(contains(html, "Missing runs"));
  CHECK(contains(html, "scratch"));
  CHECK(contains(s.table, "missing"));
  CHECK(contains(s.table, "gap closed by distillation: n/a"));

  SUBCASE("no experts.json: no histograms, no minimum, a note") {
    fs::remove(run / "teacher" / "experts.json");
    REQUIRE(kd::train::write_report(run.string(), s).ok());
    CHECK(s.charts == 2);
    CHECK(std::isnan(s.min_expert_share_of_fair));
    CHECK(count(read_all(run / "report.html"), "<svg") == 2);
  }
  SUBCASE("an empty run folder is an empty report, and a missing folder is an error") {
    const fs::path empty = tmp.path / "empty";
    fs::create_directories(empty);
    REQUIRE(kd::train::write_report(empty.string(), s).ok());
    CHECK(s.charts == 0);
    CHECK(s.missing.size() == 3);
    CHECK(!kd::train::write_report((tmp.path / "nowhere").string(), s).ok());
  }
}

TEST_CASE("report: a resumed run's repeated steps replace the earlier records") {
  temp_dir tmp("kd_report_");
  const fs::path run = tmp.path / "run";
  // Interrupted after step 300 with the last checkpoint at 100: steps 200 and 300 are logged again.
  write_all(run / "scratch" / "log.jsonl",
            "{\"step\":100,\"lm\":{\"mean\":5.0,\"max\":5.0}}\n{\"step\":200,\"lm\":{\"mean\":4.0,\"max\":4.0}}\n"
            "{\"step\":300,\"lm\":{\"mean\":3.0,\"max\":3.0}}\n{\"step\":200,\"lm\":{\"mean\":4.1,\"max\":4.1}}\n"
            "{\"step\":300,\"lm\":{\"mean\":3.1,\"max\":3.1}}\n{\"step\":400,\"lm\":{\"mean\":2.9,\"max\":2.9}}\n");
  write_all(run / "scratch" / "eval.jsonl",
            "{\"step\":200,\"tokens\":51200,\"val_loss\":3.0,\"val_bpb\":1.5}\n"
            "{\"step\":200,\"tokens\":51200,\"val_loss\":3.2,\"val_bpb\":1.6}\n");
  kd::train::report_summary s;
  REQUIRE(kd::train::write_report(run.string(), s).ok());
  const auto* sc = s.run("scratch");
  CHECK(sc->log_records == 4);
  CHECK(sc->steps == 400);
  CHECK(sc->evals == 1);
  CHECK(sc->final_bpb == doctest::Approx(1.6));
  CHECK(sc->final_ppl == doctest::Approx(std::exp(3.2)));  // no val_ppl: exp(val_loss)
  bool noted = false;
  for (const auto& n : s.notes) noted = noted || contains(n, "after a resume");
  CHECK(noted);
}

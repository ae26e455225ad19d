// kd::train::text_loader: deterministic batches, exact resume from a saved state (with prefetch), every
// window once per epoch, labels = next tokens, teacher windows inside the student's bytes, aligned index
// arrays pointing at equal next-token strings.
#include <doctest/doctest.h>

#include <cstdlib>
#include <set>
#include <string>

#include <kd/text/corpus.hpp>
#include <kd/train/data.hpp>

namespace {

std::string data_dir() {
  const char* env = std::getenv("KD_TEXT_DATA");
  return env ? env : KD_TEXT_DATA_DIR;
}

struct fixture {
  kd::text::tokenizer qwen3, gpt2;
  kd::text::encoding t, s;
  std::string text;
  fixture() {
    kd::check(kd::text::load_tokenizer("qwen3", data_dir(), qwen3));
    kd::check(kd::text::load_tokenizer("gpt2", data_dir(), gpt2));
    std::vector<kd::text::document> docs;
    kd::check(kd::text::default_corpus(data_dir(), docs));
    text = docs[2].text.substr(0, 60'000);  // a slice of one novel
    kd::check(qwen3.encode(text, t));
    kd::check(gpt2.encode(text, s));
  }
  kd::train::token_stream teacher() const { return {t.ids, t.begin, t.end}; }
  kd::train::token_stream student() const { return {s.ids, s.begin, s.end}; }
};

const fixture& fx() {
  static fixture f;
  return f;
}

bool same(const kd::train::text_batch& a, const kd::train::text_batch& b) {
  return a.student_ids == b.student_ids && a.student_labels == b.student_labels && a.teacher_ids == b.teacher_ids &&
         a.teacher_labels == b.teacher_labels && a.aligned_student == b.aligned_student &&
         a.aligned_teacher == b.aligned_teacher && a.windows == b.windows && a.after == b.after;
}

}  // namespace

TEST_CASE("batch contents: labels, teacher window, aligned index arrays") {
  const auto& f = fx();
  kd::train::text_loader_options o;
  o.batch = 4;
  o.seq = 64;
  o.seed = 7;
  kd::train::text_loader L;
  REQUIRE(L.init(f.teacher(), f.student(), o).ok());
  kd::train::text_batch b;
  REQUIRE(L.next(b).ok());
  const std::int64_t S = b.seq, T = b.teacher_seq;
  CHECK(T == 96);
  std::size_t aligned = 0;
  for (std::int64_t r = 0; r < b.batch; ++r) {
    const std::size_t p = b.windows[r] * static_cast<std::size_t>(S);
    for (std::int64_t j = 0; j < S; ++j) {
      CHECK(b.student_ids[r * S + j] == static_cast<std::int32_t>(f.s.ids[p + j]));
      CHECK(b.student_labels[r * S + j] == static_cast<std::int32_t>(f.s.ids[p + j + 1]));
      if (j + 1 < S) CHECK(b.student_labels[r * S + j] == b.student_ids[r * S + j + 1]);
    }
    // The teacher row decodes to a prefix of the student window's text.
    std::string window = f.text.substr(f.s.begin[p], f.s.end[p + S] - f.s.begin[p]), teacher;
    std::vector<std::uint32_t> tids;
    for (std::int64_t i = 0; i < T && b.teacher_labels[r * T + i] != o.ignore_index; ++i)
      tids.push_back(static_cast<std::uint32_t>(b.teacher_ids[r * T + i]));
    REQUIRE(f.qwen3.decode(tids.data(), tids.size(), teacher).ok());
    CHECK(window.rfind(teacher, 0) == 0);
    CHECK(teacher.size() * 10 > window.size() * 9);  // English: the teacher row covers nearly all of it
  }
  for (std::size_t k = 0; k < b.aligned_student.size(); ++k) {
    const auto js = b.aligned_student[k], it = b.aligned_teacher[k];
    CHECK(it % T < T);
    CHECK(js / S == it / T);  // same batch row
    CHECK(f.gpt2.token_bytes(static_cast<std::uint32_t>(b.student_labels[js])) ==
          f.qwen3.token_bytes(static_cast<std::uint32_t>(b.teacher_labels[it])));
    ++aligned;
  }
  MESSAGE("aligned student positions in the batch: ", aligned, " of ", b.batch * S);
  CHECK(aligned * 10 > static_cast<std::size_t>(b.batch * S) * 7);
}

TEST_CASE("determinism, epochs and exact resume with prefetch") {
  const auto& f = fx();
  kd::train::text_loader_options o;
  o.batch = 3;
  o.seq = 128;
  o.seed = 11;
  kd::train::text_loader a, c;
  REQUIRE(a.init(f.teacher(), f.student(), o).ok());
  const auto per_epoch = a.batches_per_epoch();
  REQUIRE(per_epoch >= 4);
  std::vector<kd::train::text_batch> seen;
  std::set<std::uint64_t> epoch0;
  for (std::uint64_t k = 0; k < per_epoch + 3; ++k) {
    kd::train::text_batch b;
    REQUIRE(a.next(b).ok());
    if (k < per_epoch)
      for (auto w : b.windows) CHECK(epoch0.insert(w).second);  // no window twice in an epoch
    seen.push_back(std::move(b));
  }
  CHECK(epoch0.size() == per_epoch * 3);
  CHECK(seen[per_epoch - 1].after == kd::train::loader_state{1, 0});
  CHECK(seen[per_epoch].windows != seen[0].windows);  // a new order in epoch 1

  // Same seed, no prefetch: the same stream.
  o.prefetch = false;
  REQUIRE(c.init(f.teacher(), f.student(), o).ok());
  for (const auto& want : seen) {
    kd::train::text_batch b;
    REQUIRE(c.next(b).ok());
    CHECK(same(b, want));
  }
  // Resume from a saved state (the state of the batches handed out, not of those prefetched).
  o.prefetch = true;
  kd::train::text_loader r;
  REQUIRE(r.init(f.teacher(), f.student(), o, seen[per_epoch - 2].after).ok());
  for (std::uint64_t k = per_epoch - 1; k < seen.size(); ++k) {
    kd::train::text_batch b;
    REQUIRE(r.next(b).ok());
    CHECK(same(b, seen[k]));
  }
  CHECK(r.state() == seen.back().after);
  REQUIRE(r.restore(seen[0].after).ok());
  kd::train::text_batch b;
  REQUIRE(r.next(b).ok());
  CHECK(same(b, seen[1]));

  // Another seed: another order.
  o.seed = 12;
  kd::train::text_loader d;
  REQUIRE(d.init(f.teacher(), f.student(), o).ok());
  REQUIRE(d.next(b).ok());
  CHECK(b.windows != seen[0].windows);
}

TEST_CASE("loader errors") {
  const auto& f = fx();
  kd::train::text_loader L;
  kd::train::text_loader_options o;
  o.seq = 1 << 20;
  CHECK(L.init(f.teacher(), f.student(), o).code() == kd::errc::empty_input);
  o.seq = 0;
  CHECK(L.init(f.teacher(), f.student(), o).code() == kd::errc::invalid_argument);
  kd::train::token_stream bad = f.student();
  bad.end = bad.end.subspan(1);
  o.seq = 16;
  CHECK(L.init(f.teacher(), bad, o).code() == kd::errc::shape_mismatch);
}

TEST_CASE("data parallel: ranks share a global batch, and the state resumes on another rank count") {
  const auto& f = fx();
  kd::train::text_loader_options o;
  o.seq = 64;
  o.seed = 5;
  o.prefetch = false;
  // One process, global batches of 6 rows; then 2 ranks of 3 rows and 3 ranks of 2 rows.
  o.batch = 6;
  kd::train::text_loader whole;
  REQUIRE(whole.init(f.teacher(), f.student(), o).ok());
  std::vector<kd::train::text_batch> want(5);
  for (auto& b : want) REQUIRE(whole.next(b).ok());
  for (std::int64_t ranks : {2, 3}) {
    CAPTURE(ranks);
    std::vector<kd::train::text_loader> L(static_cast<std::size_t>(ranks));
    for (std::int64_t r = 0; r < ranks; ++r) {
      auto ro = o;
      ro.batch = 6 / ranks;
      ro.rank = r;
      ro.ranks = ranks;
      REQUIRE(L[static_cast<std::size_t>(r)].init(f.teacher(), f.student(), ro).ok());
      CHECK(L[static_cast<std::size_t>(r)].batches_per_epoch() == whole.batches_per_epoch());
    }
    for (std::size_t k = 0; k < want.size(); ++k) {
      std::vector<std::uint64_t> windows;
      std::vector<std::int32_t> ids;
      for (auto& l : L) {
        kd::train::text_batch b;
        REQUIRE(l.next(b).ok());
        windows.insert(windows.end(), b.windows.begin(), b.windows.end());
        ids.insert(ids.end(), b.student_ids.begin(), b.student_ids.end());
        CHECK(b.after == want[k].after);  // the global state on every rank
      }
      CHECK(windows == want[k].windows);
      CHECK(ids == want[k].student_ids);
    }
  }
  // A state saved with 3 ranks resumes one process (same global batch) at the same place.
  auto ro = o;
  ro.batch = 2;
  ro.rank = 1;
  ro.ranks = 3;
  kd::train::text_loader r1;
  REQUIRE(r1.init(f.teacher(), f.student(), ro).ok());
  kd::train::text_batch b;
  REQUIRE(r1.next(b).ok());
  REQUIRE(r1.next(b).ok());
  kd::train::text_loader resumed;
  REQUIRE(resumed.init(f.teacher(), f.student(), o, r1.state()).ok());
  REQUIRE(resumed.next(b).ok());
  CHECK(same(b, want[2]));
  ro.rank = 3;
  CHECK(r1.init(f.teacher(), f.student(), ro).code() == kd::errc::invalid_argument);
}

#pragma once
// kd/train/data.hpp: deterministic teacher/student batches over the same text windows.
//
// Inputs are two tokenizations of one text (ids and byte offsets, e.g. memory-mapped kd::text shards).
// The student stream is cut into windows of seq + 1 tokens starting every seq tokens (the last token is
// only a label). A window's teacher tokens are those that start at or after the window's first byte and
// end by its last byte, up to teacher_seq + 1 of them. Per batch row b:
//   student_ids[b*seq + j], student_labels[b*seq + j] = the next student token;
//   teacher_ids[b*teacher_seq + i], teacher_labels[...]; rows shorter than teacher_seq are padded with
//   teacher_pad and ignore_index labels;
//   aligned_student[k], aligned_teacher[k]: flat row indices (b*seq + j, b*teacher_seq + i) of the aligned
//   positions (kd/text/align.hpp: same context end, same next token span), ready to upload as index
//   arrays for the KD kernels. Unaligned student rows get no teacher target.
// Order: every epoch visits every window once, in a permutation drawn from kd::rng seeded by
// stream_key(seed, epoch); the state (epoch, cursor) with the seed reproduces the stream exactly, so a
// resumed run sees the same batches. Batches are prepared on a background thread (prefetch) so a trainer
// never waits on the host; the state reported is that of the batches handed out, not of those prepared.
// Data parallel: with ranks = R, a step's global batch is the next batch x R windows of the order and
// rank r gets rows [r * batch, (r + 1) * batch) of it. The state counts global windows, so a run resumes
// on any rank count whose batch x ranks is the same, with the same global batches.

#include <algorithm>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <mutex>
#include <span>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include <kd/core/rng.hpp>
#include <kd/core/status.hpp>
#include <kd/text/align.hpp>

namespace kd::train {

struct token_stream {
  std::span<const std::uint32_t> ids, begin, end;
};

struct text_loader_options {
  std::int64_t batch = 8;
  std::int64_t seq = 256;
  std::int64_t teacher_seq = 0;  // 0: seq + seq / 2 (the teacher needs ~the same count on English)
  std::uint64_t seed = 0;
  bool shuffle = true;
  std::int32_t teacher_pad = 0;
  std::int32_t ignore_index = -100;
  bool prefetch = true;
  std::size_t prefetch_depth = 2;
  std::int64_t rank = 0, ranks = 1;  // data parallel: this rank's share of a global batch of batch x ranks
};

struct loader_state {
  std::uint64_t epoch = 0;
  std::uint64_t cursor = 0;  // next window within the epoch's order
  friend bool operator==(const loader_state&, const loader_state&) = default;
};

struct text_batch {
  std::int64_t batch = 0, seq = 0, teacher_seq = 0;
  std::vector<std::int32_t> student_ids, student_labels, teacher_ids, teacher_labels;
  std::vector<std::int32_t> aligned_student, aligned_teacher;
  std::vector<std::uint64_t> windows;  // the window index of each row
  loader_state after;                  // the loader's state once this batch is consumed
};

class text_loader {
 public:
  text_loader() = default;
  text_loader(const text_loader&) = delete;
  text_loader& operator=(const text_loader&) = delete;
  ~text_loader() { stop(); }

  status init(token_stream teacher, token_stream student, const text_loader_options& opt,
              loader_state start = {}) {
    stop();
    if (opt.batch <= 0 || opt.seq <= 0 || opt.teacher_seq < 0)
      return {errc::invalid_argument, "text_loader: batch and seq must be positive"};
    if (opt.ranks < 1 || opt.rank < 0 || opt.rank >= opt.ranks)
      return {errc::invalid_argument, "text_loader: rank " + std::to_string(opt.rank) + " outside a group of " +
                                          std::to_string(opt.ranks)};
    if (teacher.ids.size() != teacher.begin.size() || teacher.ids.size() != teacher.end.size() ||
        student.ids.size() != student.begin.size() || student.ids.size() != student.end.size())
      return {errc::shape_mismatch, "text_loader: ids and offsets of a stream differ in length"};
    t_ = teacher;
    s_ = student;
    opt_ = opt;
    if (opt_.teacher_seq == 0) opt_.teacher_seq = opt.seq + opt.seq / 2;
    windows_ = student.ids.empty() ? 0 : (student.ids.size() - 1) / static_cast<std::size_t>(opt.seq);
    if (windows_ < static_cast<std::size_t>(opt.batch * opt.ranks))
      return {errc::empty_input, "text_loader: " + std::to_string(windows_) + " windows of " +
                                     std::to_string(opt.seq) + " student tokens, fewer than one batch of " +
                                     std::to_string(opt.batch * opt.ranks)};
    return restore(start);
  }

  [[nodiscard]] std::size_t windows() const { return windows_; }
  // Global batches (batch x ranks windows) per epoch.
  [[nodiscard]] std::uint64_t batches_per_epoch() const {
    return windows_ / static_cast<std::size_t>(opt_.batch * opt_.ranks);
  }
  // State of the batches handed out so far: save it with the checkpoint.
  [[nodiscard]] loader_state state() const { return consumed_; }

  // Restarts at `st` (a state() saved earlier).
  status restore(loader_state st) {
    stop();
    if (st.cursor > windows_) return {errc::out_of_range, "text_loader: cursor past the epoch"};
    consumed_ = produced_ = st;
    queue_.clear();
    if (opt_.prefetch) {
      quit_ = false;
      try {
        worker_ = std::thread([this] { run(); });
      } catch (const std::system_error&) {
        opt_.prefetch = false;  // no thread to be had: the caller's thread makes the same batches
      }
    }
    return ok_status();
  }

  status next(text_batch& out) {
    if (windows_ == 0) return {errc::invalid_argument, "text_loader: not initialized"};
    if (!opt_.prefetch) {
      make(produced_, out);
      produced_ = consumed_ = out.after;
      return ok_status();
    }
    std::unique_lock lock(mu_);
    cv_.wait(lock, [&] { return !queue_.empty(); });
    out = std::move(queue_.front());
    queue_.pop_front();
    consumed_ = out.after;
    cv_.notify_all();
    return ok_status();
  }

 private:
  void run() {
    for (;;) {
      {
        std::unique_lock lock(mu_);
        cv_.wait(lock, [&] { return quit_ || queue_.size() < opt_.prefetch_depth; });
        if (quit_) return;
      }
      text_batch b;
      make(produced_, b);  // produced_ is touched only by this thread while it runs
      produced_ = b.after;
      std::lock_guard lock(mu_);
      queue_.push_back(std::move(b));
      cv_.notify_all();
    }
  }

  void stop() {
    if (!worker_.joinable()) return;
    {
      std::lock_guard lock(mu_);
      quit_ = true;
    }
    cv_.notify_all();
    worker_.join();
  }

  const std::vector<std::uint32_t>& order(std::uint64_t epoch) {
    if (order_epoch_ != epoch || order_.size() != windows_) {
      order_.resize(windows_);
      for (std::size_t w = 0; w < windows_; ++w) order_[w] = static_cast<std::uint32_t>(w);
      if (opt_.shuffle) {
        rng r(stream_key(opt_.seed, epoch));
        for (std::size_t w = windows_; w > 1; --w) std::swap(order_[w - 1], order_[r.below(w)]);  // Fisher-Yates
      }
      order_epoch_ = epoch;
    }
    return order_;
  }

  void make(loader_state st, text_batch& b) {
    const auto B = opt_.batch, S = opt_.seq, T = opt_.teacher_seq;
    b.batch = B;
    b.seq = S;
    b.teacher_seq = T;
    b.student_ids.assign(static_cast<std::size_t>(B * S), 0);
    b.student_labels.assign(static_cast<std::size_t>(B * S), opt_.ignore_index);
    b.teacher_ids.assign(static_cast<std::size_t>(B * T), opt_.teacher_pad);
    b.teacher_labels.assign(static_cast<std::size_t>(B * T), opt_.ignore_index);
    b.aligned_student.clear();
    b.aligned_teacher.clear();
    b.windows.clear();
    const std::size_t usable = batches_per_epoch() * static_cast<std::size_t>(B * opt_.ranks);  // the remainder is dropped
    for (std::int64_t g = 0; g < B * opt_.ranks; ++g) {  // the global batch's rows; this rank fills its own
      if (st.cursor >= usable) st = {st.epoch + 1, 0};
      const std::size_t w = order(st.epoch)[st.cursor++];
      if (g / B != opt_.rank) continue;
      b.windows.push_back(w);
      fill_row(w, static_cast<std::size_t>(g % B), b);
    }
    if (st.cursor >= usable) st = {st.epoch + 1, 0};
    b.after = st;
  }

  void fill_row(std::size_t w, std::size_t row, text_batch& b) const {
    const std::size_t S = static_cast<std::size_t>(opt_.seq), T = static_cast<std::size_t>(opt_.teacher_seq);
    const std::size_t p = w * S;  // student tokens [p, p + S], the last a label only
    for (std::size_t j = 0; j < S; ++j) {
      b.student_ids[row * S + j] = static_cast<std::int32_t>(s_.ids[p + j]);
      b.student_labels[row * S + j] = static_cast<std::int32_t>(s_.ids[p + j + 1]);
    }
    const std::uint32_t lo = s_.begin[p], hi = s_.end[p + S];
    std::size_t t0 = static_cast<std::size_t>(std::lower_bound(t_.begin.begin(), t_.begin.end(), lo) - t_.begin.begin());
    std::size_t t1 = t0;
    while (t1 < t_.ids.size() && t1 - t0 < T + 1 && t_.end[t1] <= hi) ++t1;
    const std::size_t tn = t1 - t0;  // teacher tokens in the window (inputs + one label)
    for (std::size_t i = 0; i + 1 < tn; ++i) {
      b.teacher_ids[row * T + i] = static_cast<std::int32_t>(t_.ids[t0 + i]);
      b.teacher_labels[row * T + i] = static_cast<std::int32_t>(t_.ids[t0 + i + 1]);
    }
    text::aligned_pairs pairs;
    (void)text::align_positions(t_.end.subspan(t0, tn), s_.end.subspan(p, S + 1), pairs);
    for (std::size_t k = 0; k < pairs.student.size(); ++k) {
      b.aligned_student.push_back(static_cast<std::int32_t>(row * S + pairs.student[k]));
      b.aligned_teacher.push_back(static_cast<std::int32_t>(row * T + pairs.teacher[k]));
    }
  }

  token_stream t_, s_;
  text_loader_options opt_;
  std::size_t windows_ = 0;
  loader_state consumed_, produced_;
  std::vector<std::uint32_t> order_;
  std::uint64_t order_epoch_ = ~std::uint64_t{0};
  std::deque<text_batch> queue_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::thread worker_;
  bool quit_ = false;
};

}  // namespace kd::train

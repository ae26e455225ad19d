// Shared fixtures of the training-step tests (tests/test_distill_step.cpp on the CPU,
// tests/cuda/test_cuda_distill_step.cu against it): tiny models, a batch with aligned positions, a
// many-to-one vocabulary map, the full objective.
#pragma once

#include <doctest/doctest.h>

#include <cstdint>
#include <utility>
#include <vector>

#include <kd/core/rng.hpp>
#include <kd/loss/vocab_map.hpp>
#include <kd/model/config.hpp>
#include <kd/policy/curriculum.hpp>
#include <kd/train/adamw.hpp>
#include <kd/train/data.hpp>
#include <kd/train/distill_step.hpp>
#include <kd/train/objective.hpp>

namespace kd_test::distill {

namespace km = kd::model;

inline km::moe_config teacher_cfg() { return km::tiny_teacher(); }
inline km::dense_config student_cfg() { return km::tiny_student(); }

// A batch of 3 rows: student seq 8, teacher seq 9; every other student position aligned.
inline kd::train::text_batch make_batch(std::uint64_t seed) {
  kd::rng r(seed);
  kd::train::text_batch b;
  b.batch = 3;
  b.seq = 8;
  b.teacher_seq = 9;
  for (int i = 0; i < 3 * 8; ++i) {
    b.student_ids.push_back(static_cast<std::int32_t>(r.below(61)));
    b.student_labels.push_back(i % 7 == 6 ? kd::default_ignore_index : static_cast<std::int32_t>(r.below(61)));
  }
  for (int i = 0; i < 3 * 9; ++i) {
    b.teacher_ids.push_back(static_cast<std::int32_t>(r.below(97)));
    b.teacher_labels.push_back(static_cast<std::int32_t>(r.below(97)));
  }
  for (int row = 0; row < 3; ++row)
    for (int j = 0; j < 8; j += 2) {
      b.aligned_student.push_back(row * 8 + j);
      b.aligned_teacher.push_back(row * 9 + j + 1);
    }
  return b;
}

inline kd::vocab_map make_map() {
  std::vector<std::pair<std::int32_t, std::int32_t>> pairs;
  for (std::int32_t i = 0; i < 50; ++i) pairs.emplace_back(i * 2 % 97, i);
  pairs.emplace_back(95, 3);  // many-to-one
  kd::vocab_map m;
  kd::check(kd::vocab_map::from_pairs(pairs, 97, 61, m));
  return m;
}

inline kd::adamw_options adamw() {
  kd::adamw_options o;
  o.schedule = {.peak = 1e-2, .floor = 1e-3, .warmup_steps = 1, .total_steps = 10};
  o.max_grad_norm = 1.0;
  return o;
}

// The fixture's teacher (frozen) and student, initialised as every distillation test does.
template <class Model>
void init_models(Model& teacher, Model& student) {
  kd::check(teacher.allocate(false));
  kd::check(teacher.initialize(0.3, 1));
  kd::check(student.allocate(true));
  kd::check(student.initialize(0.3, 2));
}

// Step options for the fixture's vocabularies: head chunks of 10 rows, the student's 60 real tokens.
inline kd::train::distill_options fixture_options(std::int64_t window = 1) {
  kd::train::distill_options o;
  o.chunk_rows = 10;
  o.window = window;
  o.vocab = 60;
  return o;
}

inline kd::objective full_objective() {
  kd::objective obj;
  obj.add("z_loss", kd::fixed(1e-3)).add("kd", kd::fixed(0.7)).add("feature", kd::fixed(0.3)).add("route", kd::fixed(0.2));
  obj.temperature(kd::schedule<kd::curve::constant>{2.0, 2.0, 0, 0, 0});
  return obj;
}


inline double value(const kd::train::step_record& r, const char* name) {
  for (const auto& [n, v] : r.values)
    if (n == name) return v;
  FAIL("no value for ", name);
  return 0;
}

// Row r of a batch as a batch of one row (aligned indices re-based).
inline kd::train::text_batch row_of(const kd::train::text_batch& b, int r) {
  kd::train::text_batch o;
  o.batch = 1;
  o.seq = b.seq;
  o.teacher_seq = b.teacher_seq;
  const auto S = static_cast<std::size_t>(b.seq), T = static_cast<std::size_t>(b.teacher_seq), R = static_cast<std::size_t>(r);
  o.student_ids.assign(b.student_ids.begin() + static_cast<std::ptrdiff_t>(R * S), b.student_ids.begin() + static_cast<std::ptrdiff_t>((R + 1) * S));
  o.student_labels.assign(b.student_labels.begin() + static_cast<std::ptrdiff_t>(R * S),
                          b.student_labels.begin() + static_cast<std::ptrdiff_t>((R + 1) * S));
  o.teacher_ids.assign(b.teacher_ids.begin() + static_cast<std::ptrdiff_t>(R * T), b.teacher_ids.begin() + static_cast<std::ptrdiff_t>((R + 1) * T));
  o.teacher_labels.assign(b.teacher_labels.begin() + static_cast<std::ptrdiff_t>(R * T),
                          b.teacher_labels.begin() + static_cast<std::ptrdiff_t>((R + 1) * T));
  for (std::size_t k = 0; k < b.aligned_student.size(); ++k)
    if (static_cast<std::size_t>(b.aligned_student[k]) / S == R) {
      o.aligned_student.push_back(static_cast<std::int32_t>(static_cast<std::size_t>(b.aligned_student[k]) - R * S));
      o.aligned_teacher.push_back(static_cast<std::int32_t>(static_cast<std::size_t>(b.aligned_teacher[k]) - R * T));
    }
  return o;
}


}  // namespace kd_test::distill

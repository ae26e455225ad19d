// kd::cuda::nccl_communicator with one rank (kd/cuda/nccl.cuh), on one GPU:
//  - the id file: written atomically, read back; a missing file times out naming the path, a short one is
//    refused;
//  - the collectives of a group of one leave device and host data bit for bit as they were; broadcast,
//    barrier and sync return;
//  - distill_step with a one-rank NCCL group takes exactly the steps of distill_step without one (losses
//    and parameters bit for bit): the data-parallel path adds nothing to a single GPU's arithmetic.
// Runs of 2-8 ranks need machines with several GPUs (issue 13).
#include <doctest/doctest.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include <unistd.h>

#include <kd/cuda/context.cuh>
#include <kd/cuda/nccl.cuh>
#include <kd/model/cuda/ops.cuh>
#include <kd/train/distill_step.hpp>
#include <kd/train/step_backend.cuh>

#include "../distill_fixture.hpp"

namespace {

namespace km = kd::model;
using namespace kd_test::distill;

std::string temp_path(const char* name) {
  return (std::filesystem::temp_directory_path() / (std::string("kd_nccl_") + std::to_string(::getpid()) + "_" + name)).string();
}

std::unique_ptr<kd::cuda::nccl_communicator> solo_nccl(kd::cuda::context& ctx) {
  ncclUniqueId id;
  REQUIRE(ncclGetUniqueId(&id) == ncclSuccess);
  std::unique_ptr<kd::cuda::nccl_communicator> c;
  const kd::status s = kd::cuda::nccl_communicator::create(ctx, 0, 1, id, std::chrono::seconds(60), c);
  REQUIRE_MESSAGE(s.ok(), s.message());
  return c;
}

}  // namespace

TEST_CASE("NCCL id file: atomic write, read back, missing and short files") {
  ncclUniqueId id, back;
  REQUIRE(ncclGetUniqueId(&id) == ncclSuccess);
  const auto path = temp_path("id");
  REQUIRE(kd::cuda::write_nccl_id(path, id).ok());
  REQUIRE(kd::cuda::read_nccl_id(path, back, std::chrono::seconds(1)).ok());
  CHECK(std::memcmp(&id, &back, sizeof id) == 0);
  std::filesystem::remove(path);
  const kd::status missing = kd::cuda::read_nccl_id(path, back, std::chrono::milliseconds(50));
  CHECK(missing.code() == kd::errc::backend_error);
  CHECK(missing.message().find(path) != std::string::npos);
  std::ofstream(path) << "short";
  CHECK(kd::cuda::read_nccl_id(path, back, std::chrono::seconds(1)).code() == kd::errc::io_error);
  std::filesystem::remove(path);
}

TEST_CASE("nccl_communicator, one rank: collectives keep the data, host ones return values") {
  kd::cuda::context ctx;
  auto c = solo_nccl(ctx);
  CHECK(c->rank() == 0);
  CHECK(c->size() == 1);
  std::vector<float> h(1000);
  for (std::size_t i = 0; i < h.size(); ++i) h[i] = static_cast<float>(i) * 0.37f - 11.f;
  float* d = nullptr;
  REQUIRE(cudaMalloc(&d, h.size() * sizeof(float)) == cudaSuccess);
  REQUIRE(cudaMemcpy(d, h.data(), h.size() * sizeof(float), cudaMemcpyHostToDevice) == cudaSuccess);
  REQUIRE(c->all_reduce(d, h.size(), kd::reduce_op::sum).ok());
  REQUIRE(c->all_reduce(reinterpret_cast<kd::bfloat16*>(d), h.size(), kd::reduce_op::max).ok());
  REQUIRE(c->sync().ok());
  std::vector<float> back(h.size());
  REQUIRE(cudaMemcpy(back.data(), d, h.size() * sizeof(float), cudaMemcpyDeviceToHost) == cudaSuccess);
  CHECK(std::memcmp(back.data(), h.data(), h.size() * sizeof(float)) == 0);
  cudaFree(d);
  std::vector<std::int64_t> counts{3, -4};
  REQUIRE(c->all_reduce_host(counts.data(), counts.size(), kd::reduce_op::sum).ok());
  CHECK(counts == std::vector<std::int64_t>{3, -4});
  std::vector<double> losses(20000, 0.125);  // more than one staging buffer
  REQUIRE(c->all_reduce_host(losses.data(), losses.size(), kd::reduce_op::sum).ok());
  CHECK(losses.back() == 0.125);
  char word[] = "kd";
  REQUIRE(c->broadcast_host(word, sizeof word, 0).ok());
  CHECK(std::string(word) == "kd");
  CHECK(c->broadcast_host(word, sizeof word, 1).code() == kd::errc::out_of_range);
  CHECK(c->barrier().ok());
}

TEST_CASE("distill_step with a one-rank NCCL group = without one, bit for bit (fp32 and bf16)") {
  kd::cuda::context ctx;
  auto comm = solo_nccl(ctx);
  auto run = [&](auto tag, kd::communicator* c, std::vector<double>& losses, std::vector<float>& params) {
    using T = decltype(tag);
    km::cuda_ops<T> b(ctx);
    b.set_deterministic(true);  // the flash backward's atomics would differ between any two runs
    using model_t = km::transformer<km::cuda_ops<T>>;
    model_t teacher(b, km::make_arch(teacher_cfg())), student(b, km::make_arch(student_cfg()));
    kd::check(teacher.allocate(false));
    kd::check(teacher.initialize(0.3, 1));
    kd::check(student.allocate(true));
    kd::check(student.initialize(0.3, 2));
    const kd::vocab_map map = make_map();
    const kd::objective obj = full_objective();
    kd::train::distill_step<model_t, model_t> step;
    kd::train::distill_options o;
    o.chunk_rows = 10;
    o.vocab = 60;
    o.comm = c;
    kd::check(step.init(&teacher, student, &map, obj, o, adamw()));
    std::vector<kd::train::step_record> recs;
    for (std::int64_t k = 1; k <= 2; ++k) {
      kd::check(step.step(make_batch(60 + static_cast<std::uint64_t>(k)), k));
      kd::check(step.flush(recs));
      for (const auto& [name, v] : recs[0].values) losses.push_back(v);
    }
    std::vector<T> p(student.table().size());
    kd::check(b.download(student.params(), p.size(), p.data()));
    for (const T& x : p) params.push_back(static_cast<float>(x));
  };
  std::vector<double> l0, l1, l2, l3;
  std::vector<float> p0, p1, p2, p3;
  run(float{}, nullptr, l0, p0);
  run(float{}, comm.get(), l1, p1);
  CHECK(l1 == l0);
  CHECK(p1 == p0);
  run(kd::bfloat16{}, nullptr, l2, p2);
  run(kd::bfloat16{}, comm.get(), l3, p3);
  CHECK(l3 == l2);
  CHECK(p3 == p2);
}

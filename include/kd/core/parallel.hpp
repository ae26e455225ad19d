// kd/core/parallel.hpp: fixed-block parallel loops for the CPU backends.
//
// parallel_blocks(n, work, fn) calls fn(begin, end) over [0, n) in contiguous blocks, one thread each,
// when the work (a flop count or similar) pays for starting threads. Blocks depend only on n and the
// thread count, and callers keep per-item results and reduce them in index order afterwards, so a result
// never depends on the number of threads except where a GEMM is itself split (kd/model/ops_cpu.hpp says
// which). Threads: $KD_CPU_THREADS, else the hardware's (at most 64). A thread that cannot be started
// leaves its blocks to the caller's thread instead of ending the process.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <system_error>
#include <thread>
#include <vector>

namespace kd {

inline unsigned cpu_threads() {
  static const unsigned n = [] {
    if (const char* e = std::getenv("KD_CPU_THREADS")) {
      const long v = std::strtol(e, nullptr, 10);
      if (v >= 1) return static_cast<unsigned>(std::min<long>(v, 64));
    }
    return std::clamp(std::thread::hardware_concurrency(), 1u, 64u);
  }();
  return n;
}

// Below ~16M units of work (about a millisecond) everything runs on the caller's thread.
template <class F>
void parallel_blocks(std::int64_t n, double work, F&& fn) {
  const auto t = static_cast<std::int64_t>(std::min<double>(cpu_threads(), std::max(1.0, work / 1.6e7)));
  const std::int64_t parts = std::max<std::int64_t>(1, std::min(t, n));
  if (parts <= 1) return fn(std::int64_t{0}, n);
  std::vector<std::thread> pool;
  const std::int64_t block = (n + parts - 1) / parts;
  bool threads = true;  // false once a thread could not be started (a loaded machine, a process limit)
  for (std::int64_t p = 1; p < parts && p * block < n; ++p) {
    const auto run = [&fn, p, block, n] { fn(p * block, std::min(n, (p + 1) * block)); };
    if (threads) {
      try {
        pool.emplace_back(run);
        continue;
      } catch (const std::system_error&) {
        threads = false;
      }
    }
    run();  // the same block on the caller's thread, so the same result
  }
  fn(std::int64_t{0}, std::min(n, block));
  for (auto& th : pool) th.join();
}

}  // namespace kd

// kd/train/interrupt.hpp: SIGINT/SIGTERM turned into a flag a training loop polls.
//
// While an interrupt_guard lives, the first SIGINT or SIGTERM only sets a flag (the loop then writes an
// emergency checkpoint and returns); a second one restores the default action and re-raises, so an
// impatient Ctrl-C still kills a stuck run. The handler touches only lock-free atomics, sigaction and
// raise (all async-signal-safe). The destructor reinstalls the handlers that were there before.
// One guard at a time: the flag is process-wide, as signal dispositions are.
#pragma once

#include <atomic>
#include <cerrno>
#include <csignal>
#include <cstring>
#include <string>

#include <kd/core/status.hpp>

#if defined(__unix__) || defined(__APPLE__)
#include <signal.h>
#define KD_TRAIN_SIGNALS 1
#else
#define KD_TRAIN_SIGNALS 0
#endif

namespace kd {

namespace detail {

inline std::atomic<int>& interrupt_signal() noexcept {
  static std::atomic<int> s{0};  // the first signal received, 0 = none
  return s;
}
inline std::atomic<int>& interrupt_count() noexcept {
  static std::atomic<int> n{0};
  return n;
}
static_assert(std::atomic<int>::is_always_lock_free, "kd: a signal handler may only touch lock-free atomics");

#if KD_TRAIN_SIGNALS
extern "C" inline void interrupt_handler(int sig) {
  int none = 0;
  interrupt_signal().compare_exchange_strong(none, sig);
  if (interrupt_count().fetch_add(1) == 0) return;
  // Second signal: give up on a clean exit.
  struct sigaction dfl;
  std::memset(&dfl, 0, sizeof dfl);
  dfl.sa_handler = SIG_DFL;
  sigemptyset(&dfl.sa_mask);
  ::sigaction(sig, &dfl, nullptr);
  ::raise(sig);
}
#endif

}  // namespace detail

class interrupt_guard {
 public:
  // Installs the handlers; installed() says whether that worked (it cannot on platforms without sigaction).
  interrupt_guard() {
    detail::interrupt_signal().store(0);
    detail::interrupt_count().store(0);
#if KD_TRAIN_SIGNALS
    struct sigaction sa;
    std::memset(&sa, 0, sizeof sa);
    sa.sa_handler = detail::interrupt_handler;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART;  // a blocking read in the data loader resumes instead of failing with EINTR
    for (int i = 0; i < 2; ++i) {
      if (::sigaction(signals_[i], &sa, &previous_[i]) != 0) {
        // (void): nvcc reads the assignment's status& result as a discarded [[nodiscard]] value.
        static_cast<void>(installed_ = status{errc::backend_error, std::string("interrupt_guard: cannot install the handler for ") +
                                                                       (i == 0 ? "SIGINT" : "SIGTERM") + ": " + std::strerror(errno)});
        for (int j = 0; j < i; ++j) ::sigaction(signals_[j], &previous_[j], nullptr);
        return;
      }
      held_ = i + 1;
    }
#else
    installed_ = {errc::backend_error, "interrupt_guard: signals are not supported on this platform"};
#endif
  }
  ~interrupt_guard() {
#if KD_TRAIN_SIGNALS
    for (int i = 0; i < held_; ++i) ::sigaction(signals_[i], &previous_[i], nullptr);
#endif
  }
  interrupt_guard(const interrupt_guard&) = delete;
  interrupt_guard& operator=(const interrupt_guard&) = delete;

  [[nodiscard]] const status& installed() const noexcept { return installed_; }
  // True once SIGINT or SIGTERM arrived: write the emergency checkpoint and stop.
  [[nodiscard]] bool requested() const noexcept { return detail::interrupt_signal().load() != 0; }
  // Which signal (SIGINT or SIGTERM), 0 when none: exit with 128 + signal to tell the shell what happened.
  [[nodiscard]] int signal_number() const noexcept { return detail::interrupt_signal().load(); }

 private:
  status installed_;
#if KD_TRAIN_SIGNALS
  int signals_[2] = {SIGINT, SIGTERM};
  struct sigaction previous_[2] = {};
  int held_ = 0;
#endif
};

}  // namespace kd

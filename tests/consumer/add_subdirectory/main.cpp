#include <kd/core/version.hpp>

#include <cstdio>

int main() {
  constexpr auto v = kd::version_string();
  static_assert(!v.empty());
  std::printf("kd %.*s (add_subdirectory)\n", static_cast<int>(v.size()), v.data());
  return 0;
}

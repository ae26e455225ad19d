// kd/core/version.hpp: library version, kept in step with project(kd VERSION ...) in CMakeLists.txt
// (tests/consumer/find_package checks that the two agree).
#pragma once

#include <string_view>

#define KD_VERSION_MAJOR 0
#define KD_VERSION_MINOR 1
#define KD_VERSION_PATCH 0

#define KD_DETAIL_STRINGIFY_(x) #x
#define KD_DETAIL_STRINGIFY(x) KD_DETAIL_STRINGIFY_(x)
#define KD_VERSION_STRING \
  KD_DETAIL_STRINGIFY(KD_VERSION_MAJOR) "." KD_DETAIL_STRINGIFY(KD_VERSION_MINOR) "." KD_DETAIL_STRINGIFY(KD_VERSION_PATCH)

namespace kd {

// "MAJOR.MINOR.PATCH"
constexpr std::string_view version_string() noexcept { return KD_VERSION_STRING; }

}  // namespace kd

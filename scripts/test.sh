#!/usr/bin/env bash
# Build and run every kd test (the README's test command).
#   KD_BUILD_DIR   build directory (default: build)
#   KD_CMAKE_ARGS  extra arguments for the configure step (word-split), e.g. "-DKD_ENABLE_CUDA=OFF"
#   KD_SKIP_DEPS=1 do not run scripts/install_deps.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

[[ "${KD_SKIP_DEPS:-0}" == 1 ]] || bash scripts/install_deps.sh

build_dir="${KD_BUILD_DIR:-build}"
jobs="$(nproc)"

generator=()
if [[ ! -f "$build_dir/CMakeCache.txt" && -z "${CMAKE_GENERATOR:-}" ]] && command -v ninja >/dev/null 2>&1; then
  generator=(-G Ninja)
fi
read -r -a extra <<<"${KD_CMAKE_ARGS:-}"

cmake -S . -B "$build_dir" "${generator[@]}" \
  -DCMAKE_BUILD_TYPE=Release \
  -DKD_BUILD_TESTS=ON -DKD_BUILD_EXAMPLES=ON -DKD_BUILD_BENCHMARKS=ON \
  "${extra[@]}"
cmake --build "$build_dir" -j "$jobs"
ctest --test-dir "$build_dir" --output-on-failure -j "$jobs"

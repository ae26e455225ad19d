#!/usr/bin/env bash
# Configure, build and test kd on the GPU machine (no apt, no network), from the repo root.
# Prerequisite: scripts/fetch_device_deps.sh was run on the dev machine and .deps/root was carried
# over. Logs (configure.log, build.log, ctest.log) go to ${OUT:-build-device}/.
#   KD_BUILD_DIR   build directory (default: build-device)
#   KD_CMAKE_ARGS  extra configure arguments (word-split)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
repo="$PWD"

deps="$repo/.deps/root/usr"
[[ -d "$deps/include/eigen3" ]] ||
  { echo "device_build.sh: $deps missing; run scripts/fetch_device_deps.sh on the dev machine" >&2; exit 1; }
export LD_LIBRARY_PATH="$deps/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PATH="/usr/local/cuda/bin:$PATH"

build_dir="${KD_BUILD_DIR:-build-device}"
logs="${OUT:-build-device}"
mkdir -p "$logs"

generator=()
if [[ ! -f "$build_dir/CMakeCache.txt" ]]; then
  if command -v ninja >/dev/null 2>&1; then generator=(-G Ninja); else generator=(-G "Unix Makefiles"); fi
fi
read -r -a extra <<<"${KD_CMAKE_ARGS:-}"

cmake -S . -B "$build_dir" "${generator[@]}" \
  -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_CUDA_ARCHITECTURES=90 \
  -DCMAKE_PREFIX_PATH="$deps" \
  -DKD_BUILD_TESTS=ON -DKD_BUILD_EXAMPLES=ON -DKD_BUILD_BENCHMARKS=ON \
  "${extra[@]}" 2>&1 | tee "$logs/configure.log"
cmake --build "$build_dir" -j 16 2>&1 | tee "$logs/build.log"
ctest --test-dir "$build_dir" --output-on-failure -j 16 2>&1 | tee "$logs/ctest.log"

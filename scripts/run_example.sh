#!/usr/bin/env bash
# The README's main job: build and run the CPU teacher -> student distillation example.
# Arguments are passed to the example (e.g. --steps 1000 --seed 7 --jsonl metrics.jsonl).
#   KD_BUILD_DIR   build directory (default: build)
#   KD_SKIP_DEPS=1 do not run scripts/install_deps.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

[[ "${KD_SKIP_DEPS:-0}" == 1 ]] || bash scripts/install_deps.sh

build_dir="${KD_BUILD_DIR:-build}"

# A new build directory is configured from scratch. An existing one (e.g. from scripts/test.sh) keeps
# its cache and options; it is only re-configured with examples on, which also picks up an examples/
# folder added after it was first configured (the top level adds it only if it exists).
if [[ ! -f "$build_dir/CMakeCache.txt" ]]; then
  generator=()
  if [[ -z "${CMAKE_GENERATOR:-}" ]] && command -v ninja >/dev/null 2>&1; then
    generator=(-G Ninja)
  fi
  cmake -S . -B "$build_dir" "${generator[@]}" \
    -DCMAKE_BUILD_TYPE=Release \
    -DKD_BUILD_TESTS=OFF -DKD_BUILD_BENCHMARKS=OFF -DKD_BUILD_EXAMPLES=ON
else
  cmake -S . -B "$build_dir" -DKD_BUILD_EXAMPLES=ON >/dev/null
fi
cmake --build "$build_dir" --target kd_distill_cpu -j "$(nproc)"

exe="$build_dir/examples/kd_distill_cpu"
[[ -x "$exe" ]] || exe="$(find "$build_dir" -type f -name kd_distill_cpu -perm -u+x -print -quit)"
exec "$exe" "$@"

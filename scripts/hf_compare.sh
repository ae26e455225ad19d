#!/usr/bin/env bash
# On the GPU machine: checks kd::model against transformers both ways (scripts/hf_compare.py) with
# build-device/examples/kd_model, building that target first if it is missing. Results (hf_compare.log,
# hf_compare.json) go to $OUT (default build-device/hf_compare). Extra arguments go to hf_compare.py, e.g.
#   bash scripts/hf_compare.sh --presets tiny --backends cuda
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export OUT="${OUT:-build-device/hf_compare}"
mkdir -p "$OUT"
export LD_LIBRARY_PATH="$PWD/.deps/root/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PATH="/usr/local/cuda/bin:$PATH"
tool=build-device/examples/kd_model
if [[ ! -x "$tool" ]]; then
  if [[ ! -f build-device/CMakeCache.txt ]]; then
    # Configure only (scripts/device_build.sh would also build and run every test).
    deps="$PWD/.deps/root/usr"
    [[ -d "$deps/include/eigen3" ]] ||
      { echo "hf_compare.sh: $deps missing; run scripts/fetch_device_deps.sh on the dev machine" >&2; exit 1; }
    gen=(-G "Unix Makefiles"); command -v ninja >/dev/null 2>&1 && gen=(-G Ninja)
    cmake -S . -B build-device "${gen[@]}" -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90 \
      -DCMAKE_PREFIX_PATH="$deps" -DKD_BUILD_EXAMPLES=ON >"$OUT/configure.log" 2>&1 ||
      { tail -30 "$OUT/configure.log" >&2; echo "hf_compare.sh: configure failed ($OUT/configure.log)" >&2; exit 1; }
  fi
  cmake --build build-device --target kd_model -j 16 >"$OUT/build.log" 2>&1 ||
    { tail -30 "$OUT/build.log" >&2; echo "hf_compare.sh: building kd_model failed ($OUT/build.log)" >&2; exit 1; }
fi
[[ -x "$tool" ]] || { echo "hf_compare.sh: $tool was not built" >&2; exit 1; }
set -o pipefail
PYTHONUNBUFFERED=1 python3 scripts/hf_compare.py --kd-tool "$tool" --workdir build-device/hf_compare_work "$@" \
  2>&1 | tee "$OUT/hf_compare.log"

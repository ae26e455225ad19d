#!/usr/bin/env bash
# Same-run A/B of the GPU kernels: the working tree against an earlier revision, both built here and run
# alternately on one card, so a speed-up is read from one run (benchmarks/RESULTS.md's rule).
#   bash scripts/bench_ab.sh prepare REV          here (a git checkout): exports REV into .deps/ab_base
#                                                 (git-ignored, carried to the GPU machine with .deps)
#   bash scripts/bench_ab.sh run FILTER [REPS]    on the GPU machine: builds kd_bench_cuda of both trees
#                                                 (the base beside the device preset's build), runs FILTER
#                                                 (a --benchmark_filter regex; BM_device_copy is added)
#                                                 REPS times (default 2), base then head, and prints the
#                                                 table (benchmarks/ab_table.py). JSON and logs under build/bench_ab;
#                                                 with $OUT set (the device tool returns at most 8 files
#                                                 from it), the table, device.txt and logs_bench_ab.tgz go there.
#   bash scripts/bench_ab.sh small [REPS]         the same for kd_bench_small_calls (every op and N of it).
# The base tree is configured with the same options as the device preset (sm_90, .deps), without tests or
# examples. A benchmark the base does not have is left out of the table.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
base=.deps/ab_base
case "${1:-}" in
  prepare)
    rev="${2:?usage: bench_ab.sh prepare REV}"
    sha=$(git rev-parse --verify "$rev^{commit}") || exit 1
    rm -rf "$base" && mkdir -p "$base" && git archive "$sha" | tar -x -C "$base" || exit 1
    echo "$sha" > "$base/AB_REVISION"
    echo "base $sha exported to $base ($(du -sh "$base" | cut -f1)); carry .deps"
    ;;
  run | small)
    # The mode fixes the target, the table's reader and one side's run: run_side BIN SIDE REP.
    if [[ $1 == run ]]; then
      filter="${2:?usage: bench_ab.sh run FILTER [REPS]}"
      reps="${3:-2}"
      target=kd_bench_cuda
      table=()
      run_side() {
        "$1" --benchmark_filter="BM_device_copy|$filter" --benchmark_format=json \
          --benchmark_out="$logs/ab_$2_$3.json" --benchmark_out_format=json >/dev/null
      }
    else
      reps="${2:-2}"
      target=kd_bench_small_calls
      table=(--small)
      run_side() { "$1" >"$logs/small_$2_$3.md" 2>&1; }
    fi
    [[ -f $base/AB_REVISION ]] || { echo "no base tree: run 'bash scripts/bench_ab.sh prepare REV' first, here" >&2; exit 2; }
    logs=build/bench_ab
    source scripts/lib/device_env.sh
    device_setup "$logs" ab_table.md device.txt || exit 1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$logs/device.txt"
    jobs=$(nproc)
    ( cmake -S "$base" -B build/ab_base -G Ninja -DCMAKE_BUILD_TYPE=Release -DKD_BUILD_TESTS=OFF -DKD_BUILD_EXAMPLES=OFF \
        -DKD_BUILD_BENCHMARKS=ON -DKD_ENABLE_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DCMAKE_PREFIX_PATH="$PWD/.deps/root/usr" \
        >"$logs/base_configure.log" 2>&1 &&
      cmake --build build/ab_base -j $((jobs / 4 + 1)) --target "$target" >"$logs/base_build.log" 2>&1 ) &
    base_job=$!
    { cmake --preset device >"$logs/configure.log" 2>&1 &&
      cmake --build --preset device -j $((jobs - jobs / 4)) --target "$target" >"$logs/build.log" 2>&1; } ||
      { grep -E "error" "$logs/build.log" | head -20; exit 1; }
    wait $base_job || { grep -E "error" "$logs/base_build.log" | head -20; exit 1; }
    rc=0
    for r in $(seq 1 "$reps"); do
      for side in base head; do
        bin=build/ab_base/benchmarks/$target
        [[ $side == head ]] && bin=build/device/benchmarks/$target
        run_side "$bin" "$side" "$r" || rc=1
      done
    done
    python3 benchmarks/ab_table.py "${table[@]}" "$logs" "$(cat "$base/AB_REVISION")" | tee "$logs/ab_table.md"
    exit $rc
    ;;
  *)
    sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac

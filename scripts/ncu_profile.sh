#!/usr/bin/env bash
# Nsight Compute profiles of kd_bench_cuda's benchmarks, on the GPU machine: one launch of the named kernel
# per benchmark, with the full section set (SourceCounters included), the details page as text, and the
# SASS source counters as CSV for benchmarks/sass_blocks.py.
#   bash scripts/ncu_profile.sh [-k KERNEL_REGEX] NAME=BENCHMARK_FILTER...
#   e.g. bash scripts/ncu_profile.sh jsd_map='BM_grid_jsd_map/16384/1/0/' jsd='BM_grid_jsd/16384/50304/0/'
# KERNEL_REGEX (default logit_kd_kernel) picks the kernel; the fourth matching launch is profiled (the
# first ones warm up). A benchmark's full name ends in /iterations:N/manual_time, so a filter must not end
# in '$'. Builds kd_bench_cuda through the device preset (dependencies from .deps). Reports, details and
# CSVs go to build/ncu; with $OUT set (the device tool), summary.txt (the headline metrics of each) and
# logs_ncu.tgz (everything else) go there.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
kernel=logit_kd_kernel
if [[ ${1:-} == -k ]]; then
  kernel=${2:?usage: ncu_profile.sh [-k KERNEL_REGEX] NAME=FILTER...}
  shift 2
fi
[[ $# -gt 0 ]] || { sed -n '2,11p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 2; }
for spec in "$@"; do
  [[ $spec =~ ^[A-Za-z0-9_.-]+=.+$ ]] || { echo "ncu_profile.sh: '$spec' is not NAME=FILTER" >&2; exit 2; }
done
logs=build/ncu
source scripts/lib/device_env.sh
device_setup "$logs" summary.txt || exit 1
command -v ncu >/dev/null || { echo "ncu_profile.sh: ncu (Nsight Compute) is not on PATH" >&2; exit 2; }
device_build "$logs" kd_bench_cuda || exit 1
bench=build/device/benchmarks/kd_bench_cuda
rc=0
for spec in "$@"; do
  name=${spec%%=*}
  filter=${spec#*=}
  if ! ncu --set full --import-source yes -k "regex:$kernel" --launch-skip 3 --launch-count 1 -o "$logs/$name" \
      "$bench" --benchmark_filter="$filter" >"$logs/$name.log" 2>&1 || [[ ! -f $logs/$name.ncu-rep ]]; then
    echo "ncu_profile.sh: no profile for $name (filter '$filter'): see $logs/$name.log" >&2
    rc=1
    continue
  fi
  ncu -i "$logs/$name.ncu-rep" --page details >"$logs/$name.txt" 2>&1
  ncu -i "$logs/$name.ncu-rep" --page source --csv --print-source sass >"$logs/$name.sass.csv" 2>&1
  {
    echo "== $name ($filter)"
    grep -E "Context [0-9]+, Stream|Duration|Executed Instructions  |Issue Slots Busy|No Eligible|DRAM Throughput|Memory Throughput  |L2 Hit Rate|Achieved Occupancy|Theoretical Occupancy|Registers Per Thread|Dynamic Shared Memory Per Block" \
      "$logs/$name.txt" | head -14
  } >>"$logs/summary.txt"
done
cat "$logs/summary.txt" 2>/dev/null
exit $rc

#!/usr/bin/env bash
# On the GPU machine, after scripts/device_check.sh built build-device/: runs kd's GPU benchmarks and
# the PyTorch baselines (eager, torch.compile) in one run on one card, and prints the side-by-side
# table for benchmarks/RESULTS.md. Outputs (kd_bench.json, torch.jsonl, table.md) go to $OUT.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
logs="${OUT:-build-device}"
mkdir -p "$logs"
export LD_LIBRARY_PATH="$PWD/.deps/root/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
[[ -x build-device/benchmarks/kd_bench_cuda ]] || bash scripts/device_build.sh >/dev/null
build-device/benchmarks/kd_bench_cuda --benchmark_format=json --benchmark_out="$logs/kd_bench.json" \
  --benchmark_out_format=json >/dev/null
python3 benchmarks/torch_baseline.py > "$logs/torch.jsonl"
python3 benchmarks/make_table.py "$logs/kd_bench.json" "$logs/torch.jsonl" | tee "$logs/table.md"

#!/usr/bin/env bash
# kd's benchmark driver, on the GPU machine: builds through the `device` preset (dependencies from
# scripts/fetch_device_deps.sh, carried as .deps), then runs the chosen steps in one run on one card and
# prints the side-by-side tables for benchmarks/RESULTS.md. Logs and tables go to build/bench; with $OUT set
# (the device tool, which returns at most 8 files from it) the tables, device.txt and logs_bench.tgz (the rest)
# are copied there at the end, whatever the exit.
#   bash scripts/bench.sh [kernels] [grid] [model] [timing]        (default: kernels model)
#   kernels  the fused loss kernels (kd_bench_cuda) against PyTorch eager and torch.compile (torch_baseline.py)
#   grid     issue 12's table: every divergence and cross-entropy over V in {32,000, 50,304, 128,256,
#            151,936} x N in {2048, 8192, 16384} (bf16; fp32 on a subset; through the vocab maps),
#            linear + KD at d = 576 / 2048 with the teacher as logits or as hidden states + head,
#            chunked and on chip, beside its GEMMs alone, its chunk sweep, and a teacher head through a map,
#            full and compact; kd against eager and torch.compile
#            (torch_baseline.py --grid); KD_GRID_PARTS=bf16,fp32,map,linear picks parts, KD_GRID_OPS
#            (e.g. jsd,skew_kl or linear_teacher_head) the ops PyTorch runs
#   model    a training step of the seed teacher and student (kd_model bench) against transformers eager and
#            torch.compile (model_bench_torch.py); KD_BENCH_ARCHS="teacher" or "student" limits it
#   timing   per-op GPU times of the model at the seed geometry (test_cuda_model_ops' timing case)
#   programs the stand-alone GPU programs' tables (kd_bench_small_calls, kd_small_call_streaming,
#            kd_dsmem_scatter, kd_mufu_log_bias), each to NAME.md; KD_PROGRAMS="name ..." picks them
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
logs=build/bench
source scripts/lib/device_env.sh
device_setup "$logs" "*.md" device.txt || exit 1
steps=("$@")
[[ ${#steps[@]} -gt 0 ]] || steps=(kernels model)
want() { local s; for s in "${steps[@]}"; do [[ $s == "$1" ]] && return 0; done; return 1; }
bin=build/device
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$logs/device.txt"
targets=()
{ want kernels || want grid; } && targets+=(kd_bench_cuda)
want model && targets+=(kd_model)
want timing && targets+=(test_cuda_model_ops)
programs=(${KD_PROGRAMS:-kd_bench_small_calls kd_small_call_streaming kd_dsmem_scatter kd_mufu_log_bias})
want programs && targets+=("${programs[@]}")
device_build "$logs" "${targets[@]}" || exit 1
rc=0
if want kernels; then
  "$bin/benchmarks/kd_bench_cuda" --benchmark_filter=-BM_grid --benchmark_format=json \
    --benchmark_out="$logs/kd_bench.json" --benchmark_out_format=json >/dev/null || rc=1
  [[ -n "${KD_BENCH_KD_ONLY:-}" ]] || python3 benchmarks/torch_baseline.py >"$logs/torch.jsonl" || rc=1
  python3 benchmarks/make_table.py "$logs/kd_bench.json" "$logs/torch.jsonl" | tee "$logs/table.md"
fi
if want grid; then
  # KD_GRID_PARTS (comma-separated, default all): bf16, fp32, map (kd only), linear (with its GEMMs-alone
  # rows and the chunk sweep).
  parts="${KD_GRID_PARTS:-bf16,fp32,map,linear}"
  filter="BM_device_copy"
  [[ ,$parts, == *,bf16,* ]] &&
    filter+='|BM_grid_(forward_kl|reverse_kl|jsd|skew_kl|tvd|cross_entropy)/'
  [[ ,$parts, == *,fp32,* ]] && filter+='|BM_grid_[a-z_]*_f32/'
  [[ ,$parts, == *,map,* ]] && filter+='|BM_grid_[a-z_]*_map/'
  [[ ,$parts, == *,linear,* ]] && filter+='|BM_grid_linear|BM_gemms_|BM_chunks_|BM_onchip_|BM_storage_|BM_headmap_'
  torch_parts=$(echo "$parts" | tr ',' '\n' | grep -vx map | paste -sd, -)
  "$bin/benchmarks/kd_bench_cuda" --benchmark_filter="$filter" --benchmark_format=json \
    --benchmark_out="$logs/kd_grid.json" --benchmark_out_format=json >/dev/null || rc=1
  [[ -n "${KD_BENCH_KD_ONLY:-}" || -z "$torch_parts" ]] ||
    python3 benchmarks/torch_baseline.py --grid "$torch_parts" ${KD_GRID_OPS:+--ops "$KD_GRID_OPS"} >"$logs/torch_grid.jsonl" || rc=1
  touch "$logs/torch_grid.jsonl"
  python3 benchmarks/make_table.py "$logs/kd_grid.json" "$logs/torch_grid.jsonl" | tee "$logs/grid_table.md"
fi
if want model; then
  : >"$logs/model_bench.jsonl"
  for arch in ${KD_BENCH_ARCHS:-teacher student}; do
    "$bin/examples/kd_model" bench --arch "$arch" --preset seed --batch 8 --seq 1024 --steps 20 --warmup 5 \
      --profile 1 2>"$logs/kd_profile_$arch.md" | tee -a "$logs/model_bench.jsonl"
    [[ -n "${KD_BENCH_KD_ONLY:-}" ]] && continue
    for mode in eager compile; do
      python3 benchmarks/model_bench_torch.py --kd-tool "$bin/examples/kd_model" --arch "$arch" --preset seed \
        --batch 8 --seq 1024 --steps 20 --warmup 5 --mode "$mode" 2>>"$logs/torch_bench.err" | tail -1 \
        | tee -a "$logs/model_bench.jsonl"
    done
  done
  python3 benchmarks/model_table.py "$logs/model_bench.jsonl" | tee "$logs/model_table.md"
fi
if want timing; then
  "$bin/tests/cuda/test_cuda_model_ops" -tc="*timing*" --no-skip >"$logs/op_timing.log" 2>&1 || rc=1
  grep -E "us, " "$logs/op_timing.log" | sed 's/^.*MESSAGE: //'
fi
if want programs; then
  for p in "${programs[@]}"; do
    echo "## $p" | tee "$logs/$p.md"
    "$bin/benchmarks/$p" 2>&1 | tee -a "$logs/$p.md"
    [[ ${PIPESTATUS[0]} -eq 0 ]] || rc=1
  done
fi
exit $rc

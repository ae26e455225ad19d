#!/usr/bin/env bash
# The multi-GPU checks of issue 13, on a machine with several GPUs (the device preset, dependencies from
# scripts/fetch_device_deps.sh carried as .deps; the default corpus and tokenizers under .data). Logs and
# tables go to $OUT (or build/multi_gpu):
#   1. test_cuda_multi_gpu: data-parallel distill_step and the vocabulary-parallel losses on every GPU
#      against one GPU;
#   2. kd_bench_vocab_parallel: the vocabulary-parallel losses on 1, 2, 4, 8 ranks against the fused kernel;
#   3. kd_train bench --gpus N for N = 1, 2, 4, 8 (up to the GPUs present): tokens/s and scaling;
#   4. the trainer: a short teacher, then distill on 1 GPU (global batch 16) and on N GPUs (16 / N each),
#      and a run stopped on N GPUs and resumed on 1; their logs side by side (benchmarks/dp_compare.py).
#   bash scripts/multi_gpu.sh [tests] [vocab] [scaling] [trainer]      (default: all four)
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
logs="${OUT:-build/multi_gpu}"
mkdir -p "$logs"
steps=("$@")
[[ ${#steps[@]} -gt 0 ]] || steps=(tests vocab scaling trainer)
want() { local s; for s in "${steps[@]}"; do [[ $s == "$1" ]] && return 0; done; return 1; }
export PATH="/usr/local/cuda/bin:$PATH" NCCL_NVLS_ENABLE=0
export LD_LIBRARY_PATH="$PWD/.deps/root/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
gpus=$(nvidia-smi --query-gpu=name --format=csv,noheader | wc -l)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$logs/device.txt"
[[ $gpus -ge 2 ]] || { echo "multi_gpu.sh: $gpus GPU(s); these checks need at least 2"; exit 77; }
cmake --preset device >"$logs/configure.log" 2>&1 || { tail -20 "$logs/configure.log"; exit 1; }
targets=()
want tests && targets+=(test_cuda_multi_gpu)
want vocab && targets+=(kd_bench_vocab_parallel)
{ want scaling || want trainer; } && targets+=(kd_train)
cmake --build --preset device --target "${targets[@]}" >"$logs/build.log" 2>&1 ||
  { grep -E "error" "$logs/build.log" | head -40; exit 1; }
bin=build/device
rc=0
if want tests; then
  "$bin/tests/cuda/test_cuda_multi_gpu" >"$logs/test_cuda_multi_gpu.log" 2>&1 || rc=1
  grep -E "MESSAGE|ERROR|test cases" "$logs/test_cuda_multi_gpu.log"
fi
if want vocab; then
  "$bin/benchmarks/kd_bench_vocab_parallel" | tee "$logs/vocab_parallel.md" || rc=1
fi
if want scaling; then
  for n in 1 2 4 8; do
    [[ $n -le $gpus ]] || break
    if [[ $n -eq 1 ]]; then "$bin/examples/kd_train" bench --steps 20 >"$logs/bench_$n.log" 2>&1 || rc=1
    else "$bin/examples/kd_train" bench --steps 20 --gpus "$n" --run "$logs/bench_run" >"$logs/bench_$n.log" 2>&1 || rc=1; fi
    grep -E "^kd:" "$logs/bench_$n.log"
  done
fi
if want trainer; then
  n=$gpus
  [[ $n -le 8 ]] || n=8
  while (( 16 % n != 0 )); do n=$((n - 1)); done
  k="$bin/examples/kd_train"
  w="$logs/trainer"
  rm -rf "$w" && mkdir -p "$w"
  d="--steps 40 --eval-every 20 --ckpt-every 20 --deterministic"
  "$k" teacher --run "$w/one" --teacher-steps 60 --eval-every 30 --ckpt-every 30 >"$w/runs.log" 2>&1 || rc=1
  cp -r "$w/one" "$w/many" && cp -r "$w/one" "$w/switch"
  "$k" distill --run "$w/one" $d >>"$w/runs.log" 2>&1 || rc=1
  "$k" distill --run "$w/many" $d --gpus "$n" --batch $((16 / n)) >>"$w/runs.log" 2>&1 || rc=1
  "$k" distill --run "$w/switch" $d --gpus "$n" --batch $((16 / n)) --stop-after 20 >>"$w/runs.log" 2>&1
  "$k" distill --run "$w/switch" $d --resume >>"$w/runs.log" 2>&1 || rc=1
  python3 benchmarks/dp_compare.py "1 GPU" "$w/one/distill/log.jsonl" "$n GPUs" "$w/many/distill/log.jsonl" \
    "$n GPUs, resumed on 1" "$w/switch/distill/log.jsonl" | tee "$logs/trainer_compare.md"
fi
exit $rc

#!/usr/bin/env bash
# On the GPU machine: the model layer's GPU work in one call. Steps (any subset, in this order):
#   tests    build and run the model tests (CPU reference, CUDA ops, CUDA attention, whole model)
#   compare  scripts/hf_compare.py: transformers <-> kd checkpoints and logits (tiny + demo presets)
#   bench    training-step tokens/s and MFU: kd vs transformers eager and torch.compile, same run
#            (KD_BENCH_ARCHS="teacher" or "student" limits it to one model)
#   sanitize compute-sanitizer memcheck over the model GPU tests
#   timing   per-op times at the seed geometry (test_cuda_model_ops' skipped timing case)
# Logs and tables go to $OUT (default build-device/).   bash scripts/model_device.sh tests compare bench
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
logs="${OUT:-build-device}"
mkdir -p "$logs"
deps="$PWD/.deps/root/usr"
export LD_LIBRARY_PATH="$deps/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PATH="/usr/local/cuda/bin:$PATH"
steps=("$@")
[[ ${#steps[@]} -gt 0 ]] || steps=(tests compare bench)
want() { local s; for s in "${steps[@]}"; do [[ $s == "$1" ]] && return 0; done; return 1; }

targets=(kd_model)
if want tests || want sanitize || want timing; then
  targets+=(test_model test_model_ops test_cuda_model test_cuda_model_ops test_cuda_model_attention)
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$logs/device.txt"
# No commit here: the device receives the working tree, and its .git need not match it. Quote figures
# with the commit that was sent (git log on the dev machine).
cmake -S . -B build-device -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90 \
  -DCMAKE_PREFIX_PATH="$deps" -DKD_BUILD_TESTS=ON -DKD_BUILD_EXAMPLES=ON -DKD_BUILD_BENCHMARKS=OFF \
  >"$logs/configure.log" 2>&1 || { tail -20 "$logs/configure.log"; exit 1; }
cmake --build build-device --target "${targets[@]}" -j 16 >"$logs/build.log" 2>&1 ||
  { grep -E "error" "$logs/build.log" | head -40; exit 1; }
rc=0
if want tests; then
  for t in build-device/tests/test_model build-device/tests/test_model_ops build-device/tests/cuda/test_cuda_model_ops \
           build-device/tests/cuda/test_cuda_model_attention build-device/tests/cuda/test_cuda_model; do
    "$t" >"$logs/$(basename "$t").log" 2>&1; r=$?
    echo "$(basename "$t"): exit $r  $(grep -E '^\[doctest\] (test cases|assertions)' "$logs/$(basename "$t").log" | tr '\n' ' ')"
    [[ $r -eq 0 ]] || { rc=1; grep -B2 -A8 -E "ERROR|FAILED" "$logs/$(basename "$t").log" | head -60; }
  done
fi
if want timing; then
  build-device/tests/cuda/test_cuda_model_ops -tc="*timing*" --no-skip >"$logs/op_timing.log" 2>&1
  grep -E "us, " "$logs/op_timing.log" | sed 's/^.*MESSAGE: //'
fi
if want sanitize; then
  for t in test_cuda_model_ops test_cuda_model_attention test_cuda_model; do
    compute-sanitizer --tool memcheck --error-exitcode 3 "build-device/tests/cuda/$t" >"$logs/memcheck_$t.log" 2>&1
    echo "memcheck $t: exit $? $(grep -E 'ERROR SUMMARY' "$logs/memcheck_$t.log")"
  done
fi
if want compare; then
  python3 scripts/hf_compare.py --kd-tool build-device/examples/kd_model --workdir build-device/hf_compare \
    >"$logs/hf_compare.log" 2>&1; r=$?
  echo "hf_compare: exit $r"; tail -40 "$logs/hf_compare.log"
  [[ $r -eq 0 ]] || rc=1
fi
if want bench; then
  : >"$logs/model_bench.jsonl"
  for arch in ${KD_BENCH_ARCHS:-teacher student}; do
    build-device/examples/kd_model bench --arch "$arch" --preset seed --batch 8 --seq 1024 --steps 20 --warmup 5 \
      --profile 1 2>"$logs/kd_profile_$arch.md" | tee -a "$logs/model_bench.jsonl"
    cat "$logs/kd_profile_$arch.md"
    [[ -n "${KD_BENCH_KD_ONLY:-}" ]] && continue
    for mode in eager compile; do
      python3 benchmarks/model_bench_torch.py --kd-tool build-device/examples/kd_model --arch "$arch" --preset seed \
        --batch 8 --seq 1024 --steps 20 --warmup 5 --mode "$mode" 2>>"$logs/torch_bench.err" | tail -1 \
        | tee -a "$logs/model_bench.jsonl"
    done
  done
  python3 benchmarks/model_table.py "$logs/model_bench.jsonl" | tee "$logs/model_table.md"
fi
exit $rc

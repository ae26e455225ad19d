#!/usr/bin/env bash
# On the GPU machine: build everything for sm_90, run every test (CPU and GPU), then the GPU tests
# under compute-sanitizer memcheck and racecheck. Logs go to $OUT (or build-device/).
#   bash scripts/device_check.sh
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
logs="${OUT:-build-device}"
mkdir -p "$logs"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$logs/device.txt"
bash scripts/device_build.sh
status=$?
export LD_LIBRARY_PATH="$PWD/.deps/root/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PATH="/usr/local/cuda/bin:$PATH"
gpu_test=build-device/tests/cuda/test_cuda_losses
{
  for t in build-device/tests/cuda/test_cuda_*; do
    [[ -x "$t" ]] || continue
    echo "== memcheck $(basename "$t")"
    compute-sanitizer --tool memcheck --error-exitcode 3 "$t" 2>&1 | tail -n 6
    echo "memcheck $(basename "$t") exit: ${PIPESTATUS[0]}"
  done
  for tool in racecheck synccheck initcheck; do
    echo "== $tool (fp32: divergences, 8-block clusters, vocab map, linear KD, bad input)"
    compute-sanitizer --tool "$tool" --error-exitcode 3 "$gpu_test" \
      -tc="*every divergence*,*bad input*,*across sizes<float>*,*map<float>*,*linear*<float>*" 2>&1 | tail -n 6
    echo "$tool exit: ${PIPESTATUS[0]}"
  done
  echo "== racecheck test_cuda_attention"
  compute-sanitizer --tool racecheck --error-exitcode 3 build-device/tests/cuda/test_cuda_attention 2>&1 | tail -n 6
  echo "racecheck attention exit: ${PIPESTATUS[0]}"
} > "$logs/sanitizer.log" 2>&1
grep -E "exit:|ERROR SUMMARY|RACECHECK SUMMARY" "$logs/sanitizer.log"
exit $status

#!/usr/bin/env bash
# The loss kernels' GPU tests as parallel shards under one time limit, on the GPU machine. ctest runs the
# same executables one after another (`ctest --preset device-gpu`, `device-sanitize`), which takes longer
# than a device call lasts; here the loss matrix is split by test case and divergence, and the shards,
# the other loss tests and compute-sanitizer on the vocab-map and in-place cases share the card at once.
#   bash scripts/gpu_shards.sh [SECONDS] [GROUP...]
# SECONDS (default 300): each shard's limit. A shard still running then is reported as cut, with the
# assertions it passed until then: never as passed.
# GROUP (default: all of them):
#   matrix   test_cuda_loss_matrix: logit_kd by divergence (five shards), ring schedule, linear + KD, linear
#            + KD with the logits on chip and in the storage type, and the rest (cross-entropy, router, feature, attention, bad inputs)
#   losses   test_cuda_losses, test_cuda_kd_inplace
#   sanitize racecheck and memcheck on test_cuda_losses' vocab-map cases, racecheck on test_cuda_kd_inplace
# Builds the test executables first through the device preset (dependencies from .deps:
# scripts/fetch_device_deps.sh). Logs under build/gpu_shards; with $OUT set (the device tool), summary.txt
# and logs_gpu_shards.tgz go there. Exit status: 0 every shard passed, 1 one failed, 2 none failed but one was cut.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
limit=300
if [[ ${1:-} =~ ^[0-9]+$ ]]; then
  limit=$1
  shift
fi
groups=("$@")
[[ ${#groups[@]} -gt 0 ]] || groups=(matrix losses sanitize)
want() { local g; for g in "${groups[@]}"; do [[ $g == "$1" ]] && return 0; done; return 1; }
for g in "${groups[@]}"; do
  [[ $g =~ ^(matrix|losses|sanitize)$ ]] || { echo "gpu_shards.sh: unknown group '$g' (matrix, losses, sanitize)" >&2; exit 2; }
done
logs=build/gpu_shards
source scripts/lib/device_env.sh
device_setup "$logs" summary.txt || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$logs/device.txt" 2>&1 ||
  { echo "gpu_shards.sh: no GPU (nvidia-smi failed)" >&2; exit 2; }
targets=()
want matrix && targets+=(test_cuda_loss_matrix)
{ want losses || want sanitize; } && targets+=(test_cuda_losses test_cuda_kd_inplace)
device_build "$logs" "${targets[@]}" || exit 1

bin=build/device/tests/cuda
shards=()
# shard NAME [VAR=VALUE...] COMMAND...: in the background, under the limit; its status goes to NAME.rc.
shard() {
  local name=$1
  shift
  shards+=("$name")
  ( env "$@" >"$logs/$name.log" 2>&1; echo $? >"$logs/$name.rc" ) &
}
if want matrix; then
  m=$bin/test_cuda_loss_matrix
  for d in forward_kl reverse_kl jsd skew_kl tvd; do
    shard "matrix_$d" KD_MATRIX_ONLY="$d" timeout "$limit" "$m" -tc='logit_kd matrix: CUDA*'
  done
  # doctest splits filters at commas: the test case names with a comma are matched with '?'.
  shard matrix_ring timeout "$limit" "$m" -tc='logit_kd matrix? ring*'
  shard matrix_linear timeout "$limit" "$m" -tc='linear_logit_kd matrix: *'
  shard matrix_linear_on_chip timeout "$limit" "$m" -tc='linear_logit_kd matrix? logits on chip*'
  shard matrix_linear_storage timeout "$limit" "$m" -tc='linear_logit_kd matrix? logits in the storage type*'
  shard matrix_rest timeout "$limit" "$m" -tc='cross_entropy*,load_balance*,feature_loss*,attention_loss*,bad inputs*'
fi
if want losses; then
  shard losses timeout "$limit" "$bin/test_cuda_losses"
  shard kd_inplace timeout "$limit" "$bin/test_cuda_kd_inplace"
fi
if want sanitize; then
  maps='*vocabulary map*,*contiguous maps*'
  shard racecheck_maps timeout "$limit" compute-sanitizer --tool racecheck --error-exitcode 3 "$bin/test_cuda_losses" -tc="$maps"
  shard memcheck_maps timeout "$limit" compute-sanitizer --tool memcheck --error-exitcode 3 "$bin/test_cuda_losses" -tc="$maps"
  shard racecheck_inplace timeout "$limit" compute-sanitizer --tool racecheck --error-exitcode 3 "$bin/test_cuda_kd_inplace"
fi
wait

status=0
summary=$logs/summary.txt
echo "$(cat "$logs/device.txt"), limit ${limit} s a shard" >"$summary"
for s in "${shards[@]}"; do
  rc=$(cat "$logs/$s.rc" 2>/dev/null || echo 1)
  case $rc in
    0) verdict=passed ;;
    124) verdict="cut at ${limit} s"; ((status == 0)) && status=2 ;;
    *) verdict="FAILED (exit $rc)"; status=1 ;;
  esac
  {
    echo "== $s: $verdict"
    grep -E "MESSAGE: .*cases|test cases:|assertions:|SUMMARY" "$logs/$s.log" | sed 's/^.*MESSAGE: //; s/^/  /' | cut -c1-220
    [[ $rc == 0 || $rc == 124 ]] || grep -E "ERROR|FAILED|error" "$logs/$s.log" | head -5 | sed 's/^/  /'
  } >>"$summary"
done
cat "$summary"
exit $status

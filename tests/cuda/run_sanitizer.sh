#!/usr/bin/env bash
# ctest driver: runs one GPU test executable under compute-sanitizer with one tool (memcheck, racecheck,
# synccheck, initcheck). Exit 77 (ctest: Skipped) when there is no GPU or no compute-sanitizer, so a
# machine without them never reports a pass.
set -u
tool=$1 exe=$2
sanitizer=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
[[ -x "$sanitizer" ]] || { echo "SKIPPED: compute-sanitizer not found"; exit 77; }
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 || { echo "SKIPPED: no CUDA device"; exit 77; }
"$sanitizer" --tool "$tool" --error-exitcode 3 "$exe"

#!/usr/bin/env bash
# ctest driver of scripts/hf_compare.py (label hf): kd_model's checkpoints and logits against transformers,
# both ways. Exit 77 (ctest: Skipped) when python3 with torch and transformers, or a GPU, is missing.
#   hf_compare_test.sh <kd_model executable> <work dir> [hf_compare.py arguments]
set -u
tool=$1 work=$2
shift 2
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/../scripts" && pwd)
python3 -c "import torch, transformers; assert torch.cuda.is_available()" >/dev/null 2>&1 ||
  { echo "SKIPPED: needs python3 with torch, transformers and a CUDA device"; exit 77; }
mkdir -p "$work"
PYTHONUNBUFFERED=1 exec python3 "$here/hf_compare.py" --kd-tool "$tool" --workdir "$work" "$@"

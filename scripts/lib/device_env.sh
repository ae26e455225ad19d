# Sourced by the GPU-machine scripts (gpu_shards.sh, ncu_profile.sh, bench.sh, bench_ab.sh).
# device_setup LOGDIR FILE...: a fresh LOGDIR whose named files (and all of it as logs_NAME.tgz) go to $OUT on
# exit (publish_out.sh), CUDA's tools and the .deps libraries on the paths.
# device_build LOGDIR TARGET...: configures the device preset and builds the targets, logs in LOGDIR; on a
# failure prints the errors and returns 1.
device_setup() {
  local logs=$1
  shift
  rm -rf "$logs" && mkdir -p "$logs" || return 1
  source scripts/lib/publish_out.sh
  publish_on_exit "$logs" "$@"
  export PATH="/usr/local/cuda/bin:$PATH"
  export LD_LIBRARY_PATH="$PWD/.deps/root/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
}
device_build() {
  local logs=$1
  shift
  cmake --preset device >"$logs/configure.log" 2>&1 || { tail -20 "$logs/configure.log"; return 1; }
  cmake --build --preset device --target "$@" >"$logs/build.log" 2>&1 ||
    { grep -E "error" "$logs/build.log" | head -20; return 1; }
}

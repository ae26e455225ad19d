# Sourced by the GPU scripts (bench.sh, bench_ab.sh). publish_on_exit DIR FILE...: on every exit, with $OUT
# set, copies the named files of DIR (globs allowed) into $OUT, and all of DIR as $OUT/logs_NAME.tgz (NAME:
# DIR's last part, so that scripts chained in one device call keep each other's). The
# device tool returns at most 8 files from $OUT, so the rest travel in the tarball.
publish_on_exit() {
  _publish_dir=$1
  shift
  _publish_files=("$@")
  trap _publish_out EXIT
}
_publish_out() {
  [[ -n "${OUT:-}" ]] || return 0
  mkdir -p "$OUT" || return 0
  local f
  for f in "${_publish_files[@]}"; do cp "$_publish_dir"/$f "$OUT"/ 2>/dev/null; done
  tar czf "$OUT/logs_$(basename "$_publish_dir").tgz" -C "$_publish_dir" . 2>/dev/null
  return 0
}

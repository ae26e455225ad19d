#!/usr/bin/env python3
"""The table of a same-run A/B (scripts/bench_ab.sh run): ab_base_R.json and ab_head_R.json in DIR, R = 1..
Prints, per benchmark both sides ran: every repetition's time, the speed of head against base (best
against best) and head's bandwidth as a share of the copy bandwidth the same runs measured.
    python3 benchmarks/ab_table.py DIR [BASE_REVISION]
With --small (scripts/bench_ab.sh small): small_base_R.md and small_head_R.md, kd_bench_small_calls'
tables; per op and N, each run's GPU us a call, the speed, and head's time beyond its streaming kernel.
    python3 benchmarks/ab_table.py --small DIR [BASE_REVISION]"""
import glob
import json
import os
import re
import sys


def load(path):
    rows, copy = {}, None
    for b in json.load(open(path))["benchmarks"]:
        name = b["name"].split("/iterations")[0]
        if name.startswith("BM_device_copy"):
            copy = b["bytes_per_second"] / 1e12
        elif "bytes_per_second" in b:
            rows[name] = (b["real_time"], b["bytes_per_second"] / 1e12)
    return rows, copy


def load_small(path):
    """kd_bench_small_calls' rows: (op, N) -> (GPU us a call, GPU us beyond the streaming kernel)."""
    rows = {}
    for line in open(path):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 8 and cells[1].isdigit():
            rows[(cells[0], int(cells[1]))] = (float(cells[3]), float(cells[7]))
    return rows


def collect(d, prefix, ext, loader):
    """{key: {"base" | "head": [each repetition's value]}} from PREFIX_(base|head)_R.EXT in d, and the
    loader's extra results (the copy bandwidth of the JSON runs) in file order."""
    runs, extras = {}, []
    for path in sorted(glob.glob(os.path.join(d, f"{prefix}_*_*.{ext}"))):
        m = re.match(rf"{prefix}_(base|head)_(\d+)\.{ext}$", os.path.basename(path))
        if not m:
            continue
        rows, extra = loader(path)
        if extra:
            extras.append(extra)
        for key, x in rows.items():
            runs.setdefault(key, {}).setdefault(m.group(1), []).append(x)
    return runs, extras


def both_sides(runs):
    """(key, base values, head values) for the keys both sides ran, in order."""
    for key in sorted(runs):
        b, h = runs[key].get("base"), runs[key].get("head")
        if b and h:
            yield key, b, h


def main_small(d, rev):
    runs, _ = collect(d, "small", "md", lambda path: (load_small(path), None))
    if not runs:
        sys.exit(f"no small-call A/B results in {d}")
    print(f"kd_bench_small_calls A/B{f' (base {rev[:12]})' if rev else ''}")
    print("| op | N | base GPU us | head GPU us | head / base speed | head us beyond its streaming kernel |")
    print("|---|---:|---|---|---:|---|")
    for key, b, h in both_sides(runs):
        print(f"| {key[0]} | {key[1]} | {' / '.join(f'{x[0]:.1f}' for x in b)} | {' / '.join(f'{x[0]:.1f}' for x in h)} "
              f"| {min(x[0] for x in b) / min(x[0] for x in h):.2f}x | {' / '.join(f'{x[1]:.1f}' for x in h)} |")


def main():
    if sys.argv[1] == "--small":
        return main_small(sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "")
    d = sys.argv[1]
    runs, copies = collect(d, "ab", "json", load)
    if not runs:
        sys.exit(f"no A/B results in {d}")
    copy = sum(copies) / len(copies) if copies else None
    base = f" (base {sys.argv[2][:12]})" if len(sys.argv) > 2 else ""
    print(f"copy {min(copies):.2f}-{max(copies):.2f} TB/s{base}" if copies else f"no copy baseline{base}")
    print("| benchmark | base ms | head ms | head / base speed | head % of copy |")
    print("|---|---|---|---:|---:|")
    for name, b, h in both_sides(runs):
        share = f"{max(x[1] for x in h) / copy * 100:.0f}%" if copy else "-"
        print(f"| {name[3:]} | {' / '.join(f'{x[0]:.3f}' for x in b)} | {' / '.join(f'{x[0]:.3f}' for x in h)} "
              f"| {min(x[0] for x in b) / min(x[0] for x in h):.2f}x | {share} |")


if __name__ == "__main__":
    main()

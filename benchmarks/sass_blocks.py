#!/usr/bin/env python3
"""Where a kernel's instructions go, by basic block, from Nsight Compute's SASS source counters.

Input: the CSV of `ncu -i REPORT --page source --csv --print-source sass` (a report taken with the
SourceCounters section, e.g. `--set full`); scripts/ncu_profile.sh writes one per profile. A basic block
here is a run of consecutive instructions with the same execution count. Prints each block that holds at
least --min percent of the executed warp instructions or of the stall samples, with its share, its
instructions a thread per entry when --entries gives the entries the launch processed (rows x columns),
and its first and last instruction; then the total.

    python3 benchmarks/sass_blocks.py src_jsd_map.csv --entries $((16384 * 50304))
    python3 benchmarks/sass_blocks.py a.csv b.csv --entries N     # several kernels, one after another

Session 27 (benchmarks/NOTES.md) found this way that the span kernel's expansion ran 20.5 instructions an
entry where an estimate from the source had said 5-8."""
import argparse
import csv
import sys


def load(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    header = next((i for i, r in enumerate(rows) if "Address" in r and "Source" in r), None)
    if header is None:
        sys.exit(f"{path}: no SASS table (expected `ncu --page source --csv --print-source sass` output)")
    cols = rows[header]
    kernel = rows[header - 1][1] if header > 0 and len(rows[header - 1]) > 1 else "?"

    def col(name):
        if name not in cols:
            sys.exit(f"{path}: no column '{name}' (was the report taken with SourceCounters, e.g. --set full?)")
        return cols.index(name)

    i_src, i_exec, i_samp = col("Source"), col("Instructions Executed"), col("Warp Stall Sampling (All Samples)")
    out = []
    for r in rows[header + 1:]:
        if len(r) < len(cols):
            continue
        try:
            out.append((r[i_src].strip(), int(r[i_exec] or 0), int(r[i_samp] or 0)))
        except ValueError:
            continue  # a repeated header or a summary line
    return kernel, out


def blocks(insts):
    start = 0
    for k in range(1, len(insts) + 1):
        if k == len(insts) or insts[k][1] != insts[start][1]:
            yield start, k
            start = k


def report(path, entries, min_share):
    kernel, insts = load(path)
    total = sum(x[1] for x in insts)
    samples = sum(x[2] for x in insts) or 1
    print(f"{path}: {kernel}")
    print(f"  {len(insts)} instructions, {total:,} warp instructions executed, {samples:,} stall samples")
    for s, e in blocks(insts):
        ex = insts[s][1] * (e - s)
        samp = sum(x[2] for x in insts[s:e])
        if total and (ex / total * 100 >= min_share or samp / samples * 100 >= min_share):
            per = f" {ex * 32 / entries:6.2f}/entry" if entries else ""
            print(f"  [{s:5d}, {e:5d}) x{insts[s][1]:<11,d} {ex / total * 100:5.1f}% exec {samp / samples * 100:5.1f}% "
                  f"stalls{per}  {insts[s][0][:44]} .. {insts[e - 1][0][:36]}")
    if entries:
        print(f"  total: {total * 32 / entries:.1f} thread instructions an entry")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv", nargs="+", help="ncu --page source --csv --print-source sass output")
    ap.add_argument("--entries", type=int, default=0, help="entries the launch processed (rows x columns)")
    ap.add_argument("--min", type=float, default=0.5, help="smallest share (percent) of a block shown")
    a = ap.parse_args()
    for path in a.csv:
        report(path, a.entries, a.min)


if __name__ == "__main__":
    main()

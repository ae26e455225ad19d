#!/usr/bin/env python3
"""Merges kd's Google Benchmark JSON and the PyTorch baseline JSON lines (same run, same card) into the
side-by-side markdown table of benchmarks/RESULTS.md. Usage: make_table.py KD_JSON TORCH_JSONL"""
import json
import sys


def main(kd_path, torch_path):
    kd = json.load(open(kd_path))
    device = kd.get("context", {}).get("device", "?")
    rows = {}
    sweep = []
    grid = {}
    copy_tbs = None
    for b in kd["benchmarks"]:
        name = b["name"]
        if name.startswith("BM_device_copy"):
            copy_tbs = b["bytes_per_second"] / 1e12
            continue
        if name.startswith("BM_sweep"):
            sweep.append(b)
            continue
        if name.startswith("BM_grid_"):
            parts = name.split("/")
            grid[(parts[0][len("BM_grid_"):], int(parts[1]), int(parts[2]), int(parts[3]))] = b
            continue
        parts = name.split("/")
        op = parts[0]
        n, v = int(parts[1]), int(parts[2])
        rows[(op, n, v)] = b
    torch_rows = {}
    for line in open(torch_path):
        line = line.strip()
        if line.startswith("{"):
            r = json.loads(line)
            torch_rows[(r["op"], r["n"], r["v"])] = r
            torch_rows[(r["op"], r["n"], r["v"], r.get("d", 52))] = r
    print(f"Card: {device}; measured device-to-device copy: {copy_tbs:.2f} TB/s (read + write)\n")
    if rows:
        print_main(rows, torch_rows, copy_tbs)
    if grid:
        print_grid(grid, torch_rows, copy_tbs)
    if sweep:
        print_sweep(sweep, copy_tbs)


def print_main(rows, torch_rows, copy_tbs):
    print("| op | N x V | eager ms | compile ms | kd ms | kd vs compile | kd TB/s (min bytes) | % of copy | eager extra MB | compile extra MB | kd extra MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    names = {"BM_logit_kd_bf16<kd::forward_kl>": "kd_forward_kl", "BM_cross_entropy_bf16": "cross_entropy",
             "BM_linear_kd_bf16<kd::forward_kl>": "linear_kd"}
    for (op, n, v), b in sorted(rows.items()):
        kd_ms = b["real_time"] if b.get("time_unit") == "ms" else b["real_time"] / 1e6
        tbs = b["bytes_per_second"] / 1e12
        t = torch_rows.get((names.get(op, ""), n, v), {})
        eager, comp = t.get("eager_ms"), t.get("compile_ms")
        speed = f"{comp / kd_ms:.2f}x" if comp else "-"
        fmt = lambda x: f"{x:.3f}" if isinstance(x, float) else "-"
        print(f"| {op.replace('BM_', '')} | {n} x {v} | {fmt(eager)} | {fmt(comp)} | {kd_ms:.3f} | {speed} | {tbs:.2f} | "
              f"{100 * tbs / copy_tbs:.0f}% | {fmt(t.get('eager_extra_MB'))} | {fmt(t.get('compile_extra_MB'))} | "
              f"{b.get('extra_MB', float('nan')):.1f} |")


def print_sweep(sweep, copy_tbs):
    print("\nSlice-budget sweep (same run; the budget sets the cluster size, see kd/loss/logit_kd.cuh):\n")
    print("| kernel | N x V | budget KiB | ms | TB/s | % of copy |")
    print("|---|---|---|---|---|---|")
    for b in sweep:
        parts = b["name"].split("/")
        tbs = b["bytes_per_second"] / 1e12
        print(f"| {parts[0].replace('BM_sweep_', '')} | {parts[1]} x {parts[2]} | {parts[3]} | {b['real_time']:.3f} | "
              f"{tbs:.2f} | {100 * tbs / copy_tbs:.0f}% |")


def print_grid(grid, torch_rows, copy_tbs):
    """Issue 12's grid: per op and shape, eager / torch.compile / kd, kd's bandwidth and its share of copy."""
    fmt = lambda x: f"{x:.3f}" if isinstance(x, float) else "-"
    print("\nGrid (bf16, T = 2, forward + backward; linear rows: third size is the hidden width d):\n")
    print("| op | N x V | eager ms | compile ms | kd ms | kd vs eager | kd vs compile | kd TB/s (min bytes) | % of copy | compile extra MB | kd extra MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    order = ["forward_kl", "reverse_kl", "jsd", "skew_kl", "tvd", "cross_entropy", "linear_forward_kl", "linear_jsd"]
    for key in sorted(grid, key=lambda k: (order.index(k[0]) if k[0] in order else 99, k[3], k[2], k[1])):
        op, n, v, third = key
        b = grid[key]
        kd_ms = b["real_time"]
        tbs = b["bytes_per_second"] / 1e12
        t = torch_rows.get((op, n, v, third), {})
        eager, comp = t.get("eager_ms"), t.get("compile_ms")
        shape = f"{n} x {v}" + (f" x {third}" if op.startswith("linear") else "")
        vs = lambda x: f"{x / kd_ms:.2f}x" if isinstance(x, float) else (t.get("error", "-") if t else "-")
        print(f"| {op} | {shape} | {fmt(eager)} | {fmt(comp)} | {kd_ms:.3f} | {vs(eager)} | {vs(comp)} | {tbs:.2f} | "
              f"{100 * tbs / copy_tbs:.0f}% | {fmt(t.get('compile_extra_MB'))} | {b.get('extra_MB', float('nan')):.1f} |")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

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
    grid, gemms, chunks, onchip, storage, headmap = {}, {}, {}, {}, {}, {}
    copy_tbs = None
    for b in kd["benchmarks"]:
        name = b["name"]
        if name.startswith("BM_device_copy"):
            copy_tbs = b["bytes_per_second"] / 1e12
            continue
        if name.startswith("BM_sweep"):
            sweep.append(b)
            continue
        prefix = next((p for p in ("BM_grid_", "BM_gemms_", "BM_chunks_", "BM_onchip_", "BM_storage_", "BM_headmap_")
                       if name.startswith(p)), None)
        if prefix:  # key: the op and the benchmark's numeric arguments
            parts = name.split("/")
            key = (parts[0][len(prefix):],) + tuple(int(x) for x in parts[1:] if x.lstrip("-").isdigit())
            {"BM_grid_": grid, "BM_gemms_": gemms, "BM_chunks_": chunks, "BM_onchip_": onchip,
             "BM_storage_": storage, "BM_headmap_": headmap}[prefix][key] = b
            continue
        parts = name.split("/")
        op = parts[0]
        n, v = int(parts[1]), int(parts[2])
        rows[(op, n, v) + tuple(int(x) for x in parts[3:] if x.isdigit())] = b
    torch_rows = {}
    for line in open(torch_path):
        line = line.strip()
        if line.startswith("{"):
            r = json.loads(line)
            torch_rows[(r["op"], r["n"], r["v"])] = r
            torch_rows[(r["op"], r["n"], r["v"], r.get("d", 0))] = r  # elementwise ops: the grid's budget 0
    print(f"Card: {device}; measured device-to-device copy: {copy_tbs:.2f} TB/s (read + write)\n")
    if rows:
        print_main(rows, torch_rows, copy_tbs)
    if grid:
        print_grid(grid, torch_rows, copy_tbs, gemms, onchip, storage)
    if chunks:
        print_chunks(chunks)
    if headmap:
        print_headmap(headmap)
    if sweep:
        print_sweep(sweep, copy_tbs)


def print_main(rows, torch_rows, copy_tbs):
    print("| op | N x V | eager ms | compile ms | kd ms | kd vs compile | kd TB/s (min bytes) | % of copy | eager extra MB | compile extra MB | kd extra MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    names = {"BM_logit_kd_bf16<kd::forward_kl>": "kd_forward_kl", "BM_cross_entropy_bf16": "cross_entropy",
             "BM_linear_kd_bf16<kd::forward_kl>": "linear_kd"}
    for (op, n, v, *rest), b in sorted(rows.items()):
        kd_ms = b["real_time"] if b.get("time_unit") == "ms" else b["real_time"] / 1e6
        tbs = b["bytes_per_second"] / 1e12
        t = torch_rows.get((names.get(op, ""), n, v), {})
        eager, comp = t.get("eager_ms"), t.get("compile_ms")
        speed = f"{comp / kd_ms:.2f}x" if comp else "-"
        fmt = lambda x: f"{x:.3f}" if isinstance(x, float) else "-"
        shape = f"{n} x {v}"
        if "_map_" in op:  # range: N, map kind, in place
            shape = f"{n}, {'contiguous' if v else 'csr'} map" + (", in place" if rest and rest[0] else "")
        print(f"| {op.replace('BM_', '')} | {shape} | {fmt(eager)} | {fmt(comp)} | {kd_ms:.3f} | {speed} | {tbs:.2f} | "
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


def table_head(intro, cols):
    """A table's introduction (a paragraph), its header row and separator."""
    print("\n" + intro + "\n")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))


def ms_of(b):
    return b["real_time"] if b.get("time_unit") == "ms" else b["real_time"] / 1e6


def print_grid(grid, torch_rows, copy_tbs, gemms, onchip=None, storage=None):
    """Issue 12's grid: per op and shape, eager / torch.compile / kd, kd's bandwidth and its share of copy;
    fp32 and vocab-map rows in tables of their own; linear + KD beside the time of its GEMMs alone."""
    fmt = lambda x: f"{x:.3f}" if isinstance(x, float) else "-"
    order = ["forward_kl", "reverse_kl", "jsd", "skew_kl", "tvd", "cross_entropy"]
    base = lambda op: op.removesuffix("_f32").removesuffix("_map")
    sort_key = lambda k: (order.index(base(k[0])) if base(k[0]) in order else 99, k[0], k[3], k[2], k[1])
    elementwise = [k for k in grid if not k[0].startswith("linear") and not k[0].endswith("_map")]
    for suffix, title in (("", "bf16"), ("_f32", "fp32")):
        keys = sorted((k for k in elementwise if k[0].endswith("_f32") == (suffix == "_f32")), key=sort_key)
        if not keys:
            continue
        table_head(f"Grid ({title}, T = 2, forward + backward):",
                   ["op", "N x V", "eager ms", "compile ms", "kd ms", "kd vs eager", "kd vs compile",
                    "kd TB/s (min bytes)", "% of copy", "compile extra MB", "kd extra MB"])
        for key in keys:
            op, n, v, third = key
            b = grid[key]
            kd_ms = ms_of(b)
            tbs = b["bytes_per_second"] / 1e12
            t = torch_rows.get((op, n, v, third), {})
            eager, comp = t.get("eager_ms"), t.get("compile_ms")
            vs = lambda x: f"{x / kd_ms:.2f}x" if isinstance(x, float) else (t.get("error", "-") if t else "-")
            print(f"| {op} | {n} x {v} | {fmt(eager)} | {fmt(comp)} | {kd_ms:.3f} | {vs(eager)} | {vs(comp)} | {tbs:.2f} | "
                  f"{100 * tbs / copy_tbs:.0f}% | {fmt(t.get('compile_extra_MB'))} | {b.get('extra_MB', float('nan')):.1f} |")
    maps = sorted((k for k in grid if k[0].endswith("_map")), key=sort_key)
    if maps:
        table_head("With a vocab map (bf16, T = 2; student 50,304 columns; csr: a 151,936-column teacher through a\n"
                   "Qwen3 -> GPT-2-shaped map; contiguous: a compact 42,304-column teacher head; csr compacted: the\n"
                   "csr map's teacher columns in the student's order, vocab_map::compact_teacher). Minimum bytes: the\n"
                   "mapped teacher columns and the student row read once, the gradient written once.",
                   ["op", "N", "map", "kd ms", "kd TB/s (min bytes)", "% of copy", "kd extra MB"])
        for key in maps:
            op, n, kind, _ = key
            b = grid[key]
            tbs = b["bytes_per_second"] / 1e12
            print(f"| {op.removesuffix('_map')} | {n} | {('csr', 'contiguous', 'csr compacted')[kind]} | {ms_of(b):.3f} | {tbs:.2f} | "
                  f"{100 * tbs / copy_tbs:.0f}% | {b.get('extra_MB', float('nan')):.1f} |")
    linear = sorted((k for k in grid if k[0].startswith("linear")), key=lambda k: (k[0], k[3], k[2], k[1]))
    if linear:
        table_head("Linear + KD (bf16, T = 2, chunk 2048 rows; N x V x d; teacher_head: the teacher as 1024-wide hidden\n"
                   "states and a head). GEMMs alone: the same cuBLAS calls without the loss kernel (the chunk design's\n"
                   "floor); x 4/3: the floor of a design that never stores the logits and recomputes them once.\n"
                   "bf16 logits: linear_kd_logits::storage (the chunk logits rounded to bf16 as PyTorch's are, the\n"
                   "gradient written over them; the default chunk: the scratch of 2048 fp32-logit rows).\n"
                   "On chip: linear_kd_path::on_chip (no logits in memory), same run.",
                   ["op", "N x V x d", "eager ms", "compile ms", "kd ms", "kd vs eager", "kd vs compile",
                    "GEMMs alone ms", "GEMMs x 4/3 vs compile", "kd TFLOP/s", "compile extra MB", "kd extra MB",
                    "bf16 logits ms", "bf16 logits vs compile", "bf16 logits extra MB",
                    "on chip ms", "on chip vs compile", "on chip extra MB"])
        for key in linear:
            op, n, v, d, _ = key  # the last argument: chunk rows
            b = grid[key]
            kd_ms = ms_of(b)
            t = torch_rows.get((op, n, v, d), {})
            eager, comp = t.get("eager_ms"), t.get("compile_ms")
            vs = lambda x: f"{x / kd_ms:.2f}x" if isinstance(x, float) else (t.get("error", "-") if t else "-")
            g = gemms.get(key)
            g_ms = ms_of(g) if g else None
            floor = f"{comp / (g_ms * 4 / 3):.2f}x" if g_ms and isinstance(comp, float) else "-"
            tf = b.get("TFLOPs")
            tf = f"{tf:.0f}" if isinstance(tf, float) else "-"  # a rate counter: TFLOP/s already
            st = (storage or {}).get((op, n, v, d, -1)) or (storage or {}).get(key)  # the default chunk, or 2048
            st_ms = ms_of(st) if st else None
            st_vs = f"{comp / st_ms:.2f}x" if st_ms and isinstance(comp, float) else "-"
            st_mb = f"{st.get('extra_MB', float('nan')):.1f}" if st else "-"
            oc = (onchip or {}).get((op, n, v, d, 0))
            oc_ms = ms_of(oc) if oc else None
            oc_vs = f"{comp / oc_ms:.2f}x" if oc_ms and isinstance(comp, float) else "-"
            oc_mb = f"{oc.get('extra_MB', float('nan')):.1f}" if oc else "-"
            print(f"| {op} | {n} x {v} x {d} | {fmt(eager)} | {fmt(comp)} | {kd_ms:.3f} | {vs(eager)} | {vs(comp)} | "
                  f"{fmt(g_ms)} | {floor} | {tf} | {fmt(t.get('compile_extra_MB'))} | {b.get('extra_MB', float('nan')):.1f} | "
                  f"{fmt(st_ms)} | {st_vs} | {st_mb} | {fmt(oc_ms)} | {oc_vs} | {oc_mb} |")


def print_chunks(chunks):
    table_head("Linear + KD's chunk rows against its time and memory (bf16, T = 2; storage_: the logits in bf16):",
               ["op", "N x V x d", "chunk rows", "kd ms", "kd extra MB"])
    for key in sorted(chunks, key=lambda k: (k[0], k[4] if k[4] > 0 else 1 << 40)):  # the default (-1) last
        op, n, v, d, c = key
        b = chunks[key]
        rows = "default" if c < 0 else c
        print(f"| {op} | {n} x {v} x {d} | {rows} | {ms_of(b):.3f} | {b.get('extra_MB', float('nan')):.1f} |")


def print_headmap(headmap):
    table_head("Linear + KD with the teacher as hidden states and a head through the general map (bf16, T = 2,\n"
               "the default chunk): the full 151,936-row teacher head (compact_teacher_head = false), the same\n"
               "head compacted by linear_kd itself (the default: a gather per call) and the head given compact\n"
               "(vocab_map::compact_teacher: the 43,280 mapped rows in the student's order), same run.",
               ["chunk logits", "N x V x d", "full head ms", "auto ms", "given compact ms", "auto / full speed",
                "compact / full speed", "extra MB: full / auto / compact"])
    fmt = lambda b: f"{ms_of(b):.3f}" if b else "-"
    mb = lambda b: f"{b.get('extra_MB', float('nan')):.0f}" if b else "-"
    for logits in ("", "storage_"):
        for key in sorted(k for k in headmap if k[0] == logits + "full"):
            full = headmap[key]
            auto, compact = (headmap.get((logits + kind,) + key[1:]) for kind in ("auto", "compact"))
            speed = lambda b: f"{ms_of(full) / ms_of(b):.2f}x" if b else "-"
            n, v, d = key[1:4]
            print(f"| {'bf16' if logits else 'fp32'} | {n} x {v} x {d} | {fmt(full)} | {fmt(auto)} | {fmt(compact)} | "
                  f"{speed(auto)} | {speed(compact)} | {mb(full)} / {mb(auto)} / {mb(compact)} |")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

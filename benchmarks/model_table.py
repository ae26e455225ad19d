#!/usr/bin/env python3
"""Side-by-side markdown table of whole-model training-step benchmarks: `kd_model bench` (impl "kd") and
benchmarks/model_bench_torch.py (impl "torch-eager" / "torch-compile"), all in one JSON-line schema.

  model_table.py [FILE ...]      (no FILE or '-': stdin)

Lines that are not JSON objects are skipped (logs may be interleaved). One row per (arch, preset, batch,
seq): ms per step, tokens/s, MFU, peak GB for kd / eager / compile, and kd's speedup (torch ms / kd ms). When
a torch mode was run with several experts implementations, the fastest is shown and named; every run is
listed in a second table. Rows from different GPUs are not mixed: the GPU is part of the key when known.
"""
import json
import sys

IMPLS = ("kd", "torch-eager", "torch-compile")


def read_rows(paths):
    rows = []
    for path in paths or ["-"]:
        f = sys.stdin if path == "-" else open(path)
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line.startswith("{"):
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"{path}:{n}: not valid JSON ({e}): {line[:120]}")
            missing = [k for k in ("impl", "arch", "preset", "batch", "seq", "ms_per_step") if k not in r]
            if missing:
                raise SystemExit(f"{path}:{n}: missing keys {missing}: {line[:120]}")
            if r["impl"] not in IMPLS:
                raise SystemExit(f"{path}:{n}: unknown impl {r['impl']!r} (expected one of {IMPLS})")
            rows.append(r)
        if f is not sys.stdin:
            f.close()
    return rows


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def main(argv):
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    rows = read_rows(argv)
    if not rows:
        raise SystemExit("model_table.py: no benchmark rows in the input")
    groups = {}
    for r in rows:
        key = (r["arch"], r["preset"], int(r["batch"]), int(r["seq"]))
        groups.setdefault(key, {}).setdefault(r["impl"], []).append(r)
    gpus = sorted({r["gpu"] for r in rows if r.get("gpu")})
    if len(gpus) > 1:
        print(f"warning: rows come from several GPUs {gpus}; compare only within one card\n", file=sys.stderr)
    if gpus:
        print(f"GPU: {', '.join(gpus)}\n")
    print("| arch | preset | batch x seq | kd ms | eager ms | compile ms | kd tok/s | eager tok/s | compile tok/s | "
          "kd MFU | eager MFU | compile MFU | kd GB | eager GB | compile GB | kd vs eager | kd vs compile |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    variants = []
    for key in sorted(groups):
        best = {}
        for impl, rs in groups[key].items():
            best[impl] = min(rs, key=lambda r: r["ms_per_step"])
            if len(rs) > 1 or impl != "kd":
                variants += [(key, impl, r) for r in rs]
        get = lambda impl, k: best[impl].get(k) if impl in best else None
        cells = []
        for k, spec in (("ms_per_step", ".1f"), ("tokens_per_s", ",.0f"), ("mfu", ".1%"), ("peak_mem_gb", ".1f")):
            for impl in IMPLS:
                v = get(impl, k)
                s = fmt(v, spec)
                if k == "ms_per_step" and len({r.get("experts_impl") for r in groups[key].get(impl, [])}) > 1:
                    s += f" ({best[impl].get('experts_impl')})"
                cells.append(s)
        kd_ms = get("kd", "ms_per_step")
        speed = [f"{get(t, 'ms_per_step') / kd_ms:.2f}x" if kd_ms and get(t, "ms_per_step") else "-"
                 for t in ("torch-eager", "torch-compile")]
        arch, preset, b, t = key
        print(f"| {arch} | {preset} | {b} x {t} | " + " | ".join(cells) + " | " + " | ".join(speed) + " |")
    if any(r.get("experts_impl") not in (None, "") for _, _, r in variants):
        print("\nEvery torch run:\n")
        print("| arch | preset | batch x seq | impl | experts impl | ms | tok/s | MFU | peak GB | loss |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for (arch, preset, b, t), impl, r in variants:
            print(f"| {arch} | {preset} | {b} x {t} | {impl} | {r.get('experts_impl', '-')} | {r['ms_per_step']:.1f} | "
                  f"{fmt(r.get('tokens_per_s'), ',.0f')} | {fmt(r.get('mfu'), '.1%')} | "
                  f"{fmt(r.get('peak_mem_gb'), '.1f')} | {fmt(r.get('loss'), '.4f')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

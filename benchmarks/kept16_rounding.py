#!/usr/bin/env python3
"""JSD / skew KL gradients with w kept in fp16 (kd/loss/logit_kd_math.cuh, kept16), emulated against fp64.

Per row: the per-row kernel's float path (dt, ds, p, q, m, log2 m and w in float32: what the gradient
sweep recomputes), the same w kept in fp16 with C summed from the kept values ("plain16"), and kept as
h = w - s with s = w at each thread's largest student logit ("shifted16", what the kernel does: 256
threads a block over 8-element vectors, 8,000-entry blocks). Every gradient is rounded to bf16 and
compared with the fp64 gradient, ||g - g_ref|| / ||g_ref|| per row. Needs numpy.
  python3 benchmarks/kept16_rounding.py [rows per regime]
"""
import sys

import numpy as np

rng = np.random.default_rng(7)
f32 = np.float32


def half(x):
    return np.clip(x, -65504, 65504).astype(np.float16).astype(np.float64)


def bf16(x):
    b = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    b = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16
    return b.astype(np.uint32).view(np.float32).astype(np.float64)


def lse2(y):
    m = y.max()
    return m + np.log2(np.exp2(y - m).sum())


def w_of(dt, ds, a, skew, t):
    p, q = np.exp2(dt), np.exp2(ds)
    a1 = t(1 - a)
    m = t(a) * p + a1 * q
    normal = m >= 1.17549435e-38
    ms = np.where(normal, m, 1)
    with np.errstate(all="ignore"):
        if skew:
            w = np.where(normal, a1 * (p - q) / ms, t(-1))
        else:
            w = np.where(normal, a1 * (ds - np.log2(ms)), t(0))
    return q.astype(np.float64), w.astype(t).astype(np.float64)


def threads(v, chunk=8000, nthreads=256):
    j = np.arange(v)
    return (j // chunk) * nthreads + ((j % chunk) // 8) % nthreads


def row(zt, zs, temp, a, skew):
    yt, ys = zt / temp * np.log2(np.e), zs / temp * np.log2(np.e)
    q, w = w_of(yt - lse2(yt), ys - lse2(ys), a, skew, np.float64)
    g = q * (w - (q * w).sum())
    y32t, y32s = yt.astype(f32), ys.astype(f32)
    q32, w32 = w_of(y32t - f32(lse2(yt)), y32s - f32(lse2(ys)), a, skew, f32)
    th = threads(len(zt))
    order = np.lexsort((-ys, th))
    _, first = np.unique(th[order], return_index=True)
    arg = order[first]
    s = np.zeros(th.max() + 1)
    s[th[arg]] = w32[arg]
    out = []
    for wk in (w32, half(w32), s[th] + half(w32 - s[th])):
        gk = q32 * (wk - (q32 * wk).sum())
        out.append(np.linalg.norm(bf16(gk) - g) / np.linalg.norm(g))
    return out


def main():
    rows = int(sys.argv[1]) if len(sys.argv) > 1 else 12
    regimes = [  # teacher / student logit stddev, T, a, skew KL?
        (2, 1, 2, 0.3, False), (2, 1, 0.5, 0.3, False), (2, 1, 2, 0.5, True), (3, 3, 1, 0.5, True),
        (6, 6, 1, 0.99, False), (8, 0.5, 0.5, 0.99, False), (8, 0.5, 1, 0.99, True), (10, 10, 1, 0.99, False),
        (20, 20, 1, 0.1, True), (20, 20, 1, 0.99, False),
    ]
    print("| teacher sd | student sd | T | a | divergence | float32 (recomputed) | plain16 | shifted16 |")
    print("|---|---|---|---|---|---|---|---|")
    for ts, ss, temp, a, skew in regimes:
        worst = [0.0, 0.0, 0.0]
        for _ in range(rows):
            v = int(rng.choice([32000, 50304]))
            zt = bf16(rng.normal(size=v) * ts)
            zs = bf16(rng.normal(size=v) * ss)
            worst = [max(x, y) for x, y in zip(worst, row(zt, zs, temp, a, skew))]
        print(f"| {ts} | {ss} | {temp} | {a} | {'skew KL' if skew else 'JSD'} | "
              + " | ".join(f"{x:.3g}" for x in worst) + " |")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""PyTorch baselines for kd's fused kernels: KD forward KL (T=2) forward+backward on bf16 logits, eager
and torch.compile, median of 20 CUDA-event timings after warm-up, plus peak extra memory (peak
allocated during the call minus what was allocated before it). Prints one JSON object per line."""
import json
import sys

import torch


def kd_forward_kl(s, t, temperature=2.0):
    p = torch.softmax(t.float() / temperature, dim=-1)
    logq = torch.log_softmax(s.float() / temperature, dim=-1)
    logp = torch.log_softmax(t.float() / temperature, dim=-1)
    return (p * (logp - logq)).sum(-1).mean() * temperature * temperature


def linear_kd(h, w, t, temperature=2.0):
    return kd_forward_kl(h @ w.t(), t, temperature)


# The divergences of kd/loss/divergence.hpp at kd's defaults (jsd beta 0.5, skew_kl alpha 0.1), token mean, T^2.
def _logs(s, t, temperature):
    return torch.log_softmax(t.float() / temperature, dim=-1), torch.log_softmax(s.float() / temperature, dim=-1)


def reverse_kl(s, t, temperature=2.0):
    logp, logq = _logs(s, t, temperature)
    return (logq.exp() * (logq - logp)).sum(-1).mean() * temperature * temperature


def jsd(s, t, temperature=2.0, beta=0.5):
    logp, logq = _logs(s, t, temperature)
    p, q = logp.exp(), logq.exp()
    logm = torch.log((beta * p + (1 - beta) * q).clamp_min(1e-38))
    div = beta * (p * (logp - logm)).sum(-1) + (1 - beta) * (q * (logq - logm)).sum(-1)
    return div.mean() * temperature * temperature


def skew_kl(s, t, temperature=2.0, alpha=0.1):
    logp, logq = _logs(s, t, temperature)
    p = logp.exp()
    logm = torch.log((alpha * p + (1 - alpha) * logq.exp()).clamp_min(1e-38))
    return (p * (logp - logm)).sum(-1).mean() * temperature * temperature


def tvd(s, t, temperature=2.0):
    logp, logq = _logs(s, t, temperature)
    return 0.5 * (logp.exp() - logq.exp()).abs().sum(-1).mean() * temperature * temperature


def linear_jsd(h, w, t, temperature=2.0):
    return jsd(h @ w.t(), t, temperature)


def cross_entropy(s, y):
    return torch.nn.functional.cross_entropy(s.float(), y)


def measure(fn, make_inputs, reps=20, warmup=3):
    for _ in range(warmup):
        args = make_inputs()
        fn(*args).backward()
    torch.cuda.synchronize()
    times = []
    peak_extra = 0
    for _ in range(reps):
        args = make_inputs()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        fn(*args).backward()
        e1.record()
        torch.cuda.synchronize()
        times.append(e0.elapsed_time(e1))
        peak_extra = max(peak_extra, torch.cuda.max_memory_allocated() - base)
        del args
    times.sort()
    return times[len(times) // 2], peak_extra / 1e6


def guarded(fn, make_inputs, reps):
    """measure(), with an out-of-memory case reported instead of ending the run."""
    try:
        return measure(fn, make_inputs, reps)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None, None


def linear_teacher_head(h, w, th, tw, temperature=2.0):
    """The teacher given as its last hidden states and LM head: its logits formed here, without gradient."""
    with torch.no_grad():
        t = th @ tw.t()
    return kd_forward_kl(h @ w.t(), t, temperature)


def grid(parts=("bf16", "fp32", "linear"), only=None):
    """Issue 12's grid, the same shapes as kd_bench_cuda's BM_grid cases: smallest first, one JSON line per
    case (flushed), so a run cut short keeps what it measured. torch.compile(dynamic=True): one compile
    per op serves every shape, as the default's automatic dynamic shapes do after the second shape.
    parts: bf16 (every divergence and cross-entropy over the full grid), fp32 (its subset in fp32: op
    names end in _f32), linear (linear + KD with the teacher as logits or as hidden states + head, and
    Liger's fused-linear JSD shape). only: the divergences / cross_entropy to run (all by default), and,
    where it names any, the linear ops (linear_forward_kl, linear_teacher_head, linear_jsd)."""
    torch.manual_seed(0)
    dev = torch.device("cuda")
    ops = {"forward_kl": lambda s, t: kd_forward_kl(s, t), "reverse_kl": reverse_kl, "jsd": jsd,
           "skew_kl": skew_kl, "tvd": tvd, "cross_entropy": None}
    if only:
        ops = {k: f for k, f in ops.items() if k in only}
    if "bf16" in parts or "fp32" in parts:
        compiled = {k: torch.compile(f, dynamic=True) for k, f in ops.items() if f is not None}
        compiled_ce = torch.compile(cross_entropy, dynamic=True)
    shapes = []
    if "bf16" in parts:
        shapes += [(n, v, torch.bfloat16, "") for n in (2048, 8192, 16384) for v in (32000, 50304, 128256, 151936)]
    if "fp32" in parts:
        shapes += [(n, v, torch.float32, "_f32") for v in (32000, 151936) for n in (2048, 16384)]
    for n, v, dtype, suffix in shapes:
        t = torch.randn(n, v, device=dev, dtype=dtype) * 2
        s0 = torch.randn(n, v, device=dev, dtype=dtype)
        y = torch.randint(0, v, (n,), device=dev)
        for op, fn in ops.items():
            if op == "cross_entropy":
                make = lambda: (s0.detach().clone().requires_grad_(True), y)
                eager_fn, comp_fn = cross_entropy, compiled_ce
            else:
                make = lambda: (s0.detach().clone().requires_grad_(True), t)
                eager_fn, comp_fn = fn, compiled[op]
            row = {"op": op + suffix, "n": n, "v": v}
            row["eager_ms"], row["eager_extra_MB"] = guarded(eager_fn, make, 10)
            row["compile_ms"], row["compile_extra_MB"] = guarded(comp_fn, make, 10)
            if row["eager_ms"] is None or row["compile_ms"] is None:
                row["error"] = "OOM"
            print(json.dumps(row), flush=True)
        del t, s0, y
        torch.cuda.empty_cache()
    if "linear" not in parts:
        return
    lin = {"linear_forward_kl": (linear_kd, torch.compile(linear_kd, dynamic=True)),
           "linear_teacher_head": (linear_teacher_head, torch.compile(linear_teacher_head, dynamic=True)),
           "linear_jsd": (linear_jsd, torch.compile(linear_jsd, dynamic=True))}
    cases = [(op, n, v, d) for op in ("linear_forward_kl", "linear_teacher_head") for d in (576, 2048)
             for v in (50304, 128256, 151936) for n in (8192, 16384)]
    cases.append(("linear_jsd", 8192, 128256, 4096))
    if only and any(op in only for op in lin):  # --ops naming linear ops picks among them too
        cases = [c for c in cases if c[0] in only]
    dt = 1024  # the seed teacher's hidden width, as kd_bench_cuda's teacher-head cases
    for op, n, v, d in cases:
        h0 = torch.randn(n, d, device=dev, dtype=torch.bfloat16)
        w0 = torch.randn(v, d, device=dev, dtype=torch.bfloat16) * 0.04
        if op == "linear_teacher_head":
            th = torch.randn(n, dt, device=dev, dtype=torch.bfloat16)
            tw = torch.randn(v, dt, device=dev, dtype=torch.bfloat16) * 0.06
            make = lambda: (h0.detach().clone().requires_grad_(True), w0.detach().clone().requires_grad_(True), th, tw)
        else:
            t = torch.randn(n, v, device=dev, dtype=torch.bfloat16) * 2
            make = lambda: (h0.detach().clone().requires_grad_(True), w0.detach().clone().requires_grad_(True), t)
        row = {"op": op, "n": n, "v": v, "d": d}
        row["eager_ms"], row["eager_extra_MB"] = guarded(lin[op][0], make, 5)
        row["compile_ms"], row["compile_extra_MB"] = guarded(lin[op][1], make, 5)
        if row["eager_ms"] is None or row["compile_ms"] is None:
            row["error"] = "OOM"
        print(json.dumps(row), flush=True)
        del h0, w0
        t = th = tw = None
        torch.cuda.empty_cache()


def main():
    if "--grid" in sys.argv:
        # --grid [bf16,fp32,linear] [--ops jsd,skew_kl]: the parts and divergences to run (all by default)
        i = sys.argv.index("--grid")
        wanted = sys.argv[i + 1].split(",") if i + 1 < len(sys.argv) and not sys.argv[i + 1].startswith("-") else None
        only = sys.argv[sys.argv.index("--ops") + 1].split(",") if "--ops" in sys.argv else None
        return grid(tuple(wanted) if wanted else ("bf16", "fp32", "linear"), only)
    torch.manual_seed(0)
    dev = torch.device("cuda")
    compiled_kd = torch.compile(kd_forward_kl)
    compiled_ce = torch.compile(cross_entropy)
    compiled_lin = torch.compile(linear_kd)
    shapes = [(4096, 50304), (16384, 50304), (4096, 151936), (16384, 151936)]
    for n, v in shapes:
        t = torch.randn(n, v, device=dev, dtype=torch.bfloat16) * 2
        s0 = torch.randn(n, v, device=dev, dtype=torch.bfloat16)

        def inputs():
            s = s0.detach().clone().requires_grad_(True)
            return s, t

        row = {"op": "kd_forward_kl", "n": n, "v": v}
        row["eager_ms"], row["eager_extra_MB"] = measure(kd_forward_kl, inputs)
        row["compile_ms"], row["compile_extra_MB"] = measure(compiled_kd, inputs)
        print(json.dumps(row), flush=True)
        del t, s0
        torch.cuda.empty_cache()
    for n, v in [(16384, 50304), (16384, 151936)]:
        d = 576
        h0 = torch.randn(n, d, device=dev, dtype=torch.bfloat16)
        w0 = torch.randn(v, d, device=dev, dtype=torch.bfloat16) * 0.04
        t = torch.randn(n, v, device=dev, dtype=torch.bfloat16) * 2

        def inputs():
            return h0.detach().clone().requires_grad_(True), w0.detach().clone().requires_grad_(True), t

        row = {"op": "linear_kd", "n": n, "v": v}
        row["eager_ms"], row["eager_extra_MB"] = measure(linear_kd, inputs, reps=10)
        row["compile_ms"], row["compile_extra_MB"] = measure(compiled_lin, inputs, reps=10)
        print(json.dumps(row), flush=True)
        del h0, w0, t
        torch.cuda.empty_cache()
    for n, v in [(4096, 50304), (16384, 50304)]:
        s0 = torch.randn(n, v, device=dev, dtype=torch.bfloat16) * 2
        y = torch.randint(0, v, (n,), device=dev)

        def inputs():
            return s0.detach().clone().requires_grad_(True), y

        row = {"op": "cross_entropy", "n": n, "v": v}
        row["eager_ms"], row["eager_extra_MB"] = measure(cross_entropy, inputs)
        row["compile_ms"], row["compile_extra_MB"] = measure(compiled_ce, inputs)
        print(json.dumps(row), flush=True)
        del s0
        torch.cuda.empty_cache()


if __name__ == "__main__":
    sys.exit(main())

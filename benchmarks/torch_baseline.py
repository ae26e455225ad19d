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


def cross_entropy(s, y):
    return torch.nn.functional.cross_entropy(s.float(), y)


def measure(fn, make_inputs, reps=20):
    for _ in range(3):
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


def main():
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

#!/usr/bin/env python3
"""torch SDPA baseline for kd's model attention (kd/model/cuda/flash_attention.cuh).

Times torch.nn.functional.scaled_dot_product_attention (causal, bf16, [batch, heads, seq, d]) forward and
forward + backward on the geometries the kd timing case uses (tests/cuda/test_cuda_model_attention.cu,
KD_ATTN_BENCH=1): median of 20 cudaEvent timings after 3 warm-ups. Two variants: enable_gqa=True on the
grouped K/V, and the flash backend on K/V repeated to hq heads (what FA2 runs for GQA).
"""
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

GEOMS = [(8, 1024, 16, 4, 64), (8, 1024, 9, 3, 64), (8, 1024, 16, 4, 128)]


def median_ms(fn, iters=20, warmup=3):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for i in range(iters + warmup):
        start.record()
        fn()
        end.record()
        end.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end))
    times.sort()
    return (times[iters // 2 - 1] + times[iters // 2]) / 2


def main():
    dev = torch.device("cuda")
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name(0)} (median of 20, ms)")
    for b, s, hq, hkv, d in GEOMS:
        q = torch.randn(b, hq, s, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(b, hkv, s, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(b, hkv, s, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
        do = torch.randn(b, hq, s, d, device=dev, dtype=torch.bfloat16)
        flops = 4.0 * b * hq * s * s * d / 2

        def report(name, fwd):
            def fwd_only():
                with torch.no_grad():
                    fwd()

            def fwd_bwd():
                out = fwd()
                out.backward(do)

            try:
                tf, tfb = median_ms(fwd_only), median_ms(fwd_bwd)
                print(f"{name:24s} batch {b} seq {s} hq {hq} hkv {hkv} d {d}: fwd {tf:.3f} ms "
                      f"({flops / tf * 1e-9:.0f} TFLOP/s)  fwd+bwd {tfb:.3f} ms ({3.5 * flops / tfb * 1e-9:.0f} TFLOP/s)")
            except RuntimeError as e:  # a backend that refuses the shape
                print(f"{name:24s} batch {b} seq {s} hq {hq} hkv {hkv} d {d}: unavailable ({str(e).splitlines()[0]})")

        report("sdpa enable_gqa", lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))

        def flash_repeated():
            g = hq // hkv
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1),
                                                      is_causal=True)

        report("sdpa flash, repeated kv", flash_repeated)


if __name__ == "__main__":
    main()

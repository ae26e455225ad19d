#!/usr/bin/env python3
"""PyTorch / transformers baseline for `kd_model bench`: one training step (forward, next-token cross-entropy,
backward to every parameter's gradient; no optimizer step) of kd's teacher or student built in transformers.

  model_bench_torch.py --arch teacher|student --preset seed|demo|tiny
      (--kd-tool PATH | --config DIR | --config-json PATH | --builtin)
      [--batch 8] [--seq 1024] [--steps 20] [--warmup 5] [--mode eager|compile|eager,compile]
      [--experts-impl default|NAME[,NAME...]|all] [--seed 0]

Config sources: `kd_model config` (--kd-tool), a folder with config.json (--config), a config.json file
(--config-json), or the builtin mirror of kd's presets in scripts/hf_compare.py (--builtin).
Model: bf16 weights on CUDA, attn_implementation="sdpa", train() (dropout is 0 in kd's configs), random
input_ids; one step = loss = model(input_ids, labels=input_ids).loss; loss.backward(); zero_grad(set_to_none).
--mode compile wraps the model in torch.compile (default mode). Timing: CUDA events around each step, median
of --steps after --warmup. MFU = flops_per_token * tokens/s / 989e12 (H100/H200 SXM dense bf16), with
flops_per_token = 6 * N_mm + 6 * L * seq * (Hq * D), N_mm = active parameters (top-k experts only) minus the
input embedding table when the head is untied (tied: the shared matrix counts once, as the head).
--experts-impl (Qwen3-MoE): transformers' experts implementation; 'default' leaves transformers' choice,
'all' runs every one it offers. Prints one JSON line per (mode, experts impl), in kd_model bench's schema.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PEAK_BF16 = 989e12  # H100 / H200 SXM, dense bf16

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from hf_compare import kd_config_dict, parameter_counts  # noqa: E402  (builtin presets, kd's counting rule)


def load_config_dict(args, tmp):
    if args.kd_tool:
        out = Path(tmp) / "config"
        cmd = [args.kd_tool, "config", "--arch", args.arch, "--preset", args.preset, "--out", str(out)]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} exited {p.returncode}:\n{p.stdout}{p.stderr}")
        return json.loads((out / "config.json").read_text())
    if args.config:
        return json.loads((Path(args.config) / "config.json").read_text())
    if args.config_json:
        return json.loads(Path(args.config_json).read_text())
    if args.builtin:
        return kd_config_dict(args.arch, args.preset)
    raise SystemExit("give one of --kd-tool, --config, --config-json, --builtin")


def experts_impls_available():
    """Names transformers 5 offers for config._experts_implementation (empty when it has no such switch)."""
    try:
        import transformers.integrations.moe as moe
    except ImportError:
        return []
    for n in ("ALL_EXPERTS_FUNCTIONS", "ExpertsInterface"):
        v = getattr(moe, n, None)
        if v is None:
            continue
        keys = v.valid_keys() if hasattr(v, "valid_keys") else list(v.keys()) if hasattr(v, "keys") else None
        if keys is not None:
            return sorted(set(["eager"] + [str(k) for k in keys]))
    return []


def build_model(cfg, impl):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "config.json").write_text(json.dumps(cfg))
        config = AutoConfig.from_pretrained(d)
    kwargs = dict(dtype=torch.bfloat16, attn_implementation="sdpa")
    if impl != "default":
        kwargs["experts_implementation"] = impl
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    # Llama has no experts; its config still reports 'eager', which would read as a choice that was made.
    got = getattr(model.config, "_experts_implementation", None) if cfg["model_type"] == "qwen3_moe" else None
    if impl != "default" and got != impl:
        raise SystemExit(f"asked for experts implementation {impl!r}, the model reports {got!r}")
    if model.config._attn_implementation != "sdpa":
        raise SystemExit(f"asked for sdpa attention, the model reports {model.config._attn_implementation!r}")
    return model.train(), got


def bench_one(args, cfg, mode, impl):
    import torch
    torch.manual_seed(args.seed)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model, impl_used = build_model(cfg, impl)
    n_params = sum(p.numel() for p in model.parameters())
    total, active, embed = parameter_counts(cfg)
    if n_params != total:
        raise SystemExit(f"transformers built {n_params} parameters; kd's count for this config is {total}")
    step_model = torch.compile(model) if mode == "compile" else model
    ids = torch.randint(0, cfg["vocab_size"], (args.batch, args.seq), device="cuda")

    def step():
        loss = step_model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss

    t0 = time.time()
    for _ in range(args.warmup):
        loss = step()
    torch.cuda.synchronize()
    warm_s = time.time() - t0
    times = []
    for _ in range(args.steps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        loss = step()
        e1.record()
        torch.cuda.synchronize()
        times.append(e0.elapsed_time(e1))
    loss_value = float(loss.detach())
    if not math.isfinite(loss_value):
        raise SystemExit(f"non-finite loss {loss_value}")
    times.sort()
    ms = times[len(times) // 2]
    tokens_per_s = args.batch * args.seq / (ms / 1e3)
    n_mm = active if cfg["tie_word_embeddings"] else active - embed
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    flops_per_token = 6 * n_mm + 6 * cfg["num_hidden_layers"] * args.seq * cfg["num_attention_heads"] * head_dim
    row = {"impl": f"torch-{mode}", "arch": args.arch, "preset": args.preset, "batch": args.batch, "seq": args.seq,
           "ms_per_step": round(ms, 3), "tokens_per_s": round(tokens_per_s, 1),
           "mfu": round(flops_per_token * tokens_per_s / PEAK_BF16, 4),
           "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 1e9, 3), "loss": round(loss_value, 5),
           "experts_impl": impl_used if impl == "default" else impl, "experts_impl_requested": impl,
           "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
           "ms_min": round(times[0], 3), "ms_max": round(times[-1], 3), "warmup_s": round(warm_s, 1),
           "params": n_params, "active_params": active, "flops_per_token": flops_per_token}
    del step_model, model
    if mode == "compile":
        torch._dynamo.reset()
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", required=True, choices=["teacher", "student"])
    ap.add_argument("--preset", default="seed", choices=["seed", "demo", "tiny"])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--kd-tool")
    src.add_argument("--config", help="folder holding config.json")
    src.add_argument("--config-json", help="a config.json file")
    src.add_argument("--builtin", action="store_true", help="builtin mirror of kd's presets")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--mode", default="eager", help="eager, compile, or both comma-separated")
    ap.add_argument("--experts-impl", default="default",
                    help="default, one or more of transformers' experts implementations (comma-separated), or all")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch
    import transformers
    if not torch.cuda.is_available():
        raise SystemExit("model_bench_torch.py: no CUDA device")
    if args.steps < 1 or args.warmup < 0:
        raise SystemExit("--steps must be >= 1 and --warmup >= 0")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config_dict(args, tmp)
    want_type = {"teacher": "qwen3_moe", "student": "llama"}[args.arch]
    if cfg.get("model_type") != want_type:
        raise SystemExit(f"config model_type is {cfg.get('model_type')!r}; --arch {args.arch} needs {want_type!r}")
    if args.seq > cfg["max_position_embeddings"]:
        raise SystemExit(f"--seq {args.seq} exceeds max_position_embeddings {cfg['max_position_embeddings']}")
    available = experts_impls_available()
    print(f"# gpu {torch.cuda.get_device_name(0)}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"experts implementations offered: {available or 'none'}", file=sys.stderr, flush=True)
    if args.arch == "student" or args.experts_impl == "default":
        impls = ["default"]
    elif args.experts_impl == "all":
        if not available:
            raise SystemExit("--experts-impl all: this transformers offers no experts implementations")
        impls = ["default"] + available  # the one 'default' resolves to is skipped below, not run twice
    else:
        impls = [x for x in args.experts_impl.split(",") if x]
        for i in impls:
            if i != "default" and i not in available:
                raise SystemExit(f"--experts-impl {i!r} is not offered (available: {available})")
    modes = [m for m in args.mode.split(",") if m]
    for m in modes:
        if m not in ("eager", "compile"):
            raise SystemExit(f"--mode {m!r}: eager or compile")
    failed = 0
    for mode in modes:
        default_is = None
        for impl in impls:
            if args.experts_impl == "all" and impl == default_is:
                continue
            try:
                row = bench_one(args, cfg, mode, impl)
            except torch.cuda.OutOfMemoryError as e:
                print(f"# {mode}/{impl}: out of memory: {str(e).splitlines()[0]}", file=sys.stderr, flush=True)
                failed += 1
                torch.cuda.empty_cache()
                continue
            except Exception as e:  # one backend failing (e.g. compile) must not hide the others' numbers
                print(f"# {mode}/{impl}: FAILED: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
                failed += 1
                torch.cuda.empty_cache()
                continue
            if impl == "default":
                default_is = row["experts_impl"]
            print(json.dumps(row), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

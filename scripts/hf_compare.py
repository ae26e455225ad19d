#!/usr/bin/env python3
"""Checks kd::model against Hugging Face transformers, both ways, on the GPU machine.

  hf_compare.py --kd-tool PATH --workdir DIR [--presets tiny,demo] [--backends cpu,cuda]
                [--dtypes float32,bfloat16] [--archs teacher,student] [--directions hf2kd,kd2hf]

For each arch (teacher: Qwen3MoeForCausalLM, student: LlamaForCausalLM) and preset:
  hf2kd  `kd_model config` writes config.json; transformers builds the model from it (seeded init, norm
         weights perturbed so a dropped norm weight shows), casts it to the dtype under test and saves it
         (one model.safetensors); `kd_model logits` runs on it with each backend.
  kd2hf  `kd_model init` writes a checkpoint; transformers must load it with no missing / unexpected /
         mismatched keys.
Either way the reference is transformers' fp32 forward (eager attention, on the GPU, TF32 off) of the
checkpoint's own weights (a bf16 checkpoint is upcast), and transformers' own bf16 forward is measured
against the same reference, side by side with kd's bf16 error. Thresholds (relative L2 over all logits):
  float32 checkpoint, kd --dtype float32: 1e-4 on cpu, 1e-3 on cuda
  bfloat16 checkpoint, kd --dtype bfloat16 on cuda: 3e-2 and argmax agreement >= 95%
  bfloat16 checkpoint, kd --dtype float32 on cpu (weights upcast): 1e-4
Qwen3-MoE (teacher) routing: the reference forward also records every sparse layer's router probabilities
(output_router_logits=True, cross-checked against hooks on each layer's mlp.gate), its top-k expert ids and the
margin p_k - p_{k+1} per token. kd runs twice per case:
  free    kd routes itself (--routing-out): routing agreement = fraction of (token, sparse layer) whose top-k set
          equals the reference's. A disagreement is a tie if no earlier sparse layer disagreed at the same or an
          earlier position of its sequence (causal cone: otherwise its input differs for a routing reason, not
          a rounding one); every tie must have reference margin < 1e-4 (kd float32) or < 2e-2 (kd bfloat16).
  replay  kd uses the reference's choices (--routing-in, weights from kd's own router probabilities): the
          thresholds above apply to this run (the numerics under identical routing); the free run's rel L2 /
          argmax are reported beside it. kd's replay-run --routing-out must echo the replayed ids.
  transformers' own bf16 forward (the context columns) always routes freely.
Every checkpoint's tensor names, shapes and dtypes are checked against expected_tensors() (below): Qwen3-MoE
experts per expert (mlp.experts.{e}.gate_proj/up_proj/down_proj.weight, what transformers 5.17's save_pretrained
writes) or fused (mlp.experts.gate_up_proj [E, 2I, H], mlp.experts.down_proj [E, H, I]); whichever kd writes,
transformers must load it with no missing/unexpected keys.

Prints a table, writes JSON to $OUT/hf_compare.json (or --json), exits 1 on any failure.

  --kd-tool emulate   runs transformers in place of kd_model (self-test of this script; needs no kd build);
                      routing out/replay through hooks on the routers (transformers >= 5 routers, which return
                      (probabilities, weights, indices); with older ones the replay run is skipped and marked)
  --facts             prints the transformers facts kd's layout relies on (tensor names of the saved tiny
                      models, expert gate/up order, router arithmetic, attention/RoPE source) to stdout and
                      the full source to $OUT/hf_facts.txt; needs no kd build (uses the builtin configs)
"""
import argparse
import inspect
import json
import math
import os
import shlex
import struct
import subprocess
import sys
import time
import traceback
from pathlib import Path

ARCH_CLASS = {"teacher": "Qwen3MoeForCausalLM", "student": "LlamaForCausalLM"}
SEQ = {"tiny": 64, "demo": 256, "seed": 256}  # tiny's max_position_embeddings is 64
BATCH = 2

# Thresholds: (checkpoint dtype, backend, kd dtype) -> (max relative L2, min argmax agreement or None).
CASES = [
    ("float32", "cpu", "float32", 1e-4, None),
    ("float32", "cuda", "float32", 1e-3, None),
    ("bfloat16", "cuda", "bfloat16", 3e-2, 0.95),
    ("bfloat16", "cpu", "float32", 1e-4, None),
]
# Qwen3-MoE: the largest reference margin p_k - p_{k+1} a (token, layer) may have where kd's free routing picks a
# different top-k set than the reference (a tie within the rounding of kd's compute dtype), by kd's dtype.
TIE_MARGIN = {"float32": 1e-4, "bfloat16": 2e-2}

# ------------------------------------------------------------------------------------------------------
# Builtin mirror of kd's presets (include/kd/model/config.hpp) as config_json.hpp writes them. Used by
# --facts, --kd-tool emulate and benchmarks/model_bench_torch.py --builtin when kd_model is not built;
# with a real kd_model, its config.json is compared against this mirror and any difference printed.
# ------------------------------------------------------------------------------------------------------
_TEACHER_SEED = dict(vocab_size=151936, hidden_size=1024, intermediate_size=2048, num_hidden_layers=24,
                     num_attention_heads=16, num_key_value_heads=4, head_dim=64, moe_intermediate_size=1024,
                     num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1,
                     mlp_only_layers=[], rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=32768,
                     tie_word_embeddings=False, attention_bias=False, router_aux_loss_coef=0.01,
                     initializer_range=0.02, bos_token_id=151643, eos_token_id=151643)
_STUDENT_SEED = dict(vocab_size=50304, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5,
                     rope_theta=10000.0, max_position_embeddings=2048, tie_word_embeddings=True,
                     attention_bias=False, mlp_bias=False, initializer_range=0.02, bos_token_id=50256,
                     eos_token_id=50256)
PRESETS = {
    ("teacher", "seed"): _TEACHER_SEED,
    ("teacher", "demo"): {**_TEACHER_SEED, **dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                                                  num_key_value_heads=2, head_dim=64, moe_intermediate_size=512,
                                                  intermediate_size=1024, max_position_embeddings=2048)},
    ("teacher", "tiny"): {**_TEACHER_SEED, **dict(vocab_size=97, hidden_size=32, intermediate_size=32,
                                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                  head_dim=8, moe_intermediate_size=16, num_experts=4,
                                                  num_experts_per_tok=2, max_position_embeddings=64,
                                                  bos_token_id=96, eos_token_id=96)},
    ("student", "seed"): _STUDENT_SEED,
    ("student", "demo"): {**_STUDENT_SEED, **dict(hidden_size=256, intermediate_size=768, num_hidden_layers=8,
                                                  num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                                  max_position_embeddings=2048)},
    ("student", "tiny"): {**_STUDENT_SEED, **dict(vocab_size=61, hidden_size=32, intermediate_size=64,
                                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                  head_dim=8, max_position_embeddings=64, bos_token_id=60,
                                                  eos_token_id=60)},
}
# Documented parameter counts (config.hpp comments): (total, active).
PRESET_COUNTS = {
    ("teacher", "seed"): (978309120, 525324288), ("teacher", "demo"): (211199488, 173450752),
    ("teacher", "tiny"): (25088, 18944), ("student", "seed"): (135178560, 135178560),
    ("student", "demo"): (19173632, 19173632), ("student", "tiny"): (20544, 20544),
}


def kd_config_dict(arch, preset, dtype="bfloat16"):
    """config.json exactly as kd's to_json writes it (config_json.hpp), keys sorted."""
    if (arch, preset) not in PRESETS:
        raise SystemExit(f"no builtin preset {arch}/{preset} (have: {sorted(PRESETS)})")
    c = dict(PRESETS[(arch, preset)])
    j = dict(c)
    j["rope_parameters"] = {"rope_theta": c["rope_theta"], "rope_type": "default"}
    if arch == "teacher":
        j.update(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", num_local_experts=c["num_experts"],
                 output_router_logits=False, use_sliding_window=False, sliding_window=None)
    else:
        j.update(architectures=["LlamaForCausalLM"], model_type="llama", pretraining_tp=1)
    j.update(attention_dropout=0.0, hidden_act="silu", use_cache=True, dtype=dtype, torch_dtype=dtype)
    return dict(sorted(j.items()))


def write_builtin_config(arch, preset, out_dir, dtype="bfloat16"):
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(kd_config_dict(arch, preset, dtype), indent=2) + "\n")
    return out_dir


# ------------------------------------------------------------------------------------------------------
# Parameter counts and the tensor layout kd expects, from a config.json dict (HF keys)
# ------------------------------------------------------------------------------------------------------
def _num_experts(cfg):
    return cfg.get("num_local_experts", cfg.get("num_experts"))


def _sparse_layers(cfg):
    step = cfg.get("decoder_sparse_step", 1)
    only = set(cfg.get("mlp_only_layers") or [])
    return [l for l in range(cfg["num_hidden_layers"]) if l not in only and step > 0 and (l + 1) % step == 0]


EXPERT_LAYOUTS = ("per_expert", "fused")


def expected_tensors(cfg, experts="per_expert"):
    """{name: shape} of every weight (config.hpp's table). Qwen3-MoE experts, two layouts:
      per_expert  mlp.experts.{e}.gate_proj.weight [I, H], .up_proj.weight [I, H], .down_proj.weight [H, I]: what
                  transformers 5.17's save_pretrained writes (it converts its in-memory fused parameters back
                  to the hub layout) and what every Qwen3-MoE checkpoint on the hub uses
      fused       mlp.experts.gate_up_proj [E, 2I, H] (gate rows first), mlp.experts.down_proj [E, H, I]: the
                  in-memory parameters of transformers 5.17"""
    if experts not in EXPERT_LAYOUTS:
        raise ValueError(f"experts layout {experts!r} is not one of {EXPERT_LAYOUTS}")
    H, V = cfg["hidden_size"], cfg["vocab_size"]
    Dh = cfg.get("head_dim") or H // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * Dh, cfg["num_key_value_heads"] * Dh
    qwen = cfg["model_type"] == "qwen3_moe"
    t = {"model.embed_tokens.weight": [V, H], "model.norm.weight": [H]}
    if not cfg["tie_word_embeddings"]:
        t["lm_head.weight"] = [V, H]
    sparse = set(_sparse_layers(cfg)) if qwen else set()
    for l in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{l}."
        t[p + "input_layernorm.weight"] = [H]
        t[p + "post_attention_layernorm.weight"] = [H]
        for n, shape in (("q_proj", [q, H]), ("k_proj", [kv, H]), ("v_proj", [kv, H]), ("o_proj", [H, q])):
            t[p + f"self_attn.{n}.weight"] = shape
            if cfg.get("attention_bias") and n != "o_proj":
                t[p + f"self_attn.{n}.bias"] = [shape[0]]
        if cfg.get("attention_bias"):
            t[p + "self_attn.o_proj.bias"] = [H]
        if qwen:
            t[p + "self_attn.q_norm.weight"] = [Dh]
            t[p + "self_attn.k_norm.weight"] = [Dh]
        if l in sparse:
            E, I = _num_experts(cfg), cfg["moe_intermediate_size"]
            t[p + "mlp.gate.weight"] = [E, H]
            if experts == "fused":
                t[p + "mlp.experts.gate_up_proj"] = [E, 2 * I, H]
                t[p + "mlp.experts.down_proj"] = [E, H, I]
            else:
                for e in range(E):
                    t[p + f"mlp.experts.{e}.gate_proj.weight"] = [I, H]
                    t[p + f"mlp.experts.{e}.up_proj.weight"] = [I, H]
                    t[p + f"mlp.experts.{e}.down_proj.weight"] = [H, I]
        else:
            I = cfg["intermediate_size"]
            for n, shape in (("gate_proj", [I, H]), ("up_proj", [I, H]), ("down_proj", [H, I])):
                t[p + f"mlp.{n}.weight"] = shape
                if cfg.get("mlp_bias"):
                    t[p + f"mlp.{n}.bias"] = [shape[0]]
    return t


def parameter_counts(cfg):
    """(total, active, embedding table) as config.hpp counts them; active: top-k experts only."""
    t = expected_tensors(cfg)
    total = sum(math.prod(s) for s in t.values())
    active = total
    if cfg["model_type"] == "qwen3_moe":
        E, k, I, H = _num_experts(cfg), cfg["num_experts_per_tok"], cfg["moe_intermediate_size"], cfg["hidden_size"]
        active -= len(_sparse_layers(cfg)) * (E - k) * 3 * H * I
    return total, active, cfg["vocab_size"] * cfg["hidden_size"]


def read_safetensors_header(path):
    """{name: (dtype, shape)} from a safetensors file's JSON header (stdlib only)."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return {k: (v["dtype"], v["shape"]) for k, v in header.items()}


def check_layout(model_dir, want_dtype, layouts=EXPERT_LAYOUTS):
    """(layout, problems) for model_dir/model.safetensors against expected_tensors(config.json): the first of
    `layouts` whose names match exactly (names of the other are not accepted in the same file)."""
    model_dir = Path(model_dir)
    st = model_dir / "model.safetensors"
    shards = sorted(p.name for p in model_dir.glob("*.safetensors*") if p.name != "model.safetensors")
    extra = [f"{model_dir}: extra safetensors files {shards} (kd reads one model.safetensors)"] if shards else []
    if not st.is_file():
        return None, extra + [f"{st} is missing"]
    cfg = json.loads((model_dir / "config.json").read_text())
    have = read_safetensors_header(st)
    results = []
    for layout in layouts:
        problems = _check_names(st, expected_tensors(cfg, layout), have, want_dtype)
        if not problems:
            return layout, extra
        results.append((len(problems), layout, problems))
    _, layout, problems = min(results)  # report against the nearer layout
    return None, extra + [f"(nearest layout: {layout})"] + problems


def _check_names(st, want, have, want_dtype):
    problems = []
    st_dtype = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}[want_dtype]
    for name in sorted(set(want) - set(have)):
        problems.append(f"{st}: missing tensor {name} {want[name]}")
    for name in sorted(set(have) - set(want)):
        problems.append(f"{st}: unexpected tensor {name} {have[name][1]}")
    for name in sorted(set(want) & set(have)):
        dt, shape = have[name]
        if list(shape) != want[name]:
            problems.append(f"{st}: {name} has shape {shape}, kd expects {want[name]}")
        if dt != st_dtype:
            problems.append(f"{st}: {name} is {dt}, expected {st_dtype}")
    return problems


def print_tensor_list(model_dir, title):
    have = read_safetensors_header(Path(model_dir) / "model.safetensors")
    print(f"--- {title}: {len(have)} tensors in {Path(model_dir) / 'model.safetensors'}")
    for name in sorted(have, key=_natural_key):
        dt, shape = have[name]
        print(f"    {name:55s} {dt:5s} {shape}")


def _natural_key(name):
    return [int(p) if p.isdigit() else p for p in name.split(".")]


# ------------------------------------------------------------------------------------------------------
# torch / transformers helpers (imported lazily: --help and the layout code need neither)
# ------------------------------------------------------------------------------------------------------
def _torch():
    import torch
    return torch


def torch_dtype(name):
    torch = _torch()
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def strict_fp32():
    """The fp32 reference must be IEEE fp32: TF32 matmuls would cost ~1e-3 relative error."""
    torch = _torch()
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def perturb_init(model, seed):
    """Seeded init with O(1) logits: matrices ~ N(0, 1/fan_in) (embeddings N(0, 1)), norm weights 1 + U(-.25, .25).
    transformers' own init (std 0.02, norms exactly 1) gives near-uniform logits and would hide a norm weight
    that kd ignores or applies to the wrong axis."""
    torch = _torch()
    g = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                if "bias" in name:
                    v = torch.randn(p.shape, generator=g) * 0.1
                else:
                    v = 1.0 + (torch.rand(p.shape, generator=g) - 0.5) * 0.5
            elif "embed_tokens" in name:
                v = torch.randn(p.shape, generator=g)
            else:
                v = torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1])
            p.copy_(v.to(p.dtype))


def save_pretrained_single(model, out_dir):
    """save_pretrained as one model.safetensors (kd reads one file)."""
    kwargs = {"max_shard_size": "1000GB"}
    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
        kwargs["safe_serialization"] = True
    model.save_pretrained(str(out_dir), **kwargs)
    if not (Path(out_dir) / "model.safetensors").is_file():
        raise RuntimeError(f"save_pretrained wrote no single model.safetensors in {out_dir}: "
                           f"{sorted(p.name for p in Path(out_dir).iterdir())}")


def build_hf_from_config(model_dir, seed, dtype_name):
    """transformers model from model_dir/config.json, seeded, in the given dtype (CPU)."""
    torch = _torch()
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.from_pretrained(str(model_dir))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    perturb_init(model, seed)
    return model.to(torch_dtype(dtype_name)).eval()


def load_hf(model_dir, dtype_name, attn, device, require_clean=True, experts=None):
    """from_pretrained with output_loading_info; any missing/unexpected/mismatched key is an error.
    experts: Qwen3-MoE experts implementation (None: transformers' default, grouped_mm in 5.17); the fp32
    reference uses "eager" (a plain per-expert loop of fp32 matmuls)."""
    torch = _torch()
    from transformers import AutoModelForCausalLM
    kwargs = dict(dtype=torch_dtype(dtype_name), attn_implementation=attn, output_loading_info=True)
    if experts is not None and json.loads((Path(model_dir) / "config.json").read_text())["model_type"] == "qwen3_moe":
        kwargs["experts_implementation"] = experts
    model, info = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys",
                                                         "error_msgs")}
    if bad and require_clean:
        raise RuntimeError(f"transformers loaded {model_dir} with problems: {bad}")
    return model.to(device).eval()


def hf_logits(model, ids):
    torch = _torch()
    dev = next(model.parameters()).device
    with torch.no_grad():
        return model(input_ids=ids.to(dev), use_cache=False).logits.float()


def compare(got, ref):
    """max |diff|, relative L2 over all logits, argmax agreement over tokens (float64)."""
    torch = _torch()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g, r = got.to(dev, torch.float64), ref.to(dev, torch.float64)
    if g.shape != r.shape:
        raise RuntimeError(f"logits shape {tuple(g.shape)} differs from the reference {tuple(r.shape)}")
    if not torch.isfinite(g).all():
        raise RuntimeError(f"logits contain {int((~torch.isfinite(g)).sum())} non-finite values")
    d = g - r
    return {"max_abs": float(d.abs().max()), "rel_l2": float(d.norm() / r.norm()),
            "argmax": float((g.argmax(-1) == r.argmax(-1)).double().mean())}


# ------------------------------------------------------------------------------------------------------
# Qwen3-MoE routing: the reference's choices, kd's (--routing-out / --routing-in files), agreement
# ------------------------------------------------------------------------------------------------------
class ReplayUnsupported(Exception):
    """transformers' router in this version cannot be made to replay given choices (emulate mode only)."""


def sparse_layer_indices(config):
    """Layers with a router, as Qwen3MoeDecoderLayer decides: not in mlp_only_layers, num_experts > 0 and
    (layer + 1) % decoder_sparse_step == 0 (config: a transformers config object)."""
    experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None) or 0
    if experts <= 0:
        return []
    return _sparse_layers({"num_hidden_layers": config.num_hidden_layers,
                           "mlp_only_layers": list(getattr(config, "mlp_only_layers", None) or []),
                           "decoder_sparse_step": getattr(config, "decoder_sparse_step", 1) or 1})


def router_modules(model):
    """[(layer index, router module mlp.gate)] of a Qwen3-MoE model's sparse layers ([] for other models), checked
    against the blocks transformers built."""
    cfg = model.config
    if getattr(cfg, "model_type", None) != "qwen3_moe":
        return []
    sparse = set(sparse_layer_indices(cfg))
    out = []
    for l, layer in enumerate(model.model.layers):
        gate = getattr(layer.mlp, "gate", None)
        has = gate is not None and hasattr(layer.mlp, "experts")
        if has != (l in sparse):
            raise RuntimeError(f"layer {l}: transformers built {'a sparse' if has else 'a dense'} MLP block, but "
                               f"mlp_only_layers / decoder_sparse_step make it {'sparse' if l in sparse else 'dense'}")
        if has:
            out.append((l, gate))
    return out


def _as_probs(x):
    """(fp32 probabilities [tokens, E], what x was): transformers 5's router returns (and output_router_logits
    records) the softmax already, under the name router_logits; older versions return the raw logits."""
    torch = _torch()
    x = x.detach().float()
    x = x.reshape(-1, x.shape[-1])
    if bool((x >= 0).all()) and float((x.sum(-1) - 1).abs().max()) < 1e-3:
        return x, "probabilities"
    return torch.softmax(x, dim=-1), "logits"


class RouterHooks:
    """Forward hooks on every sparse layer's router: captures {layer: (probs [tokens, E] fp32, ids [tokens, k])}
    (ids: the router's own choice where it returns (probs, weights, indices), else top-k of probs) and, with replay
    {layer: ids [tokens, k]}, makes the router return those ids with weights from its own probabilities
    (renormalized when norm_topk_prob), as kd's --routing-in does. Replay needs a router returning
    (probs, weights, indices) (transformers >= 5); with another it raises ReplayUnsupported."""

    def __init__(self, model, replay=None):
        self.routers = router_modules(model)
        self.k = getattr(model.config, "num_experts_per_tok", 0)
        self.norm = bool(getattr(model.config, "norm_topk_prob", False))
        self.replay = replay
        self.captured = {}
        self.handles = []

    def __enter__(self):
        for l, gate in self.routers:
            self.handles.append(gate.register_forward_hook(self._hook(l)))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []
        return False

    def _hook(self, l):
        def hook(module, args, output):
            torch = _torch()
            triple = isinstance(output, tuple) and len(output) == 3 and not output[2].is_floating_point()
            probs, _ = _as_probs(output[0] if isinstance(output, tuple) else output)
            ids = output[2].reshape(probs.shape[0], -1) if triple else torch.topk(probs, self.k, dim=-1).indices
            if self.replay is None:
                self.captured[l] = (probs, ids.detach())
                return None
            if not triple:
                raise ReplayUnsupported(f"{type(module).__name__} returns {type(output).__name__}, not "
                                        f"(probabilities, weights, indices)")
            want = self.replay[l].to(device=output[2].device, dtype=output[2].dtype)
            if tuple(want.shape) != tuple(output[2].shape):
                raise RuntimeError(f"layer {l}: replayed ids {tuple(want.shape)}, the router chose "
                                   f"{tuple(output[2].shape)}")
            w = probs.gather(1, want.reshape(probs.shape[0], -1).long())
            if self.norm:
                w = w / w.sum(dim=-1, keepdim=True)
            self.captured[l] = (probs, want.reshape(probs.shape[0], -1).detach())
            return (output[0], w.reshape(output[1].shape).to(output[1].dtype), want)
        return hook


def hf_forward(model, ids, replay=None, reference=False):
    """(fp32 logits, routing) of a transformers forward. routing: None for a dense model, else {layer: dict(ids [N, k]
    long (descending probability), probs [N, E] fp32, margin [N] = p_k - p_{k+1})} on the CPU, N = batch * seq
    row-major. reference: also ask for output_router_logits and check that its entries are the sparse layers'
    routers in order (transformers records one per sparse layer; older versions may put None for dense ones)."""
    torch = _torch()
    dev = next(model.parameters()).device
    routers = router_modules(model)
    kw = {"output_router_logits": True} if (routers and reference) else {}
    with torch.no_grad(), RouterHooks(model, replay) as hooks:
        out = model(input_ids=ids.to(dev), use_cache=False, **kw)
    logits = out.logits.float()
    if not routers:
        return logits, None
    k = model.config.num_experts_per_tok
    sparse = [l for l, _ in routers]
    probs = {l: hooks.captured[l][0] for l in sparse}
    if reference:
        recorded = getattr(out, "router_logits", None)
        if recorded is None:
            print("note: the reference forward returned no router_logits; routing from hooks on mlp.gate", flush=True)
        else:
            recorded = [r for r in recorded if r is not None]
            if len(recorded) != len(sparse):
                raise RuntimeError(f"output_router_logits gave {len(recorded)} tensors for sparse layers {sparse}")
            kinds = set()
            for i, (l, r) in enumerate(zip(sparse, recorded)):
                p, kind = _as_probs(r)
                kinds.add(kind)
                hp = probs[l]
                if tuple(p.shape) != tuple(hp.shape) or float((p - hp).abs().max()) > 1e-6:
                    raise RuntimeError(f"output router_logits[{i}] is not layer {l}'s router output (shape "
                                       f"{tuple(p.shape)} vs {tuple(hp.shape)})")
                probs[l] = p
            hf_forward.recorded_kind = "/".join(sorted(kinds))
    routing = {}
    for l in sparse:
        p = probs[l]
        E = p.shape[-1]
        v, i = torch.topk(p, min(k + 1, E), dim=-1)
        margin = v[:, k - 1] - v[:, k] if E > k else torch.full_like(v[:, 0], float("inf"))
        if replay is not None or not reference:
            chosen = hooks.captured[l][1]  # the ids the forward used (HF's own topk, or the replayed ones)
        else:
            chosen = i[:, :k]
        routing[l] = dict(ids=chosen.long().cpu().contiguous(), probs=p.cpu().contiguous(), margin=margin.cpu())
    return logits, routing


hf_forward.recorded_kind = None  # what output_router_logits held in the last reference forward (for the log)


def write_routing(routing, path):
    """routing (hf_forward's) as a kd --routing-in file: layers.L.expert_ids int32 [tokens, top_k]."""
    torch = _torch()
    from safetensors.torch import save_file
    save_file({f"layers.{l}.expert_ids": r["ids"].to(torch.int32).contiguous() for l, r in routing.items()}, str(path))


def read_kd_routing(path, layers):
    """kd's --routing-out file as {layer: dict(ids [N, k] long, probs [N, E] fp32 or None)}; exactly `layers`."""
    from safetensors.torch import load_file
    got = load_file(str(path))
    have = sorted({int(n.split(".")[1]) for n in got if n.startswith("layers.") and n.endswith(".expert_ids")})
    if have != sorted(layers):
        raise RuntimeError(f"{path}: expert_ids for layers {have}, the sparse layers are {sorted(layers)}")
    out = {}
    for l in layers:
        ids = got[f"layers.{l}.expert_ids"]
        if ids.is_floating_point():
            raise RuntimeError(f"{path}: layers.{l}.expert_ids is {ids.dtype}")
        p = got.get(f"layers.{l}.router_probs")
        out[l] = dict(ids=ids.long(), probs=None if p is None else p.float())
    return out


def routing_agreement(got, ref, batch, seq, tie_limit):
    """got vs ref routing ({layer: dict(ids, probs)}; ref also margin). Returns agree (fraction of (token, sparse
    layer) with the same top-k set), disagree, ties (disagreements outside the causal cone of an earlier layer's
    disagreement: the same or an earlier position of the same sequence), downstream (the others), max_tie_margin
    (largest reference margin among ties, None if none; max_margin_all: among all disagreements), n_over and
    over_limit (ties with margin >= tie_limit; the first few as 'layer L seq b pos t margin m'), router_dp
    (max |p_got - p_ref| over tokens outside every such cone)."""
    torch = _torch()
    tainted = torch.zeros(batch, seq, dtype=torch.bool)
    total = disagree = ties = downstream = 0
    max_tie, max_all, over, n_over, router_dp = None, None, [], 0, None
    for l in sorted(ref):
        r, g = ref[l], got[l]
        if tuple(g["ids"].shape) != tuple(r["ids"].shape):
            raise RuntimeError(f"layer {l}: expert_ids {tuple(g['ids'].shape)}, the reference has {tuple(r['ids'].shape)}")
        same = (g["ids"].sort(-1).values == r["ids"].sort(-1).values).all(-1).view(batch, seq)
        dis = ~same
        tie = dis & ~tainted
        margin = r["margin"].view(batch, seq)
        total += same.numel()
        disagree += int(dis.sum())
        ties += int(tie.sum())
        downstream += int((dis & tainted).sum())
        if bool(dis.any()):
            m = float(margin[dis].max())
            max_all = m if max_all is None else max(max_all, m)
        if bool(tie.any()):
            m = float(margin[tie].max())
            max_tie = m if max_tie is None else max(max_tie, m)
            for b, t in tie.nonzero().tolist():
                if not float(margin[b, t]) < tie_limit:
                    n_over += 1
                    if len(over) < 5:
                        over.append(f"layer {l} seq {b} pos {t} margin {float(margin[b, t]):.3g}")
        if g.get("probs") is not None and tuple(g["probs"].shape) == tuple(r["probs"].shape) and bool((~tainted).any()):
            dp = (g["probs"] - r["probs"]).abs().max(-1).values.view(batch, seq)[~tainted]
            router_dp = max(router_dp or 0.0, float(dp.max()))
        tainted |= dis.int().cumsum(1) > 0  # a flipped token perturbs its later positions from the next layer on
    return dict(agree=1.0 - disagree / max(total, 1), disagree=disagree, ties=ties, downstream=downstream,
                max_tie_margin=max_tie, max_margin_all=max_all, n_over=n_over, over_limit=over, router_dp=router_dp,
                tie_limit=tie_limit)


# ------------------------------------------------------------------------------------------------------
# kd_model: the real tool (subprocess) or an in-process transformers emulation (self-test)
# ------------------------------------------------------------------------------------------------------
class KdTool:
    def __init__(self, spec, log):
        self.emulate = spec == "emulate"
        self.cmd = None if self.emulate else shlex.split(spec)
        self.log = log
        if not self.emulate and not Path(self.cmd[0]).exists():
            raise SystemExit(f"--kd-tool {self.cmd[0]} does not exist (build it: cmake --build build-device "
                             f"--target kd_model)")

    def _run(self, *args):
        cmd = self.cmd + [str(a) for a in args]
        self.log(f"$ {shlex.join(cmd)}")
        t0 = time.time()
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"{shlex.join(cmd)} exited {p.returncode}:\n{p.stdout}{p.stderr}".rstrip())
        self.log(f"  ({time.time() - t0:.1f} s)")
        return p.stdout

    def config(self, arch, preset, out):
        if self.emulate:
            return write_builtin_config(arch, preset, out)
        self._run("config", "--arch", arch, "--preset", preset, "--out", out)

    def init(self, arch, preset, out, seed, dtype):
        if self.emulate:
            write_builtin_config(arch, preset, out, dtype)
            model = build_hf_from_config(out, seed, dtype)
            save_pretrained_single(model, out)
            return
        self._run("init", "--arch", arch, "--preset", preset, "--out", out, "--seed", seed, "--dtype", dtype)

    def logits(self, model_dir, tokens, out, backend, dtype, routing_out=None, routing_in=None):
        """routing_out / routing_in: kd_model's --routing-out / --routing-in files (MoE only)."""
        if self.emulate:
            # transformers in kd's place: fp32 eager on the backend's device, or bf16 sdpa on cuda; routing
            # written / replayed through hooks on the routers (RouterHooks).
            torch = _torch()
            from safetensors.torch import load_file, save_file
            ids = load_file(str(tokens))["input_ids"]
            fp32 = dtype == "float32"
            m = load_hf(model_dir, dtype, "eager" if fp32 else "sdpa", backend, experts="eager" if fp32 else None)
            try:
                replay = None
                if routing_in is not None:
                    r = load_file(str(routing_in))
                    replay = {l: r[f"layers.{l}.expert_ids"] for l, _ in router_modules(m)}
                logits, routing = hf_forward(m, ids, replay=replay)
                save_file({"logits": logits.cpu().contiguous()}, str(out))
                if routing_out is not None and routing is not None:
                    t = {}
                    for l, rr in routing.items():
                        t[f"layers.{l}.expert_ids"] = rr["ids"].to(torch.int32).contiguous()
                        t[f"layers.{l}.router_probs"] = rr["probs"].contiguous()
                    save_file(t, str(routing_out))
            finally:
                del m
                torch.cuda.empty_cache()
            return
        extra = []
        if routing_out is not None:
            extra += ["--routing-out", routing_out]
        if routing_in is not None:
            extra += ["--routing-in", routing_in]
        self._run("logits", "--model", model_dir, "--tokens", tokens, "--out", out, "--backend", backend,
                  "--dtype", dtype, *extra)


# ------------------------------------------------------------------------------------------------------
# Facts about transformers' Qwen3-MoE / Llama that kd's layout and arithmetic rely on
# ------------------------------------------------------------------------------------------------------
def _src(obj):
    try:
        return inspect.getsource(inspect.unwrap(obj) if callable(obj) else obj)
    except (TypeError, OSError) as e:
        return f"<no source: {e}>"


def expert_facts(model):
    """Empirical: is gate_up_proj[:, :I] the gate (silu'd) or the up projection; router output dtypes in bf16."""
    torch = _torch()
    F = torch.nn.functional
    out = {}
    layer = model.model.layers[0]
    experts, router = layer.mlp.experts, layer.mlp.gate
    E, twoI, H = experts.gate_up_proj.shape
    I = twoI // 2
    x = torch.randn(5, H, dtype=torch.float32)
    idx = torch.zeros(5, 1, dtype=torch.long)
    w = torch.ones(5, 1, dtype=torch.float32)
    with torch.no_grad():
        y = experts(x, idx, w)
        a, b, d = experts.gate_up_proj[0, :I], experts.gate_up_proj[0, I:], experts.down_proj[0]
        first_is_gate = (F.silu(x @ a.T) * (x @ b.T)) @ d.T
        first_is_up = (F.silu(x @ b.T) * (x @ a.T)) @ d.T
        e_gate, e_up = float((y - first_is_gate).abs().max()), float((y - first_is_up).abs().max())
    out["gate_up_first_half"] = "gate" if e_gate < 1e-5 < e_up else "up" if e_up < 1e-5 < e_gate else \
        f"undetermined (err gate-first {e_gate:.3g}, up-first {e_up:.3g})"
    out["gate_up_err"] = {"gate_first": e_gate, "up_first": e_up}
    # Router outputs in bf16: which tensor types come back (routing weights fp32 or bf16?).
    rb = router.to(torch.bfloat16)
    with torch.no_grad():
        r = rb(torch.randn(5, H, dtype=torch.bfloat16))
    out["router_outputs_bf16"] = [f"{tuple(t.shape)} {t.dtype}" for t in (r if isinstance(r, tuple) else (r,))]
    router.to(torch.float32)
    # Does norm_topk_prob renormalise: top-k weights sum to 1?
    with torch.no_grad():
        r = router(torch.randn(5, H))
    vals = [t for t in r if t.dtype.is_floating_point and t.shape[-1] == model.config.num_experts_per_tok]
    if vals:
        out["topk_weight_sums"] = [round(float(s), 6) for s in vals[0].sum(-1)]
    return out


def experts_impl_facts():
    """Which experts implementations transformers offers, and the default."""
    facts = {}
    try:
        import transformers.integrations.moe as moe
        facts["moe_module_names"] = [n for n in dir(moe) if not n.startswith("__")]
        for n in dir(moe):
            v = getattr(moe, n)
            if hasattr(v, "keys") and callable(getattr(v, "keys")) and ("EXPERT" in n.upper() or "FUNCTION" in n.upper()):
                try:
                    facts[f"moe.{n}.keys"] = sorted(map(str, v.keys()))
                except Exception as e:  # some registries are not plain dicts
                    facts[f"moe.{n}.keys"] = f"<{e}>"
            if hasattr(v, "valid_keys") and callable(v.valid_keys):
                try:  # GeneralInterface: valid_keys is an instance method
                    obj = v() if inspect.isclass(v) else v
                    facts[f"moe.{n}.valid_keys"] = sorted(map(str, obj.valid_keys()))
                except Exception as e:
                    facts[f"moe.{n}.valid_keys"] = f"<{type(e).__name__}: {e}>"
    except ImportError as e:
        facts["moe_module"] = f"<transformers.integrations.moe: {e}>"
    from transformers import PretrainedConfig
    facts["PretrainedConfig_experts_attrs"] = [n for n in dir(PretrainedConfig) if "expert" in n.lower()]
    from transformers import PreTrainedModel
    facts["PreTrainedModel_experts_attrs"] = [n for n in dir(PreTrainedModel) if "expert" in n.lower()]
    return facts


def fused_file_fact(per_expert_dir, fused_dir):
    """Does transformers load a checkpoint whose experts are stored fused (gate_up_proj / down_proj), and to
    the same model? (kd may then write either layout.) Rewrites per_expert_dir's file fused, loads both."""
    torch = _torch()
    from safetensors.torch import load_file, save_file
    cfg = json.loads((Path(per_expert_dir) / "config.json").read_text())
    t = load_file(str(Path(per_expert_dir) / "model.safetensors"))
    E = _num_experts(cfg)
    fused = {}
    for name, v in t.items():
        if ".mlp.experts." not in name:
            fused[name] = v
    for l in _sparse_layers(cfg):
        p = f"model.layers.{l}.mlp.experts."
        fused[p + "gate_up_proj"] = torch.stack(
            [torch.cat([t[p + f"{e}.gate_proj.weight"], t[p + f"{e}.up_proj.weight"]], 0) for e in range(E)]).contiguous()
        fused[p + "down_proj"] = torch.stack([t[p + f"{e}.down_proj.weight"] for e in range(E)]).contiguous()
    Path(fused_dir).mkdir(parents=True, exist_ok=True)
    (Path(fused_dir) / "config.json").write_text((Path(per_expert_dir) / "config.json").read_text())
    save_file(fused, str(Path(fused_dir) / "model.safetensors"), metadata={"format": "pt"})
    ids = torch.randint(0, cfg["vocab_size"], (2, 16))
    from transformers import AutoModelForCausalLM
    a = load_hf(per_expert_dir, "float32", "eager", "cpu", experts="eager")
    b, info = AutoModelForCausalLM.from_pretrained(str(fused_dir), dtype=torch.float32, attn_implementation="eager",
                                                   experts_implementation="eager", output_loading_info=True)
    info = {k: v for k, v in info.items() if v}
    diff = float((hf_logits(a, ids) - hf_logits(b.eval(), ids)).abs().max())
    return {"loading_info": {k: sorted(map(str, v))[:8] for k, v in info.items()}, "max_abs_logit_diff": diff}


def run_facts(workdir, out_dir):
    torch = _torch()
    import transformers
    from transformers.models.llama import modeling_llama as ml
    from transformers.models.qwen3_moe import modeling_qwen3_moe as mq

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"GPU: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}")
    full = []
    for arch in ("teacher", "student"):
        d = write_builtin_config(arch, "tiny", Path(workdir) / f"facts-{arch}-tiny", "float32")
        model = build_hf_from_config(d, 0, "float32")
        save_pretrained_single(model, d)
        print_tensor_list(d, f"transformers {transformers.__version__} save_pretrained, {arch} tiny")
        layout, problems = check_layout(d, "float32")
        print(f"    layout vs expected_tensors(): {layout if not problems else problems[:12]}")
        saved = json.loads((d / "config.json").read_text())
        print(f"    config.json written back by save_pretrained: {json.dumps(saved, sort_keys=True)}")
        if arch == "teacher":
            try:
                ef = expert_facts(model)
                for k, v in ef.items():
                    print(f"    {k}: {v}")
            except Exception as e:
                print(f"    expert_facts failed: {type(e).__name__}: {e}")
            try:
                print(f"    a fused-layout file loads as: {fused_file_fact(d, Path(workdir) / 'facts-teacher-tiny-fused')}")
            except Exception as e:
                print(f"    fused-layout file: loading failed: {type(e).__name__}: {e}")
            mlp = model.model.layers[0].mlp
            print(f"    classes: experts {type(mlp.experts).__name__}, router {type(mlp.gate).__name__}, "
                  f"block {type(mlp).__name__}, attention {type(model.model.layers[0].self_attn).__name__}")
            print(f"    config._experts_implementation = {getattr(model.config, '_experts_implementation', '<absent>')!r}")
            for title, obj in (("experts class", type(mlp.experts)), ("experts forward", type(mlp.experts).forward),
                               ("router class", type(mlp.gate)), ("sparse block forward", type(mlp).forward)):
                full.append((f"qwen3_moe {title}", _src(obj)))
        print(f"    config._attn_implementation = {getattr(model.config, '_attn_implementation', '<absent>')!r}")
    for title, obj in (("Qwen3MoeAttention", getattr(mq, "Qwen3MoeAttention", None)),
                       ("Qwen3MoeRMSNorm", getattr(mq, "Qwen3MoeRMSNorm", None)),
                       ("Qwen3MoeRotaryEmbedding", getattr(mq, "Qwen3MoeRotaryEmbedding", None)),
                       ("Qwen3MoeDecoderLayer", getattr(mq, "Qwen3MoeDecoderLayer", None)),
                       ("qwen3_moe apply_rotary_pos_emb", getattr(mq, "apply_rotary_pos_emb", None)),
                       ("qwen3_moe rotate_half", getattr(mq, "rotate_half", None)),
                       ("qwen3_moe eager_attention_forward", getattr(mq, "eager_attention_forward", None)),
                       ("LlamaAttention", getattr(ml, "LlamaAttention", None)),
                       ("LlamaMLP", getattr(ml, "LlamaMLP", None)),
                       ("LlamaRMSNorm", getattr(ml, "LlamaRMSNorm", None))):
        full.append((title, _src(obj) if obj is not None else "<absent>"))
    for mod in ("transformers.integrations.moe", "transformers.conversion_mapping"):
        try:
            import importlib
            full.append((mod, inspect.getsource(importlib.import_module(mod))))
        except Exception as e:
            full.append((mod, f"<{type(e).__name__}: {e}>"))
    try:
        for k, v in experts_impl_facts().items():
            print(f"    experts impl: {k} = {v}")
    except Exception as e:
        print(f"    experts impl facts failed: {type(e).__name__}: {e}")
    # Key source lines, verbatim, so the report can quote them without the full dump.
    print("--- key source lines")
    patterns = ("chunk(", "gate_up_proj", "softmax", "topk", "norm_topk_prob", "router_top_value", "to(",
                "q_norm", "k_norm", "apply_rotary_pos_emb(", "scaling", "rotate_half", "cat((-x2", "variance",
                "rsqrt", "weight *", "act_fn(", "index_add", "inv_freq", "cos()", "emb =")
    for title, src in full:
        if title.startswith("transformers."):
            continue
        hits = [l.rstrip() for l in src.splitlines() if any(p in l for p in patterns) and not l.strip().startswith("#")]
        if hits:
            print(f"[{title}]")
            for l in hits[:30]:
                print(f"    {l}")
    for title, src in full:
        if title == "transformers.conversion_mapping":
            lines = src.splitlines()
            hits = [i for i, l in enumerate(lines) if "qwen3_moe" in l or "gate_up_proj" in l]
            if hits:
                print(f"[{title}: lines naming qwen3_moe / gate_up_proj]")
                for i in hits[:6]:
                    print("    " + "\n    ".join(lines[i:i + 6]))
    if out_dir:
        with open(Path(out_dir) / "hf_facts.txt", "w") as f:
            for title, src in full:
                f.write(f"===== {title}\n{src}\n")
        print(f"full source: {Path(out_dir) / 'hf_facts.txt'}")


# ------------------------------------------------------------------------------------------------------
# The comparison
# ------------------------------------------------------------------------------------------------------
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kd-tool", help="path to kd_model (or a command line), or 'emulate'")
    ap.add_argument("--workdir", default="build-device/hf_compare")
    ap.add_argument("--presets", default="tiny,demo")
    ap.add_argument("--archs", default="teacher,student")
    ap.add_argument("--backends", default="cpu,cuda")
    ap.add_argument("--dtypes", default="float32,bfloat16", help="checkpoint dtypes to test")
    ap.add_argument("--directions", default="hf2kd,kd2hf")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--json", help="results file (default: $OUT/hf_compare.json when OUT is set)")
    ap.add_argument("--facts", action="store_true", help="print transformers facts only (no kd_model needed)")
    args = ap.parse_args()

    out_env = os.environ.get("OUT")
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if args.facts:
        run_facts(workdir, out_env)
        return 0
    if not args.kd_tool:
        ap.error("--kd-tool is required (or --facts)")

    torch = _torch()
    import transformers
    from safetensors.torch import load_file, save_file
    if not torch.cuda.is_available():
        raise SystemExit("hf_compare.py: no CUDA device (the fp32 reference runs on the GPU)")
    strict_fp32()
    log = lambda s: print(s, flush=True)
    tool = KdTool(args.kd_tool, log)
    split = lambda s: [x for x in s.split(",") if x]
    archs, presets, backends = split(args.archs), split(args.presets), split(args.backends)
    dtypes, directions = split(args.dtypes), split(args.directions)
    for a in archs:
        if a not in ARCH_CLASS:
            raise SystemExit(f"unknown arch {a!r} (teacher, student)")
    for d in directions:
        if d not in ("hf2kd", "kd2hf"):
            raise SystemExit(f"unknown direction {d!r} (hf2kd, kd2hf)")
    log(f"torch {torch.__version__}, transformers {transformers.__version__}, GPU {torch.cuda.get_device_name(0)}, "
        f"kd tool: {args.kd_tool}")

    rows, failures = [], []
    printed_teacher_list = False

    def fail(msg):
        failures.append(msg)
        log(f"FAIL: {msg}")

    for arch in archs:
        for preset in presets:
            base = workdir / f"{arch}-{preset}"
            seq = SEQ.get(preset, 256)
            # kd's own config.json for this preset, and a check that it still matches the builtin mirror.
            try:
                tool.config(arch, preset, base / "config")
                kd_cfg = json.loads((base / "config" / "config.json").read_text())
                mirror = kd_config_dict(arch, preset, kd_cfg.get("dtype", "bfloat16"))
                diff = sorted(k for k in set(kd_cfg) | set(mirror) if kd_cfg.get(k) != mirror.get(k))
                if diff:
                    log(f"note: kd's {arch}/{preset} config.json differs from the builtin mirror in {diff} "
                        f"(kd: {[kd_cfg.get(k) for k in diff]}, mirror: {[mirror.get(k) for k in diff]})")
                total, active, _ = parameter_counts(kd_cfg)
                if (arch, preset) in PRESET_COUNTS and (total, active) != PRESET_COUNTS[(arch, preset)]:
                    fail(f"{arch}/{preset}: parameter count {total} ({active} active) differs from config.hpp's "
                         f"{PRESET_COUNTS[(arch, preset)]}")
            except Exception as e:
                fail(f"{arch}/{preset}: kd_model config: {e}")
                continue
            g = torch.Generator().manual_seed(args.seed)
            ids = torch.randint(0, kd_cfg["vocab_size"], (BATCH, seq), generator=g, dtype=torch.int64)

            for direction in directions:
                for ckpt_dtype in dtypes:
                    cases = [c for c in CASES if c[0] == ckpt_dtype and c[1] in backends]
                    if not cases:
                        continue
                    d = base / f"{direction}-{ckpt_dtype}"
                    tag = f"{arch}/{preset} {direction} {ckpt_dtype}"
                    try:
                        # The checkpoint under test.
                        if direction == "hf2kd":
                            d.mkdir(parents=True, exist_ok=True)
                            (d / "config.json").write_text((base / "config" / "config.json").read_text())
                            model = build_hf_from_config(d, args.seed, ckpt_dtype)
                            if sum(p.numel() for p in model.parameters()) != total:
                                raise RuntimeError(f"transformers built {sum(p.numel() for p in model.parameters())} "
                                                   f"parameters, config.hpp's count is {total}")
                            save_pretrained_single(model, d)
                            del model
                        else:
                            tool.init(arch, preset, d, args.seed, ckpt_dtype)
                        layout, problems = check_layout(d, ckpt_dtype)
                        if problems:
                            more = f"\n  ... {len(problems) - 40} more" if len(problems) > 40 else ""
                            raise RuntimeError("tensor layout:\n  " + "\n  ".join(problems[:40]) + more)
                        if arch == "teacher":
                            log(f"{tag}: experts stored {layout}")
                        if arch == "teacher" and preset == "tiny" and not printed_teacher_list:
                            print_tensor_list(d, f"{tag} (experts {layout})")
                            printed_teacher_list = True
                        # References: fp32 eager from the checkpoint's own weights; transformers' own bf16 (sdpa).
                        # MoE: also the reference's routing (ref_routing), written for kd's --routing-in.
                        ref_model = load_hf(d, "float32", "eager", "cuda", experts="eager")
                        ref, ref_routing = hf_forward(ref_model, ids, reference=True)
                        del ref_model
                        routing_ref = None
                        if ref_routing is not None:
                            routing_ref = d / "routing-reference.safetensors"
                            write_routing(ref_routing, routing_ref)
                            margins = torch.cat([r["margin"] for r in ref_routing.values()])
                            log(f"{tag}: reference routing over sparse layers {sorted(ref_routing)} (output_router_logits "
                                f"held {hf_forward.recorded_kind}); margin p_k - p_k+1: min {float(margins.min()):.3g}, "
                                f"median {float(margins.median()):.3g}, < 1e-4: {int((margins < 1e-4).sum())}, "
                                f"< 2e-2: {int((margins < 2e-2).sum())} of {margins.numel()}")
                        hf_bf16 = None
                        if ckpt_dtype == "bfloat16":
                            m = load_hf(d, "bfloat16", "sdpa", "cuda")
                            bf_logits, bf_routing = hf_forward(m, ids)  # transformers' bf16 routes freely
                            hf_bf16 = compare(bf_logits, ref)
                            if bf_routing is not None:
                                hf_bf16["routing"] = routing_agreement(bf_routing, ref_routing, BATCH, seq,
                                                                       TIE_MARGIN["bfloat16"])
                            del m
                        torch.cuda.empty_cache()
                        tokens = d / "tokens.safetensors"
                        save_file({"input_ids": ids.contiguous()}, str(tokens))
                    except Exception as e:
                        fail(f"{tag}: {e}")
                        if not isinstance(e, RuntimeError):
                            traceback.print_exc()
                        continue
                    for _, backend, kd_dtype, tol, min_argmax in cases:
                        row = dict(arch=arch, preset=preset, direction=direction, checkpoint=ckpt_dtype, layout=layout,
                                   backend=backend, kd_dtype=kd_dtype, batch=BATCH, seq=seq, tol_rel_l2=tol,
                                   min_argmax=min_argmax, hf_bf16=hf_bf16 if kd_dtype == "bfloat16" else None)
                        name = f"{tag} kd {backend}/{kd_dtype}"
                        stem = f"{backend}-{kd_dtype}"

                        def kd_logits(out, **routing_files):
                            tool.logits(d, tokens, out, backend, kd_dtype, **routing_files)
                            got = load_file(str(out))
                            if "logits" not in got:
                                raise RuntimeError(f"{out} has no tensor 'logits' (has {sorted(got)})")
                            if got["logits"].dtype != torch.float32:
                                raise RuntimeError(f"{out}: logits are {got['logits'].dtype}, expected float32")
                            return compare(got["logits"], ref)

                        try:
                            reasons = []
                            if ref_routing is None:  # dense: one run, kd routes nothing
                                row.update(kd_logits(d / f"logits-{stem}.safetensors"))
                            else:
                                # (a) free routing; (b) the reference's routing replayed: the numbers under test.
                                tie_limit = TIE_MARGIN[kd_dtype]
                                free_routing = d / f"routing-{stem}-free.safetensors"
                                free = kd_logits(d / f"logits-{stem}-free.safetensors", routing_out=free_routing)
                                row.update({f"free_{k}": v for k, v in free.items()})
                                ra = routing_agreement(read_kd_routing(free_routing, sorted(ref_routing)), ref_routing,
                                                       BATCH, seq, tie_limit)
                                row["routing"] = ra
                                if ra["n_over"]:
                                    reasons.append(f"{ra['n_over']} of {ra['ties']} routing disagreements (free routing, "
                                                   f"no earlier disagreement in their causal cone) have reference "
                                                   f"margin >= {tie_limit:g}: " + "; ".join(ra["over_limit"]))
                                try:
                                    replay_routing = d / f"routing-{stem}-replay.safetensors"
                                    row.update(kd_logits(d / f"logits-{stem}-replay.safetensors", routing_in=routing_ref,
                                                         routing_out=replay_routing))
                                    row["replay"] = "yes"
                                    rr = routing_agreement(read_kd_routing(replay_routing, sorted(ref_routing)),
                                                           ref_routing, BATCH, seq, tie_limit)
                                    row["replay_routing"] = rr
                                    if rr["disagree"]:
                                        reasons.append(f"kd's --routing-out of the replay run differs from the replayed "
                                                       f"choices at {rr['disagree']} (token, layer)")
                                except ReplayUnsupported as e:  # emulate with an old transformers only
                                    row["replay"] = f"skipped ({e})"
                                    row.update(free)
                                    log(f"{name}: replay skipped ({e}); the free-routing run is the one checked")
                            if not row["rel_l2"] <= tol:
                                reasons.append(f"relative L2 {row['rel_l2']:.3g} > {tol:g}"
                                               + (" (replayed routing)" if row.get("replay") == "yes" else ""))
                            if min_argmax is not None and not row["argmax"] >= min_argmax:
                                reasons.append(f"argmax agreement {row['argmax']:.2%} < {min_argmax:.0%}")
                            row["ok"] = not reasons
                            if reasons:
                                fail(f"{name}: " + "; ".join(reasons))
                        except Exception as e:
                            row.update(ok=False, error=str(e))
                            fail(f"{name}: {e}")
                            if not isinstance(e, RuntimeError):
                                traceback.print_exc()
                        rows.append(row)

    # Table.
    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    def agree_cell(ra):
        if not ra:
            return ""
        cell = f"{ra['agree']:.2%}"
        if ra["disagree"]:
            cell += f" ({ra['ties']} tie{'s' if ra['ties'] != 1 else ''}, {ra['downstream']} downstream)"
        return cell

    print()
    print("| arch | preset | direction | ckpt | kd backend/dtype | max abs | rel L2 | argmax | free rel L2 | free argmax | "
          "routing agree | max tie margin | limit | HF bf16 rel L2 | HF bf16 argmax | HF bf16 routing agree | ok |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        hb = r.get("hf_bf16")
        ra = r.get("routing")
        moe = ra is not None or "free_rel_l2" in r
        f = lambda k, spec: format(r[k], spec) if k in r else "-"
        limit = f"{r['tol_rel_l2']:g}{'' if r['min_argmax'] is None else ', ' + format(r['min_argmax'], '.0%')}"
        if moe:
            limit += f"; tie < {TIE_MARGIN[r['kd_dtype']]:g}"
            if r.get("replay", "yes") != "yes":
                limit += " (no replay: free run checked)"
        hb_ra = (hb or {}).get("routing")
        print(f"| {r['arch']} | {r['preset']} | {r['direction']} | {r['checkpoint']} | {r['backend']}/{r['kd_dtype']} | "
              f"{f('max_abs', '.3g')} | {f('rel_l2', '.3g')} | {f('argmax', '.2%')} | "
              f"{f('free_rel_l2', '.3g') if moe else ''} | {f('free_argmax', '.2%') if moe else ''} | "
              f"{agree_cell(ra)} | {fmt(ra['max_tie_margin'], '.3g') if ra else ''} | {limit} | "
              f"{'-' if hb is None else format(hb['rel_l2'], '.3g')} | {'-' if hb is None else format(hb['argmax'], '.2%')} | "
              f"{agree_cell(hb_ra) if hb_ra else '-'} | {'yes' if r.get('ok') else 'NO'} |")
    if any("routing" in r or "free_rel_l2" in r for r in rows):
        print("\nteacher (Qwen3-MoE) rows: max abs / rel L2 / argmax are kd replaying the fp32 reference's expert choices "
              "(--routing-in; weights from kd's own router); free rel L2 / argmax: kd routing itself. routing agree: "
              "(token, sparse layer) pairs whose top-k set equals the reference's in the free run; a tie is a "
              "disagreement with no earlier-layer disagreement at the same or an earlier position of its sequence, "
              "downstream ones follow one; max tie margin: the largest reference p_k - p_(k+1) among ties (limit: "
              "tie < ...). HF bf16 columns: transformers' own bf16 forward of the same checkpoint against the same "
              "reference, routing freely (its routing agree counts the same way). Student rows: no routing.")
    json_path = args.json or (os.path.join(out_env, "hf_compare.json") if out_env else None)
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"transformers": transformers.__version__, "torch": torch.__version__,
                       "gpu": torch.cuda.get_device_name(0), "kd_tool": args.kd_tool, "rows": rows,
                       "failures": failures}, f, indent=1)
        log(f"results: {json_path}")
    if not rows and not failures:
        fail("nothing was compared (check --archs/--presets/--backends/--dtypes/--directions)")
    if failures:
        print(f"\nhf_compare: {len(failures)} failure(s):", file=sys.stderr)
        for m in failures:
            print(f"  {m}", file=sys.stderr)
        return 1
    print(f"\nhf_compare: all {len(rows)} comparisons passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())

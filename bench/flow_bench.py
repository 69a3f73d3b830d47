"""Flux.1-dev and SD3.5 Medium LoRA training memory (issue #16): full-size transformers with random weights.

GPU targets (a device run; peak = torch.cuda.max_memory_allocated over the training steps, text encoders and VAE
already cached and off the GPU as the Trainer does):
  flux_dev_fp8_gc         Flux.1-dev, LoRA rank 16, 1024 px, batch 1, fp8_base + gradient checkpointing  <= 16 GB
  flux_dev_fp8_gc_swap    the same with blocks_to_swap 36                                             <= 10 GB
  sd35_medium_gc          SD3.5 Medium, LoRA rank 16, 1024 px, batch 1, bf16 + gradient checkpointing    <= 10 GB

    python bench/flow_bench.py --targets --out bench_out        # the three cases above, each in its own process
    python bench/flow_bench.py --model flux-dev --fp8-base --gradient-checkpointing --blocks-to-swap 36
    python bench/flow_bench.py --model sd35-medium --dry-run    # size math only (meta device, any machine)

Each case runs the real code paths: the transformer built from the released config (models/flux.py,
models/sd3.py FULL_TRANSFORMER), peft LoRA on flow_names.target_modules, training/memory.py (fp8_base, BlockSwap),
training/flow.py's loss with the run's timestep sampling, AdamW on the LoRA weights. Conditioning tensors have the
cached shapes (Flux: T5 512 x 4096 + pooled 768; SD3: 77 + 256 tokens x 4096 + pooled 2048). --dry-run builds the
model on the meta device and reports parameter counts and the weight / optimizer bytes each option implies.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from types import SimpleNamespace
from typing import Any, Dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from lora_train.models import flow  # noqa: E402
from lora_train.networks import flow_names  # noqa: E402
from lora_train.models.flux import FULL_TRANSFORMER as FLUX_FULL  # noqa: E402
from lora_train.models.sd3 import FULL_TRANSFORMER as SD3_FULL  # noqa: E402
from lora_train.training import flow as ft  # noqa: E402
from lora_train.training.memory import BlockSwap, apply_fp8_base, transformer_blocks  # noqa: E402

GB = 1024 ** 3
TARGETS = [
    ("flux_dev_fp8_gc", ["--model", "flux-dev", "--fp8-base", "--gradient-checkpointing"], 16.0),
    ("flux_dev_fp8_gc_swap", ["--model", "flux-dev", "--fp8-base", "--gradient-checkpointing",
                              "--blocks-to-swap", "36"], 10.0),
    ("sd35_medium_gc", ["--model", "sd35-medium", "--gradient-checkpointing"], 10.0),
]


def build(model: str, device: str):
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    kind = "flux" if model.startswith("flux") else "sd3"
    with init_empty_weights():
        tr = FluxTransformer2DModel(**FLUX_FULL[model]) if kind == "flux" else SD3Transformer2DModel(**SD3_FULL[model])
    if device != "meta":
        tr.to_empty(device="cpu")
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in tr.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).mul_(0.02).to(p.dtype))
    return kind, tr.requires_grad_(False).eval()


def size_math(kind: str, tr, rank: int, fp8: bool, swap: int) -> Dict[str, Any]:
    """Parameter counts and the weight / optimizer bytes each option implies (no activations)."""
    targets = set(flow_names.target_modules(kind, tr))
    named = dict(tr.named_modules())
    lora = sum(rank * (named[t].in_features + named[t].out_features) for t in targets)
    total = sum(p.numel() for p in tr.parameters())
    blocks = transformer_blocks(tr)
    in_blocks_linear = sum(m.weight.numel() for b in blocks for m in b.modules() if isinstance(m, torch.nn.Linear))
    swapped = sum(p.numel() for b in blocks[len(blocks) - swap:] for p in b.parameters()) if swap else 0
    per_block = max(sum(p.numel() for p in b.parameters()) for b in blocks)
    fp8_bytes = in_blocks_linear if fp8 else 0
    weights = (total - in_blocks_linear) * 2 + (in_blocks_linear * (1 if fp8 else 2))
    resident = weights - (swapped * (1 if fp8 else 2)) + (per_block * (1 if fp8 else 2) if swap else 0)
    return {"params": total, "params_in_block_linears": in_blocks_linear, "lora_params": lora,
            "lora_targets": len(targets), "blocks": len(blocks), "swapped_params": swapped,
            "weights_gb": weights / GB, "fp8_weight_gb": fp8_bytes / GB,
            "resident_weights_gb": resident / GB, "lora_train_state_gb": lora * 16 / GB}


def run(a) -> Dict[str, Any]:
    kind, tr = build(a.model, "meta" if a.dry_run else "cpu")
    res: Dict[str, Any] = {"config": vars(a), "size": size_math(kind, tr, a.rank, a.fp8_base, a.blocks_to_swap)}
    if a.dry_run:
        return res
    from lora_train.networks import lora as L

    dev = torch.device(a.device)
    dtype = torch.bfloat16
    tr.to(dtype)
    L.inject(tr, flow_names.target_modules(kind, tr), a.rank, float(a.rank))
    params = L.lora_parameters(tr)
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    if a.fp8_base:
        res["fp8_layers"] = apply_fp8_base(tr, dtype)
    tr.to(dev)
    if a.gradient_checkpointing:
        tr.enable_gradient_checkpointing()
    tr.train()
    swap = BlockSwap(tr, a.blocks_to_swap, dev) if a.blocks_to_swap else None
    model = SimpleNamespace(kind=kind, unet=tr, noise_scheduler=None,
                            extra={"variant": a.model, "guidance_scale": 1.0,
                                   "flow_options": {"weighting_scheme": "none"}})
    h = w = a.resolution // 8
    n = a.batch
    if kind == "flux":
        cond = {"hidden": torch.randn(n, 512, 4096), "pooled": torch.randn(n, 768), "mask": torch.ones(n, 512)}
    else:
        cond = {"hidden": torch.randn(n, 77 + 256, 4096), "pooled": torch.randn(n, 2048)}
    opt = torch.optim.AdamW(params, lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    opts = {"timestep_sampling": "shift" if kind == "flux" else "sigmoid", "discrete_flow_shift": 3.1582,
            "sigmoid_scale": 1.0}
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for step in range(a.warmup + a.steps):
        t0 = time.time()
        lat = torch.randn(n, 16, h, w, generator=gen).to(dev)
        noise = torch.randn(n, 16, h, w, generator=gen).to(dev)
        t = (ft.sample_sigmas(opts, n, (h, w), gen) * 1000).to(dev)
        loss = ft.flow_matching_loss(model, lat, {k: v.to(dev) for k, v in cond.items()}, noise, t, in_dtype=dtype,
                                     autocast=lambda: torch.autocast(dev.type, dtype=dtype))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        losses.append(float(loss))
        if step >= a.warmup:
            times.append(time.time() - t0)
    res.update(s_per_step=sum(times) / len(times), losses=losses,
               peak_vram_gb=torch.cuda.max_memory_allocated() / GB if dev.type == "cuda" else None,
               swap_moves=swap.moves if swap else 0)
    return res


def targets(a) -> int:
    os.makedirs(a.out, exist_ok=True)
    failed, lines = 0, []
    for name, args, limit in TARGETS:
        path = os.path.join(a.out, f"{name}.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--json", path, "--device", a.device, "--steps",
               str(a.steps)] + args
        print("$ " + " ".join(cmd), flush=True)
        rc = subprocess.run(cmd, check=False, timeout=a.timeout).returncode
        if rc != 0 or not os.path.isfile(path):
            failed += 1
            lines.append(f"{name}: bench failed ({rc})")
            continue
        with open(path, encoding="utf-8") as fh:
            v = json.load(fh).get("peak_vram_gb")
        ok = v is not None and v <= limit
        failed += not ok
        lines.append(f"{name}: peak VRAM {'-' if v is None else f'{v:.2f}'} GB (target <= {limit:g} GB) "
                     f"{'OK' if ok else 'MISSED'}")
    print("\n".join(lines))
    return 1 if failed else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=list(FLUX_FULL) + list(SD3_FULL), default="flux-dev")
    ap.add_argument("--resolution", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--fp8-base", action="store_true")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--blocks-to-swap", type=int, default=0)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--targets", action="store_true")
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--json", default="")
    a = ap.parse_args(argv)
    if a.targets:
        return targets(a)
    res = run(a)
    text = json.dumps(res, indent=1, default=str)
    print(text)
    if a.json:
        with open(a.json, "w", encoding="utf-8") as fh:
            fh.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

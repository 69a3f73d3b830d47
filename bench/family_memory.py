"""Peak RSS of training a LoRA on a large transformer of a flow family, on the CPU (issue #27 item 5): the model
stored in bf16 (or fp8 with --fp8), trained through the real Trainer (caches, LoRA injection, optimizer, steps),
against the model's own bytes. Target: peak RSS during training - RSS before it <= 15% of the transformer's bytes +
activations (no second full copy of the base weights).

    python bench/family_memory.py --family qwen_image [--layers 12] [--steps 2] [--fp8] [--out FILE.json]
    python bench/family_memory.py --family qwen_image --gpu      # on a GPU: the released size and GPU_TARGETS

The transformer is the family's diffusers class at the released width (Qwen-Image: 24 heads x 128 = 3072; Z-Image:
3840; Chroma: 3072; Wan 14B: 5120; FLUX.2 klein 4B: 3072) with fewer blocks (--layers) so that it fits this machine, random weights in
bf16; the text encoder and VAE are the family's tiny ones (their memory is not what this measures). Each run is one
process: peak RSS is Linux's VmHWM, reset (clear_refs) after the model is built, so the figure is the training's.
Activations at 64 px (16 x 16 latents) are small; the report states them with the LoRA's and optimizer's bytes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

#: peak VRAM targets for a device run (issue #27 item 5), at the released size, 1024 px, rank 16, batch 1, fp8 base
#: + gradient checkpointing, with the blocks swapped that the advisor's tier names; GB
GPU_TARGETS = {"qwen_image": dict(gb=16.0, layers=60, blocks_to_swap=16),
               "z_image": dict(gb=12.0, layers=30, blocks_to_swap=0),
               "flux2": dict(gb=12.0, layers=20, blocks_to_swap=0)}  # klein 4B (5 double + 20 single); 9B: <= 16 GB

#: family -> (tiny builder module, function, the transformer's config at the released width with `layers` blocks)
FAMILIES = {
    "qwen_image": ("qwen_image", "build_tiny_qwen_image",
                   lambda n: dict(patch_size=2, in_channels=64, out_channels=16, num_layers=n, attention_head_dim=128,
                                  num_attention_heads=24, joint_attention_dim=32, axes_dims_rope=(16, 56, 56))),
    "z_image": ("z_image", "build_tiny_z_image",
                lambda n: dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=3840, n_layers=n,
                               n_refiner_layers=1, n_heads=30, n_kv_heads=30, qk_norm=True, cap_feat_dim=32)),
    "chroma": ("chroma", "build_tiny_chroma",
               lambda n: dict(patch_size=1, in_channels=64, num_layers=max(1, n // 3), num_single_layers=n,
                              attention_head_dim=128, num_attention_heads=24, joint_attention_dim=32,
                              axes_dims_rope=(16, 56, 56))),
    "flux2": ("flux2", "build_tiny_flux2_klein",
              lambda n: dict(patch_size=1, in_channels=32, num_layers=max(1, n // 4), num_single_layers=n,
                             attention_head_dim=128, num_attention_heads=24, joint_attention_dim=48,
                             axes_dims_rope=(32, 32, 32, 32), guidance_embeds=False)),
    "wan": ("wan", "build_tiny_wan",
            lambda n: dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16,
                           out_channels=16, text_dim=32, freq_dim=256, ffn_dim=13824, num_layers=n,
                           cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6)),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--family", required=True, choices=sorted(FAMILIES))
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--fp8", action="store_true", help="fp8_base: block Linear weights stored float8_e4m3fn")
    ap.add_argument("--out", default="")
    ap.add_argument("--gpu", action="store_true", help="on CUDA: the released block count at 1024 px with fp8 + block "
                                                       "swap, peak VRAM against GPU_TARGETS")
    a = ap.parse_args(argv)
    target = GPU_TARGETS.get(a.family) if a.gpu else None
    if a.gpu:
        if target is None:
            ap.error(f"no GPU target for {a.family}: {', '.join(GPU_TARGETS)}")
        a.layers, a.fp8 = target["layers"], True

    import importlib

    import torch

    from lora_train import families
    from lora_train.config import TrainConfig
    from lora_train.data.demo import write_demo_dataset
    from lora_train.models.tiny import seeded
    from lora_train.training.trainer import Trainer
    from step_bench import peak_rss_mb, reset_peak_rss

    mod_name, builder, config = FAMILIES[a.family]
    model = getattr(importlib.import_module(f"lora_train.models.{mod_name}"), builder)()
    import diffusers

    cls = getattr(diffusers, families.get(a.family).transformer_class)
    t0 = time.time()
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # the weights are made in bf16: no fp32 copy ever exists
    try:
        big = seeded(0, lambda: cls(**config(a.layers)))
    finally:
        torch.set_default_dtype(default)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in big.parameters():
            p.normal_(0, 0.02, generator=gen)
    big.eval().requires_grad_(False)
    model.unet = big
    n_params = sum(p.numel() for p in big.parameters())
    model_bytes = sum(p.numel() * p.element_size() for p in big.parameters())
    build_s = time.time() - t0
    with tempfile.TemporaryDirectory() as tmp:
        data = write_demo_dataset(os.path.join(tmp, "data"), n=4, size=64)
        # the tiny VAE halves twice where the released ones halve three times: 512 px here = 1024 px's tokens there
        res_px = 512 if a.gpu else 64
        data = write_demo_dataset(os.path.join(tmp, "data_gpu"), n=4, size=res_px) if a.gpu else data
        cfg = TrainConfig(train_data_dir=data, output_dir=os.path.join(tmp, "out"), output_name="mem", resolution=res_px,
                          lora_rank=a.rank, lora_alpha=float(a.rank), batch_size=1, max_train_steps=a.steps,
                          learning_rate=1e-4, lr_warmup_steps=0, save_every_n_epochs=0, mixed_precision="bf16",
                          gradient_checkpointing=True, fp8_base=a.fp8, seed=1, base_model=model.name,
                          blocks_to_swap=target["blocks_to_swap"] if target else 0,
                          device="cuda" if a.gpu else "cpu").validate()
        if a.gpu:
            torch.cuda.reset_peak_memory_stats()
        reset_peak_rss()
        before = peak_rss_mb()
        t1 = time.time()
        tr = Trainer(cfg, model=model)
        res = tr.run()
        train_s = time.time() - t1
        peak = peak_rss_mb()
        lora = sum(p.numel() * p.element_size() for p in tr.trainable) if getattr(tr, "trainable", None) else 0
    out = dict(family=a.family, layers=a.layers, params=n_params, model_mb=model_bytes / 2 ** 20,
               stored="fp8 blocks + bf16" if a.fp8 else "bf16", steps=res.steps, rank=a.rank,
               rss_before_mb=before, peak_rss_mb=peak, training_extra_mb=peak - before,
               extra_share_of_model=(peak - before) / (model_bytes / 2 ** 20), lora_params_mb=lora / 2 ** 20,
               build_s=build_s, train_s=train_s, losses=res.losses)
    if a.gpu:
        out.update(peak_vram_gb=torch.cuda.max_memory_allocated() / 2 ** 30, target_gb=target["gb"])
        out["target_met"] = out["peak_vram_gb"] <= target["gb"]
        print(f"peak VRAM {out['peak_vram_gb']:.2f} GB (target <= {target['gb']} GB): "
              f"{'met' if out['target_met'] else 'NOT met'}")
    print(json.dumps(out, indent=1))
    print(f"{a.family}: {n_params / 1e9:.2f} B parameters, {out['model_mb']:.0f} MB stored; peak RSS during "
          f"training {peak:.0f} MB, {out['training_extra_mb']:.0f} MB above the loaded model "
          f"({100 * out['extra_share_of_model']:.1f}% of its bytes; target <= 15% + activations)")
    if a.out:
        with open(a.out, "w", encoding="utf-8") as fh:
            json.dump(out, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Generation with LoRA adapters at given strengths, and labelled grids."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
from PIL import Image, ImageDraw

from . import lora as lora_mod
from .models import BaseModel
from .plots import _font


@dataclass
class GenParams:
    prompt: str
    negative_prompt: str = ""
    seed: int = 1
    steps: int = 20
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    sampler: str = "DDIM"


def make_pipeline(model: BaseModel, sampler: str = "DDIM"):
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline

    cls = {"DDIM": DDIMScheduler, "Euler": EulerDiscreteScheduler}.get(sampler, DDIMScheduler)
    sched = cls.from_config(model.noise_scheduler.config)
    pipe = StableDiffusionPipeline(vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer,
                                   unet=model.unet, scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generate(pipe, p: GenParams) -> Image.Image:
    device = pipe.unet.device
    gen = torch.Generator(device="cpu").manual_seed(int(p.seed))
    out = pipe(prompt=p.prompt, negative_prompt=p.negative_prompt or None, num_inference_steps=p.steps,
               guidance_scale=p.cfg_scale, width=p.width, height=p.height, generator=gen, output_type="pil")
    return out.images[0]


def labelled_grid(cells: Sequence[Sequence[Image.Image]], col_labels: Sequence[str], row_labels: Sequence[str],
                  title: str = "", cell_size: Optional[int] = None) -> Image.Image:
    """cells[row][col] -> one image with column headers, row headers and a title line."""
    rows, cols = len(cells), len(cells[0]) if cells else 0
    w, h = cells[0][0].size if rows and cols else (64, 64)
    if cell_size:
        scale = cell_size / max(w, h)
        w, h = max(1, round(w * scale)), max(1, round(h * scale))
    f = _font(12)
    left = 8 + max([int(_font(12).getlength(s)) for s in row_labels] + [40])
    top_title = 22 if title else 0
    top = top_title + 20
    grid = Image.new("RGB", (left + cols * w + 4, top + rows * h + 4), "white")
    d = ImageDraw.Draw(grid)
    if title:
        d.text((4, 4), title[:200], fill="black", font=f)
    for c, lab in enumerate(col_labels):
        d.text((left + c * w + 4, top_title + 3), lab, fill="black", font=f)
    for r, lab in enumerate(row_labels):
        d.text((4, top + r * h + h // 2 - 6), lab, fill="black", font=f)
        for c in range(cols):
            im = cells[r][c]
            if im.size != (w, h):
                im = im.resize((w, h), Image.NEAREST)
            grid.paste(im, (left + c * w, top + r * h))
    return grid


def strength_grid(model: BaseModel, lw: "lora_mod.LoraWeights", prompt: str, strengths: Sequence[float],
                  seeds: Sequence[int], steps: int = 20, cfg_scale: float = 7.0, size: Optional[int] = None,
                  adapter: str = "grid", cell_size: Optional[int] = None) -> Image.Image:
    """Strengths across, seeds down, base (strength 0) column always first."""
    strengths = [0.0] + [s for s in strengths if s != 0.0]
    size = size or model.native_resolution
    lora_mod.apply(model, lw, adapter, 1.0)
    pipe = make_pipeline(model)
    try:
        rows = []
        for seed in seeds:
            row = []
            for s in strengths:
                lora_mod.set_strength(model.unet, s, adapter)
                lora_mod.set_strength(model.text_encoder, s, adapter)
                row.append(generate(pipe, GenParams(prompt=prompt, seed=seed, steps=steps, cfg_scale=cfg_scale,
                                                    width=size, height=size)))
            rows.append(row)
    finally:
        lora_mod.remove_adapter(model.unet, adapter)
        lora_mod.remove_adapter(model.text_encoder, adapter)
    return labelled_grid(rows, [f"w={s:g}" + (" (base)" if s == 0 else "") for s in strengths],
                         [f"seed {s}" for s in seeds], title=f"{prompt} | steps {steps}, DDIM, cfg {cfg_scale:g}", cell_size=cell_size)

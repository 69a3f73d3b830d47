"""Generation with LoRA adapters at given strengths, `<lora:name:w>` prompts, and labelled A/B grids.

The grid logic (axes, labels, strength-0 base column, PNG parameters) is written once in `build_grid`,
which takes any `generate(GenParams) -> PIL.Image`: our diffusers pipeline here, the WebUI's txt2img or
ComfyUI's sampler in the hosts.
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from PIL import Image, ImageDraw
from PIL.PngImagePlugin import PngInfo

from . import __version__, families
from .networks import delta as delta_mod
from .networks import lora as lora_mod
from .models import conditioning, flow, text_chunks
from .models.base import BaseModel
from .plots import _font
from .prompt import LoraLibrary, LoraTag, parse_prompt, with_strength
from .io_utils import save_image

SAMPLERS = ("DDIM", "Euler", "Euler a", "DPM++ 2M")


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
    model_name: str = ""
    model_hash: str = ""
    lora_hashes: Dict[str, str] = field(default_factory=dict)

    def infotext(self) -> str:
        """The WebUI's `parameters` text (read by PNG Info and ComfyUI loaders)."""
        lines = [self.prompt]
        if self.negative_prompt:
            lines.append(f"Negative prompt: {self.negative_prompt}")
        items = [f"Steps: {self.steps}", f"Sampler: {self.sampler}", f"CFG scale: {self.cfg_scale:g}",
                 f"Seed: {self.seed}", f"Size: {self.width}x{self.height}"]
        if self.model_hash:
            items.append(f"Model hash: {self.model_hash}")
        if self.model_name:
            items.append(f"Model: {self.model_name}")
        if self.lora_hashes:
            items.append('Lora hashes: "' + ", ".join(f"{k}: {v}" for k, v in self.lora_hashes.items()) + '"')
        items.append(f"Version: lora_train {__version__}")
        lines.append(", ".join(items))
        return "\n".join(lines)


def pnginfo(params: GenParams) -> PngInfo:
    info = PngInfo()
    info.add_text("parameters", params.infotext())
    return info


def file_hash(path: str) -> str:
    """The WebUI's short LoRA hash: sha256 of the file, first 12 hex digits."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:12]


# ----------------------------------------------------------------------------- diffusers generation
def flow_pipeline(model: BaseModel):
    """diffusers' FluxPipeline / StableDiffusion3Pipeline for a flow-matching model (every sampler name runs their
    flow-matching Euler scheduler); T5's max length is the one the model trains with."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler.from_config(model.noise_scheduler.config)
    pipe = families.of(model).pipeline(model, sched)
    pipe.set_progress_bar_config(disable=True)
    pipe._lora_train_call_kwargs = families.of(model).call_kwargs
    pipe._lora_train_image = families.of(model).image_of
    pipe._lora_train_model = model
    return pipe


def make_pipeline(model: BaseModel, sampler: str = "DDIM"):
    if flow.is_flow(model):  # Flux / SD3 (models/flow.py)
        return flow_pipeline(model)
    from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                           EulerDiscreteScheduler, StableDiffusionPipeline)

    cls = {"DDIM": DDIMScheduler, "Euler": EulerDiscreteScheduler, "Euler a": EulerAncestralDiscreteScheduler,
           "DPM++ 2M": DPMSolverMultistepScheduler}.get(sampler)
    if cls is None:
        raise ValueError(f"sampler '{sampler}' is not known: use one of {', '.join(SAMPLERS)}.")
    sched = cls.from_config(model.noise_scheduler.config)
    if model.text_encoder_2 is not None:
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline(vae=model.vae, text_encoder=model.text_encoder,
                                         text_encoder_2=model.text_encoder_2, tokenizer=model.tokenizer,
                                         tokenizer_2=model.tokenizer_2, unet=model.unet, scheduler=sched)
    else:
        pipe = StableDiffusionPipeline(vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer,
                                       unet=model.unet, scheduler=sched, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def run_pipeline(pipe, p: GenParams, prompt_text: Optional[str] = None, **pipe_kwargs: Any) -> Image.Image:
    gen = torch.Generator(device="cpu").manual_seed(int(p.seed))
    embeds = "prompt_embeds" in pipe_kwargs  # text conditioning given (kohya clip_skip / long prompts)
    kw = dict(prompt=None if embeds else prompt_text if prompt_text is not None else p.prompt,
              negative_prompt=None if embeds else p.negative_prompt or None, num_inference_steps=p.steps,
              guidance_scale=p.cfg_scale, width=p.width, height=p.height, generator=gen, output_type="pil")
    family_kwargs = getattr(pipe, "_lora_train_call_kwargs", None)  # a flow family's own arguments (flow_pipeline)
    if family_kwargs is not None:
        kw = family_kwargs(pipe._lora_train_model, kw)
    out = pipe(**kw, **pipe_kwargs)
    return getattr(pipe, "_lora_train_image", lambda o: o.images[0])(out)


def _adapter_id(path: str) -> str:
    return "f_" + re.sub(r"[^0-9a-zA-Z_]", "_", os.path.splitext(os.path.basename(path))[0])


class Generator:
    """Standalone generation: base model + kohya files loaded as named peft adapters, weights per prompt.

    Files are cached by (path, size, mtime), so a file rewritten under the same name is reloaded (the stale
    cache that WebUI and Forge show, avoided here).
    """

    def __init__(self, model: BaseModel, lora_dirs: Sequence[str] = (), device: Optional[str] = None):
        self.model = model
        self.library = LoraLibrary(lora_dirs)
        self.loaded: Dict[str, Tuple[Tuple[int, float], str]] = {}  # path -> (stamp, adapter)
        self._pipes: Dict[str, object] = {}
        if device:
            model.to(device)

    def _modules(self):
        held = families.of(self.model).held_modules(self.model)  # Wan 2.2 A14B: the other expert
        return [("unet", self.model.unet)] + held + [("te", te) for te in self.model.text_encoders]

    def _load(self, path: str) -> str:
        st = os.stat(path)
        stamp = (st.st_size, st.st_mtime)
        have = self.loaded.get(path)
        if have and have[0] == stamp:
            return have[1]
        adapter = _adapter_id(path)
        if have:
            self._unload(have[1])
        lw = lora_mod.load_file(path, self.model)
        lora_mod.apply(self.model, lw, adapter, 1.0)
        self.loaded[path] = (stamp, adapter)
        return adapter

    def _unload(self, adapter: str) -> None:
        for _, m in self._modules():
            lora_mod.remove_adapter(m, adapter)

    def _set_weights(self, weights: Dict[str, Tuple[float, float]]) -> None:
        """Activate exactly the adapters in `weights` (adapter -> (te, unet)); others off."""
        for comp, mod in self._modules():
            for _, layer in mod.named_modules():
                la = getattr(layer, "lora_A", None)
                if not isinstance(la, torch.nn.ModuleDict):
                    continue
                active = [a for a in weights if a in la]
                layer.set_adapter(active)
                for a in active:
                    w = weights[a][1] if comp == "unet" else weights[a][0]
                    layer.scaling[a] = float(w) * float(layer.lora_alpha[a]) / float(layer.r[a])
            delta_mod.set_active(mod, list(weights))  # LoHa / LoKr / DoRA layers (networks/delta.py)
            for a, (te_w, unet_w) in weights.items():
                delta_mod.set_strength(mod, unet_w if comp == "unet" else te_w, a)
            mod.requires_grad_(False)

    def pipeline(self, sampler: str):
        if sampler not in self._pipes:
            self._pipes[sampler] = make_pipeline(self.model, sampler)
        return self._pipes[sampler]

    def resolve_tags(self, tags: List[LoraTag]) -> List[Tuple[LoraTag, str]]:
        return [(t, self.library.resolve(t.name)) for t in tags]

    def generate(self, p: GenParams) -> Image.Image:
        text, tags = parse_prompt(p.prompt)
        weights: Dict[str, Tuple[float, float]] = {}
        for tag, path in self.resolve_tags(tags):
            adapter = self._load(path)
            te, un = weights.get(adapter, (0.0, 0.0))
            weights[adapter] = (te + tag.te, un + tag.unet)
            p.lora_hashes[tag.name] = file_hash_safe(path)
        self._set_weights(weights)
        p.model_name = p.model_name or self.model.name
        p.model_hash = p.model_hash or self.model.model_hash()[:10]
        return run_pipeline(self.pipeline(p.sampler), p, prompt_text=text)

    __call__ = generate


# ----------------------------------------------------------------------------- grids
def labelled_grid(cells: Sequence[Sequence[Image.Image]], col_labels: Sequence[str], row_labels: Sequence[str],
                  title: str = "", cell_size: Optional[int] = None) -> Image.Image:
    """cells[row][col] -> one image with column headers, row headers and a title line."""
    rows, cols = len(cells), len(cells[0]) if cells else 0
    w, h = cells[0][0].size if rows and cols else (64, 64)
    if cell_size:
        scale = cell_size / max(w, h)
        w, h = max(1, round(w * scale)), max(1, round(h * scale))
    f = _font(12)
    left = 8 + max([int(f.getlength(s)) for s in row_labels] + [40])
    title_lines = _wrap(title, max(40, (left + cols * w) // 7)) if title else []
    top_title = 4 + 15 * len(title_lines)
    top = top_title + 20
    grid = Image.new("RGB", (left + cols * w + 4, top + rows * h + 4), "white")
    d = ImageDraw.Draw(grid)
    for i, line in enumerate(title_lines):
        d.text((4, 4 + 15 * i), line, fill="black", font=f)
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


def _wrap(text: str, width: int) -> List[str]:
    words, lines, cur = text.split(), [], ""
    for wd in words:
        if cur and len(cur) + 1 + len(wd) > width:
            lines.append(cur)
            cur = wd
        else:
            cur = f"{cur} {wd}".strip()
    return lines + ([cur] if cur else [])


@dataclass
class Cell:
    row: int
    col: int
    image: Image.Image
    params: GenParams


@dataclass
class GridResult:
    image: Image.Image
    cells: List[Cell]
    col_labels: List[str]
    row_labels: List[str]
    title: str
    rows: int
    cols: int

    def save(self, folder: str, stem: str) -> List[str]:
        """Write the grid and each cell (with its `parameters` chunk); never overwrites (adds -N)."""
        os.makedirs(folder, exist_ok=True)

        def free(name: str) -> str:
            path, n = os.path.join(folder, name + ".png"), 2
            while os.path.exists(path):
                path = os.path.join(folder, f"{name}-{n}.png")
                n += 1
            return path

        out = [free(stem + "_grid")]
        save_image(self.image, out[0], pnginfo(self.cells[0].params) if self.cells else None)
        for c in self.cells:
            p = free(f"{stem}_r{c.row}_c{c.col}")
            save_image(c.image, p, pnginfo(c.params))
            out.append(p)
        return out


def build_grid(generate: Callable[[GenParams], Image.Image], base: GenParams, lora_name: str,
               strengths: Sequence[float], seeds: Optional[Sequence[int]] = None,
               epochs: Optional[Sequence[Tuple[str, str]]] = None, cell_size: Optional[int] = None,
               progress: Optional[Callable[[int, int], None]] = None) -> GridResult:
    """Strengths across (a strength-0 base column always first), rows = seeds, or epochs x seeds.

    base.prompt may hold `<lora:lora_name:w>` (its weight is replaced per column; other tags stay).
    epochs: [(label, lora name of that epoch file)], e.g. [("epoch 2", "x-000002"), ("final", "x")].
    """
    cols = [0.0] + [float(s) for s in strengths if float(s) != 0.0]
    seeds = list(seeds) if seeds else [base.seed]
    rows: List[Tuple[str, str, int]] = []  # (label, lora name, seed)
    if epochs:
        for label, name in epochs:
            for s in seeds:
                rows.append((f"{label}, seed {s}" if len(seeds) > 1 else label, name, s))
    else:
        rows = [(f"seed {s}", lora_name, s) for s in seeds]
    total, done = len(rows) * len(cols), 0
    base_cache: Dict[int, Tuple[Image.Image, GenParams]] = {}
    grid_cells: List[List[Image.Image]] = []
    cells: List[Cell] = []
    for r, (label, name, seed) in enumerate(rows):
        row_imgs = []
        for c, s in enumerate(cols):
            if s == 0.0 and seed in base_cache:  # the base image does not depend on the epoch
                img, p = base_cache[seed]
            else:
                prompt = with_strength(base.prompt, lora_name, 0.0)
                prompt = with_strength(prompt, name, s) if s != 0.0 else prompt
                p = replace(base, prompt=prompt, seed=seed, lora_hashes={})
                img = generate(p)
                if s == 0.0:
                    base_cache[seed] = (img, p)
            row_imgs.append(img)
            cells.append(Cell(r, c, img, p))
            done += 1
            if progress:
                progress(done, total)
        grid_cells.append(row_imgs)
    col_labels = ["base (0)"] + [f"{s:g}" for s in cols[1:]]
    title = (f"{base.prompt} | neg: {base.negative_prompt or '-'} | steps {base.steps}, {base.sampler}, "
             f"CFG {base.cfg_scale:g}, {base.width}x{base.height}, LoRA {lora_name}")
    image = labelled_grid(grid_cells, col_labels, [r[0] for r in rows], title=title, cell_size=cell_size)
    return GridResult(image=image, cells=cells, col_labels=col_labels, row_labels=[r[0] for r in rows],
                      title=title, rows=len(rows), cols=len(cols))


def epoch_axis(library: LoraLibrary, name: str) -> List[Tuple[str, str]]:
    """[(label, lora name)] for all epoch files of a run plus the final."""
    out = []
    for epoch, path in library.epochs_of(name):
        stem = os.path.splitext(os.path.basename(path))[0]
        out.append((f"epoch {epoch}" if epoch is not None else "final", stem))
    return out


# ----------------------------------------------------------------------------- in-memory (during training)
@torch.no_grad()
def sample_in_training(model: BaseModel, adapter: str, prompts: Sequence[str], seed: int, steps: int,
                       cfg_scale: float, size: int, negative: str = "") -> Image.Image:
    """A strength-1 row and the base row for each prompt, with the adapter being trained."""
    pipe = make_pipeline(model)
    mods = [model.unet] + list(model.text_encoders)
    rows, labels = [], []
    # kohya clip_skip / long prompts (models/text_chunks.py): SD1/SD2 samples get the trained text conditioning
    own_text = text_chunks.active(model) and model.text_encoder_2 is None
    was_training = model.unet.training
    model.unet.eval()
    try:
        for pr in prompts:
            text, _ = parse_prompt(pr)
            row = []
            for w in (0.0, 1.0):
                for m in mods:
                    for _, layer in lora_mod.lora_layers(m, adapter):
                        layer.set_adapter([adapter] if w else [])
                    delta_mod.set_active(m, [adapter] if w else [])
                p = GenParams(prompt=text, negative_prompt=negative, seed=seed, steps=steps, cfg_scale=cfg_scale,
                              width=size, height=size)
                pipe_kwargs = {}
                if own_text:
                    dev = next(model.unet.parameters()).device
                    pipe_kwargs = {"prompt_embeds": conditioning.encode(model, [text], dev),
                                   "negative_prompt_embeds": conditioning.encode(model, [negative or ""], dev)}
                row.append(run_pipeline(pipe, p, **pipe_kwargs))
            rows.append(row)
            labels.append(text[:40])
    finally:
        for m in mods:
            for _, layer in lora_mod.lora_layers(m, adapter):
                layer.set_adapter([adapter])
            delta_mod.set_active(m, [adapter])
            for p in lora_mod.lora_parameters(m, adapter):
                p.requires_grad_(True)
        model.unet.train(was_training)
    return labelled_grid(rows, ["base (0)", "LoRA (1)"], labels, title=f"seed {seed}, steps {steps}",
                         cell_size=max(size, 128))


def file_hash_safe(path: str) -> str:
    return file_hash(path) if os.path.isfile(path) else ""

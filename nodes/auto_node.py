"""The "Auto LoRA" ComfyUI node: an image folder and the graph's MODEL / CLIP / VAE in, a published LoRA (the
epoch with the best validation loss), its A/B grid and the report out (lora_train/auto/pipeline.py)."""
from __future__ import annotations

import logging
from typing import Any, Dict

from lora_train.config import DEFAULT_NAME
from lora_train.family import FAMILIES as MODEL_FAMILIES
from lora_train.hosts.comfyui import ComfyUIHost, pil_to_image
from lora_train.prompt import parse_floats, parse_ints
from lora_train.tuning.advisor import TASKS

from .names import CATEGORY

log = logging.getLogger("lora_train.comfyui")
FAMILIES = ("auto",) + MODEL_FAMILIES


class LoraTrainAuto:
    DESCRIPTION = ("Auto LoRA: checks the folder (refuses one that cannot train), captions the images without a "
                   "caption, takes the advisor's settings (a non-zero widget below overrides its choice), trains on "
                   "the graph's model with a held-out validation split, publishes the epoch with the best "
                   "validation loss under the name, draws a base / best / last grid and returns the report.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The base model to train on (MODEL of a checkpoint loader)."}),
            "clip": ("CLIP", {"tooltip": "Its text encoder (CLIP of the same loader)."}),
            "vae": ("VAE", {"tooltip": "Its VAE; encodes the training images and decodes the grid."}),
            "folder": ("STRING", {"default": "", "tooltip": "Image folder (absolute, or relative to ComfyUI's input "
                                                            "folder). Captions are written only for images without one."}),
            "lora_name": ("STRING", {"default": DEFAULT_NAME, "tooltip": "Name of the LoRA (a free name is taken when it "
                                                                      "exists: my_lora_v2, ...); also the trigger word "
                                                                      "unless one is given."}),
            "task": (list(TASKS), {"default": "style", "tooltip": "What you train: sets rank, lr and epochs."}),
            "family": (list(FAMILIES), {"default": "auto", "tooltip": "Base model family for the advice (auto: SD1.x "
                                                                      "unless the graph's model says otherwise)."}),
            "vram_gb": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 256.0, "step": 1.0,
                                  "tooltip": "GPU memory for the advice; 0 = detect."}),
            "trigger_word": ("STRING", {"default": "", "tooltip": "Trigger word for new captions; empty = the name."}),
            "learning_rate": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 1e-5, "round": False,
                                        "tooltip": "0 = the advisor's; any other value overrides it."}),
            "rank": ("INT", {"default": 0, "min": 0, "max": 256, "tooltip": "0 = the advisor's rank."}),
            "epochs": ("INT", {"default": 0, "min": 0, "max": 10000, "tooltip": "0 = the advisor's epochs."}),
            "resolution": ("INT", {"default": 0, "min": 0, "max": 4096, "step": 64,
                                   "tooltip": "Training and grid size in pixels; 0 = the family's native size."}),
            "lr_range_test": ("BOOLEAN", {"default": False, "tooltip": "Run an LR range test first (about 100 "
                                                                        "extra steps) and use its learning rate."}),
            "strengths": ("STRING", {"default": "0.5, 0.75, 1", "tooltip": "Grid strengths (a base column is added)."}),
            "seeds": ("STRING", {"default": "1, 2", "tooltip": "Grid seeds (rows)."}),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    RETURN_TYPES = ("STRING", "STRING", "IMAGE", "STRING")
    RETURN_NAMES = ("lora_name", "lora_path", "grid", "report")
    OUTPUT_TOOLTIPS = ("The published LoRA as ComfyUI lists it.", "Full path of the file.",
                       "Base / best / last epoch at the strengths.", "The report (Markdown, also report.md in the "
                                                                     "run folder).")
    FUNCTION = "auto"
    CATEGORY = CATEGORY
    OUTPUT_NODE = True

    def auto(self, model, clip, vae, folder, lora_name, task, family, vram_gb, trigger_word, learning_rate, rank,
             epochs, lr_range_test, strengths, seeds, resolution=0, unique_id=None):
        import os

        from PIL import Image

        from lora_train.auto.pipeline import AutoOptions, run_auto

        from .common import clean_lora_name
        from .nodes_dataset import LoraTrainDatasetFromFolder

        host = ComfyUIHost(model, clip, vae, node_id=unique_id)
        overrides: Dict[str, Any] = {}
        if learning_rate and learning_rate > 0:
            overrides["learning_rate"] = float(learning_rate)
        if rank and rank > 0:
            overrides["lora_rank"] = int(rank)
        if epochs and epochs > 0:
            overrides["epochs"] = int(epochs)
        if resolution and resolution > 0:
            overrides["resolution"] = int(resolution)
        opts = AutoOptions(folder=LoraTrainDatasetFromFolder.resolve_folder(folder), name=clean_lora_name(lora_name),
                           task=task, base=None, family=None if family == "auto" else family,
                           vram=float(vram_gb) if vram_gb else None, trigger=(trigger_word or "").strip() or None,
                           lr_find=bool(lr_range_test), strengths=parse_floats(strengths, "strengths") or [1.0],
                           seeds=parse_ints(seeds, "seeds") or [1], overrides=overrides, rename=True)

        def on_event(ev: Dict[str, Any]) -> None:
            if ev.get("kind") == "step":
                host.progress(int(ev["step"]), int(ev["total_steps"]))

        res = run_auto(host, opts, callback=on_event, log=log.info)
        loras_dir = host.output_dir()
        listed = os.path.relpath(res.lora_path, loras_dir).replace(os.sep, "/")
        if res.grid_path and os.path.isfile(res.grid_path):
            with Image.open(res.grid_path) as im:
                grid = im.convert("RGB")
        else:
            grid = Image.new("RGB", (64, 64), "white")
        return {"ui": {"text": [res.report]}, "result": (listed, res.lora_path, pil_to_image(grid), res.report)}

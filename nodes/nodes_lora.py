"""ComfyUI nodes: using LoRAs (apply, prompt tags, the strength / epoch sweep through ComfyUI's sampler)."""
from __future__ import annotations

import os
from typing import List, Tuple

from lora_train.hosts.comfyui import ComfyUIHost, pil_to_image
from lora_train.prompt import parse_floats, parse_ints

from .common import lora_stem
from .names import CATEGORY


# ============================================================================= using LoRAs
def _lora_list() -> List[str]:
    import folder_paths

    return folder_paths.get_filename_list("loras")


class LoraTrainApplyLora:
    DESCRIPTION = "Apply a LoRA to MODEL and CLIP with ComfyUI's own LoRA loader."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model the LoRA is applied to."}),
            "clip": ("CLIP", {"tooltip": "The text encoder the LoRA is applied to."}),
            "lora_name": (_lora_list(), {"tooltip": "A LoRA from the loras folder."}),
            "strength_model": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.05,
                                         "tooltip": "Strength on the UNet (0 = off)."}),
            "strength_clip": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.05,
                                        "tooltip": "Strength on the text encoder (0 = off)."}),
        }, "optional": {
            "lora_override": ("STRING", {"forceInput": True, "tooltip": "Connect Train LoRA's lora_name here to use "
                                                                       "the file it just wrote instead of the list."}),
        }}

    RETURN_TYPES = ("MODEL", "CLIP")
    RETURN_NAMES = ("model", "clip")
    OUTPUT_TOOLTIPS = ("The model with the LoRA.", "The text encoder with the LoRA.")
    FUNCTION = "apply"
    CATEGORY = CATEGORY

    def apply(self, model, clip, lora_name, strength_model, strength_clip, lora_override=None):
        name = lora_override if lora_override else lora_name
        host = ComfyUIHost(model, clip)
        return host.apply_lora(model, clip, name, float(strength_model), float(strength_clip))


class LoraTrainPromptWithTags:
    DESCRIPTION = ("A prompt with <lora:name:weight> tags (as in the WebUI): the tags are applied through ComfyUI's "
                   "LoRA loader and removed from the text, which is encoded as CONDITIONING.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model the tagged LoRAs are applied to."}),
            "clip": ("CLIP", {"tooltip": "The text encoder (LoRAs applied, then encodes the text)."}),
            "text": ("STRING", {"multiline": True, "dynamicPrompts": False, "default": "a photo <lora:my_lora:0.8>",
                                "tooltip": "Prompt; <lora:name:w> or <lora:name:te=0.5:unet=0.8> tags name LoRAs "
                                           "in the loras folder by file name."}),
        }}

    RETURN_TYPES = ("MODEL", "CLIP", "STRING", "CONDITIONING")
    RETURN_NAMES = ("model", "clip", "text", "conditioning")
    OUTPUT_TOOLTIPS = ("Model with the LoRAs.", "Text encoder with the LoRAs.", "The prompt without the tags.",
                       "The encoded prompt.")
    FUNCTION = "apply"
    CATEGORY = CATEGORY

    def apply(self, model, clip, text):
        host = ComfyUIHost(model, clip)
        model, clip, cleaned, _tags = host.apply_prompt_loras(model, clip, text)
        return (model, clip, cleaned, host.encode(clip, cleaned))


def _sampler_choices() -> Tuple[List[str], List[str]]:
    try:
        import comfy.samplers

        return list(comfy.samplers.KSampler.SAMPLERS), list(comfy.samplers.KSampler.SCHEDULERS)
    except Exception:  # noqa: BLE001 - outside ComfyUI
        return ["euler"], ["normal"]


class LoraTrainStrengthSweep:
    DESCRIPTION = ("A labelled grid: the LoRA at several strengths (base = strength 0 column first) x seeds, or x "
                   "epoch files; every cell made with ComfyUI's sampler and LoRA loader.")

    @classmethod
    def INPUT_TYPES(cls):
        samplers, schedulers = _sampler_choices()
        return {"required": {
            "model": ("MODEL", {"tooltip": "Base model (without the LoRA)."}),
            "clip": ("CLIP", {"tooltip": "Base text encoder."}),
            "vae": ("VAE", {"tooltip": "Decodes the samples."}),
            "lora_name": ("STRING", {"default": "", "tooltip": "The LoRA: a name from the loras folder, or connect "
                                                               "Train LoRA's lora_name."}),
            "prompt": ("STRING", {"multiline": True, "dynamicPrompts": False, "default": "a photo",
                                  "tooltip": "Prompt; the LoRA tag is added per column (other <lora:...> tags stay)."}),
            "negative": ("STRING", {"multiline": True, "dynamicPrompts": False, "default": "",
                                    "tooltip": "Negative prompt."}),
            "strengths": ("STRING", {"default": "0.5, 1.0", "tooltip": "Comma-separated strengths; the base column "
                                                                      "(0) is always added first."}),
            "seeds": ("STRING", {"default": "1", "tooltip": "Comma-separated seeds, one row each."}),
            "steps": ("INT", {"default": 20, "min": 1, "max": 1000, "tooltip": "Sampling steps."}),
            "cfg": ("FLOAT", {"default": 7.0, "min": 0.0, "max": 100.0, "step": 0.1, "tooltip": "CFG scale."}),
            "sampler_name": (samplers, {"tooltip": "ComfyUI sampler."}),
            "scheduler": (schedulers, {"tooltip": "ComfyUI scheduler."}),
            "width": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 8, "tooltip": "Image width."}),
            "height": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 8, "tooltip": "Image height."}),
            "epochs_axis": ("BOOLEAN", {"default": False, "tooltip": "Rows = the run's epoch files (name-00000N) and "
                                                                     "the final, for each seed."}),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    RETURN_TYPES = ("IMAGE", "IMAGE", "STRING")
    RETURN_NAMES = ("grid", "cells", "info")
    OUTPUT_TOOLTIPS = ("The labelled grid image.", "Every cell as a batch, row by row (base column first).",
                       "Columns, rows and generation parameters.")
    FUNCTION = "sweep"
    CATEGORY = CATEGORY

    def sweep(self, model, clip, vae, lora_name, prompt, negative, strengths, seeds, steps, cfg, sampler_name,
              scheduler, width, height, epochs_axis, unique_id=None):
        from lora_train.prompt import LoraLibrary
        from lora_train.sampler import GenParams, build_grid, epoch_axis

        host = ComfyUIHost(model, clip, vae, sampler_name=sampler_name, scheduler=scheduler, node_id=unique_id)
        path = host.resolve_lora(lora_name)
        stem = lora_stem(path)
        strength_list = parse_floats(strengths, "strengths")
        seed_list = parse_ints(seeds, "seeds")
        base = GenParams(prompt=str(prompt or ""), negative_prompt=str(negative or ""), seed=seed_list[0],
                         steps=int(steps), cfg_scale=float(cfg), width=int(width), height=int(height),
                         sampler=f"{sampler_name} {scheduler}")
        epochs = epoch_axis(LoraLibrary([os.path.dirname(path)]), stem) if epochs_axis else None
        grid = build_grid(host.generate, base, stem, strength_list, seed_list, epochs=epochs,
                          progress=lambda d, t: host.progress(d, t))
        info = (f"{grid.title}\ncolumns: {', '.join(grid.col_labels)}\nrows: {', '.join(grid.row_labels)}\n"
                f"LoRA file: {path}")
        import torch

        cells = torch.cat([pil_to_image(c.image) for c in grid.cells], dim=0)
        return (pil_to_image(grid.image), cells, info)

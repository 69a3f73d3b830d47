"""Test helper: a tiny model of a 2026 family as a Forge Neo user has it. Forge Neo (Haoming02's neo branch of
sd-webui-forge-classic) loads the checkpoint plus the "VAE / Text Encoder" files picked in its top bar, and takes
every config, tokenizer and scheduler from the folder it bundles per supported model, backend/huggingface/<org>/
<repo>/ (model_index.json naming each part's class, <part>/config.json, tokenizer/, scheduler/; no weights). This
writes both: `neo_config_folder` the bundled folder of the tiny model (its own configs in that tree), `split_files`
the tiny model's transformer, VAE and text encoder files in the layouts Comfy-Org's split files have (which Neo
reads): the transformer in its original layout under `model.diffusion_model.` (tests/single_file_layouts.py), the
VAE in Wan 2.1's original layout (Qwen-Image, Wan) or Flux's ae / LDM layout (Z-Image, Chroma), the text encoder
as ComfyUI ships it (single_file_layouts.comfy_text_encoder).

Qwen-Image's and Wan's VAEs here have the released structure (4 levels, 2 residual blocks: diffusers'
convert_wan_vae_to_diffusers is written for it) at a tiny width; the other parts are the tiny models'."""
import json
import os

import torch
from safetensors.torch import save_file

from ldm_writers import vae_to_ldm
from single_file_layouts import comfy_text_encoder, original_layout, wan_vae_original_layout

#: family -> (Neo's bundled repo folder, its model_index.json's pipeline class, the released file names)
NEO = {"qwen_image": ("Qwen/Qwen-Image", "QwenImagePipeline",
                      ("qwen_image_bf16.safetensors", "qwen_image_vae.safetensors", "qwen_2.5_vl_7b.safetensors")),
       "z_image": ("Tongyi-MAI/Z-Image-Turbo", "ZImagePipeline",
                   ("z_image_turbo_bf16.safetensors", "ae.safetensors", "qwen_3_4b.safetensors")),
       "wan": ("Wan-AI/Wan2.1-T2V-14B", "WanPipeline",
               ("wan2.1_t2v_1.3B_bf16.safetensors", "wan_2.1_vae.safetensors", "umt5_xxl_fp16.safetensors")),
       # Neo's Chroma folder names FluxPipeline (and carries Flux.1 schnell's scheduler)
       "chroma": ("Chroma", "FluxPipeline",
                  ("Chroma1-HD.safetensors", "ae.safetensors", "t5xxl_fp16.safetensors"))}
RELEASE_VAE = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                   temperal_downsample=[False, True, True])


def tiny_model(family):
    """The family's tiny model; Qwen-Image's and Wan's with a released-structure VAE (module docstring)."""
    from lora_train.models.flow_loading import TINY_BUILDERS

    model = TINY_BUILDERS[f"tiny-{family.replace('_', '-')}"]()
    if family in ("qwen_image", "wan"):
        from lora_train.models.qwen_image import calibrate_vae
        from lora_train.models.tiny import seeded

        cls = type(model.vae)
        model.vae = seeded(41, lambda: cls(**RELEASE_VAE)).eval().requires_grad_(False)
        calibrate_vae(model.vae)
    return model


def _save(sd, path):
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return str(path)


def _json(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2)


def neo_config_folder(model, family, hf_root):
    """Write Neo's bundled folder of `model` under hf_root (backend/huggingface): configs, tokenizer and scheduler,
    no weights. Returns the folder."""
    repo, pipeline, _names = NEO[family]
    folder = os.path.join(str(hf_root), *repo.split("/"))
    te_cls = type(model.text_encoder).__name__
    index = {"_class_name": pipeline, "_diffusers_version": "0.34.0.dev0",
             "scheduler": ["diffusers", type(model.noise_scheduler).__name__],
             "text_encoder": ["transformers", te_cls],
             "tokenizer": ["transformers", type(model.tokenizer).__name__.replace("Fast", "")],
             "transformer": ["diffusers", type(model.unet).__name__], "vae": ["diffusers", type(model.vae).__name__]}
    _json(os.path.join(folder, "model_index.json"), index)
    model.vae.save_config(os.path.join(folder, "vae"))
    model.unet.save_config(os.path.join(folder, "transformer"))
    model.text_encoder.config.save_pretrained(os.path.join(folder, "text_encoder"))
    model.tokenizer.save_pretrained(os.path.join(folder, "tokenizer"))
    if family == "chroma":  # Neo's Chroma folder: Flux.1 schnell's scheduler, and a weights index without weights
        _json(os.path.join(folder, "scheduler", "scheduler_config.json"),
              {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0,
               "use_dynamic_shifting": False})
        _json(os.path.join(folder, "text_encoder", "model.safetensors.index.json"), {"metadata": {}, "weight_map": {}})
    else:
        model.noise_scheduler.save_config(os.path.join(folder, "scheduler"))
    return folder


def vae_file_state(model, family):
    if family in ("qwen_image", "wan"):
        return wan_vae_original_layout(model.vae)
    return {k[len("first_stage_model."):]: v for k, v in vae_to_ldm(model.vae).items()}


def split_files(model, family, models_root, te_state=None, ckpt_dir="Stable-diffusion"):
    """Write the tiny model's transformer (bf16, under model.diffusion_model.), VAE and text encoder files (as they
    are: fp32) where Neo lists them: models/<ckpt_dir>, models/VAE, models/text_encoder. Returns (checkpoint,
    vae file, text encoder file). `te_state`: the text encoder file's tensors instead (a scaled fp8 copy)."""
    _repo, _pipeline, (ckpt_name, vae_name, te_name) = NEO[family]
    root = str(models_root)
    ckpt = _save(original_layout(family, model.unet.state_dict()), os.path.join(root, ckpt_dir, ckpt_name))
    vae = _save(vae_file_state(model, family), os.path.join(root, "VAE", vae_name))
    te = _save(te_state if te_state is not None else comfy_text_encoder(model.text_encoder),
               os.path.join(root, "text_encoder", te_name))
    return ckpt, vae, te


def same_weights(a, b, skip=(), atol=0.0):
    """Every tensor of module a equals b's (up to atol, in float32), keys alike, but those starting with `skip`."""
    sa = {k: v for k, v in a.state_dict().items() if not k.startswith(tuple(skip))}
    sb = {k: v for k, v in b.state_dict().items() if not k.startswith(tuple(skip))}
    assert set(sa) == set(sb), sorted(set(sa) ^ set(sb))[:5]
    for k in sa:
        x, y = sa[k].float(), sb[k].float()
        assert x.shape == y.shape, k
        assert (torch.equal(x, y) if atol == 0 else torch.allclose(x, y, atol=atol, rtol=0)), k

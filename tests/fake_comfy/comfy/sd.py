"""Fake of comfy.sd: CLIP, VAE, load_lora_for_models and load_state_dict_guess_config for SD1.x.

Simplified: the CLIP "encodes" a text to a deterministic tensor (from the text and its LoRA patches) and the
VAE "decodes" by nearest upscaling; the LoRA key map (kohya module name -> model key, what
comfy.lora.model_lora_keys_unet/clip build from the model config) is handed to the loader. Kept as ComfyUI
does it: the in-memory key layouts, clone()/add_patches(), the "lora key not loaded" / "NOT LOADED" log
lines, and the return shapes."""
import hashlib
import logging

import torch

from . import utils
from .model_base import SD3, BaseModel, BaseModelWithoutSaving, FlowModel, Flux, FluxSchnell
from .model_patcher import ModelPatcher


class _StateDictHolder:
    def __init__(self, sd):
        self._sd = dict(sd)

    def state_dict(self):
        return dict(self._sd)


class CLIP:
    def __init__(self, clip_sd=None, lora_key_map=None, no_init=False):
        if no_init:
            return
        self.cond_stage_model = _StateDictHolder(clip_sd)
        self.patcher = ModelPatcher(self.cond_stage_model, lora_key_map)
        self.layer_idx = None
        emb = clip_sd.get("clip_l.transformer.text_model.embeddings.token_embedding.weight")
        t5 = clip_sd.get("t5xxl.transformer.shared.weight")
        self.hidden = int(t5.shape[1]) if t5 is not None else int(emb.shape[1]) if emb is not None else 768

    def clone(self):
        n = CLIP(no_init=True)
        n.patcher = self.patcher.clone()
        n.cond_stage_model = self.cond_stage_model
        n.layer_idx = self.layer_idx
        n.hidden = self.hidden
        return n

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        return self.patcher.add_patches(patches, strength_patch, strength_model)

    def tokenize(self, text, return_word_ids=False, **kwargs):
        return {"l": [[(text, 1.0)]]}

    def encode_from_tokens_scheduled(self, tokens, unprojected=False, add_dict={}, show_pbar=True):
        text = tokens["l"][0][0][0]
        seed = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)
        g = torch.Generator().manual_seed(seed)
        cond = torch.randn(1, 77, self.hidden, generator=g) + self.patcher.patch_effect()
        return [[cond, {"pooled_output": cond[:, 0], **add_dict}]]

    def get_sd(self):
        return self.cond_stage_model.state_dict()


class VAE:
    def __init__(self, sd):
        self.first_stage_model = _StateDictHolder(sd)

    def get_sd(self):
        return self.first_stage_model.state_dict()

    def spacial_compression_encode(self):
        return 8

    def decode(self, samples_in, vae_options={}):
        x = torch.sigmoid(samples_in[:, :3].float())
        x = x.repeat_interleave(8, dim=-1).repeat_interleave(8, dim=-2)
        return x.permute(0, 2, 3, 1).contiguous()


def _load_lora(lora, key_map):
    """comfy.lora.load_lora for the kohya layout: {model key: (down, up, alpha)}; other keys are logged."""
    patch, used = {}, set()
    for name, target in key_map.items():
        down, up, alpha = f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha"
        if down in lora and up in lora:
            a = float(lora[alpha].item()) if alpha in lora else None
            patch[target] = (lora[down], lora[up], a)
            used.update((down, up, alpha))
    for k in lora:
        if k not in used:
            logging.warning("lora key not loaded: {}".format(k))
    return patch


def load_lora_for_models(model, clip, lora, strength_model, strength_clip):
    key_map = {}
    if model is not None:
        key_map.update(model.lora_key_map)
    if clip is not None:
        key_map.update(clip.patcher.lora_key_map)
    loaded = _load_lora(lora, key_map)
    if model is not None:
        new_modelpatcher = model.clone()
        k = new_modelpatcher.add_patches(loaded, strength_model)
    else:
        k, new_modelpatcher = (), None
    if clip is not None:
        new_clip = clip.clone()
        k1 = new_clip.add_patches(loaded, strength_clip)
    else:
        k1, new_clip = (), None
    for x in loaded:
        if x not in set(k) and x not in set(k1):
            logging.warning("NOT LOADED {}".format(x))
    return (new_modelpatcher, new_clip)


def clip_lora_key_map(clip_sd):
    """comfy.lora.model_lora_keys_clip for SD1 (clip_l): lora_te_text_model_encoder_layers_N_* -> clip key."""
    out = {}
    for k in clip_sd:
        if k.startswith("clip_l.transformer.text_model.encoder.layers.") and k.endswith(".weight") \
                and (".self_attn." in k or ".mlp." in k):
            name = k[len("clip_l.transformer."):-len(".weight")].replace(".", "_")
            out["lora_te_" + name] = k
    return out


def load_state_dict_guess_config(sd, output_vae=True, output_clip=True, unet_lora_key_map=None, saving=True):
    """SD1.x only: split an original-layout state dict as ComfyUI holds it in memory (SD15 rules:
    `model.diffusion_model.` -> diffusion_model, `cond_stage_model.` -> `clip_l.` with the text_projection and
    logit_scale the SD1ClipModel has, `first_stage_model.` -> VAE). Returns (ModelPatcher, CLIP, VAE, None)."""
    unet = {k[len("model.diffusion_model."):]: v for k, v in sd.items() if k.startswith("model.diffusion_model.")}
    clip_sd = utils.state_dict_prefix_replace({k: v for k, v in sd.items() if k.startswith("cond_stage_model.")},
                                              {"cond_stage_model.": "clip_l."}, filter_keys=True)
    clip_sd.pop("clip_l.transformer.text_model.embeddings.position_ids", None)
    emb = clip_sd["clip_l.transformer.text_model.embeddings.token_embedding.weight"]
    clip_sd["clip_l.transformer.text_projection.weight"] = torch.eye(emb.shape[1])
    clip_sd["clip_l.logit_scale"] = torch.tensor(4.6055)
    vae_sd = {k[len("first_stage_model."):]: v for k, v in sd.items() if k.startswith("first_stage_model.")}
    cls = BaseModel if saving else BaseModelWithoutSaving
    model = ModelPatcher(cls(unet, v_prediction="v_pred" in sd), unet_lora_key_map)
    clip = CLIP(clip_sd, clip_lora_key_map(clip_sd)) if output_clip else None
    vae = VAE(vae_sd) if output_vae else None
    return (model, clip, vae, None)


# ----------------------------------------------------------------------------- Flux / SD3 (issue #16)
def flow_clip_lora_key_map(clip_sd):
    """comfy.lora.model_lora_keys_clip for clip_l (lora_te_ / lora_te1_) and clip_g (lora_te2_, when clip_l is there)."""
    out = {}
    for k in clip_sd:
        for enc, prefixes in (("clip_l", ("lora_te_", "lora_te1_")), ("clip_g", ("lora_te2_",))):
            if k.startswith(enc + ".transformer.text_model.encoder.layers.") and k.endswith(".weight") \
                    and (".self_attn." in k or ".mlp." in k):
                name = k[len(enc + ".transformer."):-len(".weight")].replace(".", "_")
                for p in prefixes:
                    out[p + name] = k
    return out


def unet_lora_key_map_generic(unet_sd):
    """comfy.lora.model_lora_keys_unet's rule for every model: `lora_unet_` + the key with `_` for `.`."""
    return {"lora_unet_" + k[:-len(".weight")].replace(".", "_"): "diffusion_model." + k
            for k in unet_sd if k.endswith(".weight")}


def load_flow_parts(unet_sd, clip_sd, vae_sd, family="flux"):
    """What ComfyUI's UNETLoader + DualCLIPLoader (Flux: clip_l + t5xxl; TripleCLIPLoader for SD3) + VAELoader hand
    over, as the real ones hold them in memory: the BFL / MMDiT keys in the diffusion model, the CLIP object's
    `clip_l.transformer.*` / `clip_g.transformer.*` / `t5xxl.transformer.*` keys (plus each encoder's `logit_scale`
    and a CLIP `text_projection`, as sd1_clip.SDClipModel has them), the VAE's LDM keys. Returns (MODEL, CLIP, VAE)."""
    clip_sd = dict(clip_sd)
    clip_sd.pop("t5xxl.transformer.encoder.embed_tokens.weight", None)  # comfy's T5 has only `shared`
    for enc in ("clip_l", "clip_g", "t5xxl"):
        emb = clip_sd.get(f"{enc}.transformer.text_model.embeddings.token_embedding.weight")
        if emb is not None and f"{enc}.transformer.text_projection.weight" not in clip_sd:
            clip_sd[f"{enc}.transformer.text_projection.weight"] = torch.eye(emb.shape[1])
        if any(k.startswith(enc + ".") for k in clip_sd):
            clip_sd[f"{enc}.logit_scale"] = torch.tensor(4.6055)
    if family == "flux":
        config = Flux() if any(k.startswith("guidance_in.") for k in unet_sd) else FluxSchnell()
    else:
        config = SD3()
    model = ModelPatcher(FlowModel(unet_sd, config), unet_lora_key_map_generic(unet_sd))
    return model, CLIP(clip_sd, flow_clip_lora_key_map(clip_sd)), VAE(vae_sd)

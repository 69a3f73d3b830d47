"""Fake loaded models: A1111's LatentDiffusion (`FakeSDModel`: real modules whose state_dict() is the ldm
layout, text encoder under `.wrapped.` as A1111 hijacks it) and Forge's engine (`FakeForgeEngine`:
forge_objects.{unet,clip,vae} whose modules hold the ldm-layout weights)."""
import torch
from torch import nn


def module_tree(sd, strip=""):
    """Nested nn.Modules whose state_dict() is `sd` (keys without `strip`); tensors are shared, not copied."""
    root = nn.Module()
    for key, t in sd.items():
        if strip:
            if not key.startswith(strip):
                continue
            key = key[len(strip):]
        *path, leaf = key.split(".")
        m = root
        for part in path:
            if not hasattr(m, part) or getattr(m, part) is None or not isinstance(getattr(m, part), nn.Module):
                m.add_module(part, nn.Module())
            m = getattr(m, part)
        if t.is_floating_point():
            m.register_parameter(leaf, nn.Parameter(t, requires_grad=False))
        else:
            m.register_buffer(leaf, t)
    return root


class CheckpointInfo:
    """A1111 1.10.1's CheckpointInfo: before its hash is computed (a checkpoint the WebUI has never hashed) the
    title is the file name; `calculate_shorthash()` makes it `name [hash]` and registers the new ids."""

    def __init__(self, filename, metadata=None, hashed=True):
        import os

        self.filename = filename
        self.name = os.path.basename(filename)
        self.name_for_extra = os.path.splitext(self.name)[0]
        self.model_name = self.name_for_extra
        self.hash = None
        self.shorthash = None
        self.title = self.name
        self.ids = [self.model_name, self.title, self.name, self.name_for_extra]
        self.metadata = metadata or {}
        if hashed:
            self.calculate_shorthash()

    def register(self, checkpoints_list, aliases=None):
        checkpoints_list[self.title] = self
        for i in self.ids:
            (aliases if aliases is not None else CHECKPOINT_ALIASES)[i] = self

    def calculate_shorthash(self, checkpoints_list=None):
        self.hash = self.shorthash = "0123abcd"
        self.ids += [self.shorthash, f"{self.name} [{self.shorthash}]", f"{self.name_for_extra} [{self.shorthash}]"]
        self.title = f"{self.name} [{self.shorthash}]"
        if checkpoints_list is not None:
            self.register(checkpoints_list)
        return self.shorthash


CHECKPOINT_ALIASES = {}


def get_closet_checkpoint_match(checkpoints_list, search_string):
    """A1111 1.10.1 sd_models.get_closet_checkpoint_match: an alias, else the shortest title containing the
    string, else the same without a trailing ` [hash]`."""
    import re

    if not search_string:
        return None
    info = CHECKPOINT_ALIASES.get(search_string)
    if info is not None:
        return info
    found = sorted([i for i in checkpoints_list.values() if search_string in i.title], key=lambda x: len(x.title))
    if found:
        return found[0]
    bare = re.sub(r"\s\[[^]]+]\s*$", "", search_string)
    found = sorted([i for i in checkpoints_list.values() if bare in i.title], key=lambda x: len(x.title))
    return found[0] if found else None


def _wrap_a1111(k):
    if k.startswith("cond_stage_model.transformer."):
        k = "cond_stage_model.wrapped." + k[len("cond_stage_model."):]
        k = k.replace("token_embedding.weight", "token_embedding.wrapped.weight")
    return k


class _Probe(nn.Linear):
    """A layer the Lora extension patches: unet (`diffusion_model_...`) or text encoder (`transformer_...`)."""

    def __init__(self, name):
        super().__init__(2, 2, bias=False)
        with torch.no_grad():
            self.weight.zero_()
        self.network_layer_name = name


class FakeSDModel(nn.Module):
    def __init__(self, ldm_sd, info):
        super().__init__()
        self.body = module_tree({_wrap_a1111(k): v for k, v in ldm_sd.items()})
        self.probe_unet = _Probe("diffusion_model_probe")
        self.probe_te = _Probe("transformer_text_model_probe")
        self.sd_checkpoint_info = info
        self.sd_model_checkpoint = info.filename
        self.lowvram = False
        self.moves = []

    def state_dict(self, *a, **k):
        sd = self.body.state_dict()
        sd["alphas_cumprod"] = torch.linspace(0.99, 0.01, 10)  # the real LatentDiffusion holds schedule buffers
        return sd

    def to(self, *args, **kwargs):
        self.moves.append(str(args[0]) if args else str(kwargs.get("device")))
        return super().to(*args, **kwargs)

    def unet_value(self):
        return float(self.probe_unet.weight.detach().sum())

    def te_value(self):
        return float(self.probe_te.weight.detach().sum())


class _LoraLoader:
    """backend.patcher.lora.LoraLoader: one per patched module (`module.lora_loader`, shared by every clone of its
    patcher); `refresh` re-merges only when the list of (filename, strengths) keys changed, so a file rewritten
    under the same name stays merged with its old weights (found by the real Forge run)."""

    def __init__(self):
        self.loaded_hash = str([])
        self.merged = 0.0

    def refresh(self, lora_patches):
        hashes = str(list(lora_patches.keys()))
        if hashes == self.loaded_hash:
            return
        self.merged = float(sum(lora_patches.values()))
        self.loaded_hash = hashes


class _Patcher:
    def __init__(self, model, patches=None):
        self.model = model
        self.lora_patches = dict(patches or {})
        if not hasattr(model, "lora_loader"):
            model.lora_loader = _LoraLoader()
        self.lora_loader = model.lora_loader

    def clone(self):
        return type(self)(self.model, self.lora_patches)

    def add_patches(self, *, filename, value, strength_patch=1.0, strength_model=1.0, online_mode=False):
        self.lora_patches[(filename, strength_patch, strength_model, online_mode)] = value * strength_patch

    @property
    def lora_delta(self):
        """What the weights hold at sampling time (Forge calls refresh_loras when it loads the model)."""
        self.lora_loader.refresh(self.lora_patches)
        return self.lora_loader.merged


class _Clip(_Patcher):
    @property
    def cond_stage_model(self):
        return self.model


class _Vae:
    def __init__(self, m):
        self.first_stage_model = m


class ForgeObjects:
    def __init__(self, unet, clip, vae):
        self.unet, self.clip, self.vae, self.clipvision = unet, clip, vae, None

    def shallow_copy(self):
        return ForgeObjects(self.unet, self.clip, self.vae)


class FakeForgeEngine:
    """backend.diffusion_engine.sd15.StableDiffusion's surface: forge_objects (unet: UnetPatcher with
    .model.diffusion_model; clip: CLIP with .cond_stage_model = {'clip_l': IntegratedCLIP}; vae: VAE with
    .first_stage_model), forge_objects_original, current_lora_hash, is_sd1."""

    def __init__(self, ldm_sd, info, is_sd1=True):
        # Forge loads under @torch.inference_mode() (backend/loader.py forge_loader, sd_models.forge_model_reload):
        # its weights are inference tensors, which autograd outside inference mode refuses (found by the real run)
        with torch.inference_mode():
            self._build({k: v.clone() for k, v in ldm_sd.items()}, info, is_sd1)

    def _build(self, ldm_sd, info, is_sd1):
        unet_model = nn.Module()
        unet_model.add_module("diffusion_model", module_tree(ldm_sd, "model.diffusion_model."))
        te = nn.Module()
        te.add_module("clip_l", module_tree({"transformer." + k[len("cond_stage_model.transformer."):]: v
                                             for k, v in ldm_sd.items()
                                             if k.startswith("cond_stage_model.transformer.")}))
        te.clip_l.logit_scale = nn.Parameter(torch.tensor(4.6055), requires_grad=False)
        width = ldm_sd["cond_stage_model.transformer.text_model.final_layer_norm.weight"].shape[0]
        te.clip_l.transformer.text_projection = nn.Linear(width, width, bias=False)  # IntegratedCLIP adds one
        unet_model.storage_dtype = torch.float32
        self.forge_objects = ForgeObjects(_Patcher(unet_model), _Clip(te), _Vae(module_tree(ldm_sd, "first_stage_model.")))
        self.forge_objects_original = self.forge_objects.shallow_copy()
        self.forge_objects_after_applying_lora = self.forge_objects.shallow_copy()
        self.current_lora_hash = str([])
        self.is_sd1 = is_sd1
        self.sd_checkpoint_info = info
        self.filename = info.filename

    def unet_value(self):
        return float(self.forge_objects.unet.lora_delta)

    def te_value(self):
        return float(self.forge_objects.clip.lora_delta)


class FakeForgeFluxEngine(FakeForgeEngine):
    """backend.diffusion_engine.flux.Flux's surface: not a WebUI legacy model (is_sd1 / is_sd2 / is_sdxl / is_sd3
    False), forge_objects.unet.model.diffusion_model holding the BFL transformer keys as Forge loads a
    transformer-only checkpoint (the VAE and text encoders come from shared.opts.forge_additional_modules)."""

    def _build(self, bfl_sd, info, is_sd1):
        unet_model = nn.Module()
        unet_model.add_module("diffusion_model", module_tree(bfl_sd))
        unet_model.storage_dtype = torch.bfloat16
        te = nn.Module()
        te.add_module("probe", nn.Linear(1, 1, bias=False))
        self.forge_objects = ForgeObjects(_Patcher(unet_model), _Clip(te), _Vae(nn.Module()))
        self.forge_objects_original = self.forge_objects.shallow_copy()
        self.forge_objects_after_applying_lora = self.forge_objects.shallow_copy()
        self.current_lora_hash = str([])
        self.is_sd1 = self.is_sd2 = self.is_sdxl = self.is_sd3 = False
        self.sd_checkpoint_info = info
        self.filename = info.filename


#: Forge Neo's engine class per family (backend/diffusion_engine/qwen.py QwenImage, zimage.py ZImage, wan.py Wan,
#: chroma.py Chroma), each matched from huggingface_guess's model_list (its `huggingface_repo` names the bundled
#: config folder)
NEO_ENGINES = {"qwen_image": "QwenImage", "z_image": "ZImage", "wan": "Wan", "chroma": "Chroma"}


class _NeoModelConfig:
    """huggingface_guess's estimated config as the engine keeps it (`engine.model_config`)."""

    def __init__(self, repo):
        self.huggingface_repo = repo


class FakeForgeNeoEngine(FakeForgeFluxEngine):
    """A Forge Neo engine (ForgeDiffusionEngine subclass) of the 2026 families: forge_objects.unet.model.
    diffusion_model holds the transformer's original keys (Neo loads a transformer-only checkpoint, the VAE and text
    encoder from shared.opts.forge_additional_modules), model_config.huggingface_repo the bundled folder it was
    loaded with; not a WebUI legacy model; Qwen-Image's and Wan's engines set is_wan (their VAE is Wan's)."""

    def __init__(self, transformer_sd, info, repo, wan_vae=False):
        super().__init__(transformer_sd, info, is_sd1=False)
        self.model_config = _NeoModelConfig(repo)
        self.is_wan = wan_vae


def neo_engine(family, transformer_sd, info, repo):
    """A FakeForgeNeoEngine whose class has the name of Neo's engine for `family` (type(model).__name__)."""
    cls = type(NEO_ENGINES[family], (FakeForgeNeoEngine,), {})
    return cls(transformer_sd, info, repo, wan_vae=family in ("qwen_image", "wan"))

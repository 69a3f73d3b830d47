"""ComfyUI glue: the `Host` for ComfyUI and the in-memory conversion of the graph's MODEL / CLIP / VAE.

Everything ComfyUI-specific the nodes touch lives here, imported lazily (inside functions) so that this
module imports without ComfyUI (tests run it against the fakes in tests/fake_comfy/):

- folder_paths.get_folder_paths("loras") / get_filename_list / get_full_path / get_temp_directory /
  get_output_directory, and its file-list caches (filename_list_cache, cache_helper);
- comfy.model_management.unload_all_models / soft_empty_cache / processing_interrupted /
  throw_exception_if_processing_interrupted;
- comfy.utils.ProgressBar / load_torch_file; comfy.sd.load_lora_for_models;
- nodes.common_ksampler (ComfyUI's own sampler) and VAE.decode.

In-memory layouts of an SD1.x checkpoint in ComfyUI (comfy/model_base.py, comfy/sd.py, supported_models.py):
  MODEL  ModelPatcher.model.diffusion_model.state_dict()   ldm UNet keys (input_blocks.0.0.weight, ...);
         ModelPatcher.model.state_dict() has them under `diffusion_model.` (plus `model_sampling.*`)
  CLIP   CLIP.cond_stage_model.state_dict()                `clip_l.transformer.text_model.*` (SD1),
         `clip_l.` + `clip_g.` (SDXL), `clip_h.` (SD2)
  VAE    VAE.first_stage_model.state_dict()                ldm VAE keys (encoder.*, decoder.*, quant_conv.*)
`BaseModel.state_dict_for_saving(clip_sd, vae_sd)` maps all three to the original single-file layout (what
ComfyUI's own CheckpointSave writes); we use it when the model has it, and a plain prefix mapping (the
SD1.x rules of supported_models.SD15) otherwise.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

from ..family import family_of_keys
from .base import Host, HostError
from .comfyui_flow import FAMILY_NAMES as CONVERTER_FAMILIES
from .comfyui_flow import LATENT_CHANNELS, flow_base_model_from_state_dict, graph_family, memory_plan

log = logging.getLogger("lora_train.comfyui")
RUNS_SUBFOLDER = "lora_train"  # run folders (config, loss log, plot, resumable state) under ComfyUI's output dir

UNET_KEY = "model.diffusion_model.input_blocks.0.0.weight"
TE_EMBED_KEY = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
# SD15.process_clip_state_dict_for_saving drops these before the prefix replace
SD1_CLIP_DROP = ("clip_l.transformer.text_projection.weight", "clip_l.logit_scale")


# ----------------------------------------------------------------------------- state dicts
def _tensors(sd: Mapping[str, Any]) -> Dict[str, Any]:
    import torch

    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def sd1_parts_to_ldm(unet_sd: Mapping[str, Any], clip_sd: Mapping[str, Any],
                     vae_sd: Mapping[str, Any]) -> Dict[str, Any]:
    """ComfyUI's SD1.x component state dicts -> original single-file layout (ComfyUI's SD15 saving rules).

    unet_sd: `ModelPatcher.model.state_dict()` (keys `diffusion_model.*`, other buffers ignored) or the
    diffusion model's own state dict (bare ldm keys); clip_sd: `CLIP.get_sd()` (`clip_l.*`);
    vae_sd: `VAE.get_sd()` (bare ldm VAE keys)."""
    out: Dict[str, Any] = {}
    prefixed = any(k.startswith("diffusion_model.") for k in unet_sd)
    for k, v in unet_sd.items():
        if prefixed:
            if k.startswith("diffusion_model."):
                out["model." + k] = v
        else:
            out["model.diffusion_model." + k] = v
    clip_keys = [k for k in clip_sd if k.startswith("clip_l.")]
    if not clip_keys:
        other = sorted({k.split(".")[0] for k in clip_sd})[:4]
        raise HostError(f"the CLIP input has no SD1.x text encoder (clip_l); it holds {', '.join(other) or 'nothing'}. "
                        f"Connect the CLIP output of the same SD1.x checkpoint loader as MODEL.")
    for k in clip_keys:
        if k not in SD1_CLIP_DROP:
            out["cond_stage_model." + k[len("clip_l."):]] = clip_sd[k]
    for k, v in vae_sd.items():
        out["first_stage_model." + k] = v
    return out


def graph_state_dict(model: Any, clip: Any, vae: Any) -> Dict[str, Any]:
    """The original-layout state dict of the MODEL / CLIP / VAE a ComfyUI graph delivers (no copies)."""
    inner = getattr(model, "model", None)  # ModelPatcher.model: comfy.model_base.BaseModel
    if inner is None or not hasattr(inner, "state_dict"):
        raise HostError("the MODEL input is not a ComfyUI model (no ModelPatcher.model): connect the MODEL output "
                        "of a checkpoint loader.")
    if clip is None or not hasattr(clip, "get_sd"):
        raise HostError("the CLIP input is missing: connect the CLIP output of the same checkpoint loader.")
    if vae is None or not hasattr(vae, "get_sd"):
        raise HostError("the VAE input is missing: connect the VAE output of the same checkpoint loader.")
    clip_sd, vae_sd = clip.get_sd(), vae.get_sd()
    if hasattr(inner, "state_dict_for_saving"):
        sd = inner.state_dict_for_saving(clip_sd, vae_sd)
    else:
        sd = sd1_parts_to_ldm(inner.state_dict(), clip_sd, vae_sd)
    sd = _tensors(sd)
    if UNET_KEY not in sd and family_of_keys(sd) is None:  # Flux / SD3: hosts/comfyui_flow.py
        raise HostError("the MODEL input is not a Stable Diffusion UNet (no input_blocks) nor a Flux.1 / SD3 "
                        "transformer: this trainer takes SD1.x / SD2.x / SDXL, Flux.1 and SD3 / SD3.5 models.")
    return sd


def template_for(sd: Mapping[str, Any]):
    """The tiny demo model as config template when the weights have its shapes (tests, demo); else None
    (bundled SD configs chosen by detection)."""
    from ..models.tiny import TINY_TEXT, TINY_UNET

    unet_w, te_w = sd.get(UNET_KEY), sd.get(TE_EMBED_KEY)
    if unet_w is None or te_w is None:
        return None
    if tuple(unet_w.shape)[0] == TINY_UNET["block_out_channels"][0] and tuple(te_w.shape)[1] == TINY_TEXT["hidden_size"]:
        from ..models.tiny import build_tiny

        return build_tiny()
    return None


def graph_model_name(model: Any) -> str:
    """A name for the graph's model (kohya `ss_sd_model_name`): ComfyUI's model config class, e.g. comfyui:SD15."""
    cfg = getattr(getattr(model, "model", None), "model_config", None)
    return f"comfyui:{type(cfg).__name__}" if cfg is not None else "comfyui"


def base_model_from_graph(model: Any, clip: Any, vae: Any, name: str = ""):
    """A trainable `lora_train.models.BaseModel` (float32 copies) of the graph's MODEL / CLIP / VAE."""
    import torch

    from ..models.single_file import from_original_state_dict

    with torch.inference_mode(False):
        sd = graph_state_dict(model, clip, vae)
        if family_of_keys(sd) is not None:  # Flux / SD3: 16-bit copies, see comfyui_flow's memory plan
            return flow_base_model_from_state_dict(sd, name or graph_model_name(model))
        # ComfyUI runs nodes under torch.inference_mode(): the weights it loaded there are inference tensors,
        # which autograd refuses to save for backward. The float32 cast below makes normal tensors of the
        # others (fp16/bf16 weights); the ones already float32 (or not floating) are copied here.
        sd = {k: (v.clone() if v.is_inference() and (v.dtype == torch.float32 or not v.is_floating_point()) else v)
              for k, v in sd.items()}
        base = from_original_state_dict(sd, name=name or graph_model_name(model), config=template_for(sd),
                                        dtype=torch.float32)
    del sd
    return base


# ----------------------------------------------------------------------------- images
def pil_to_image(img) -> Any:
    """PIL image -> ComfyUI IMAGE tensor [1, H, W, 3], float32 0..1."""
    import numpy as np
    import torch

    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr.copy())[None]


def image_to_pil(t: Any):
    """ComfyUI IMAGE tensor [B, H, W, C] (first item) or [H, W, C] -> PIL RGB image."""
    import numpy as np
    from PIL import Image

    if t.dim() == 4:
        t = t[0]
    arr = (t.detach().float().cpu().clamp(0, 1).numpy() * 255.0).round().astype(np.uint8)
    if arr.shape[-1] == 1:
        arr = arr[..., 0]
    return Image.fromarray(arr).convert("RGB")


def save_preview(img, prefix: str = "lora_train") -> Dict[str, str]:
    """Write a preview PNG to ComfyUI's temp folder; returns the `ui.images` entry the frontend shows."""
    import uuid

    import folder_paths

    folder = folder_paths.get_temp_directory()
    os.makedirs(folder, exist_ok=True)
    name = f"{prefix}_{uuid.uuid4().hex[:10]}.png"
    img.save(os.path.join(folder, name))
    return {"filename": name, "subfolder": "", "type": "temp"}


# ----------------------------------------------------------------------------- the host
class ComfyUIHost(Host):
    """lora_train's Host interface on ComfyUI's own folders, memory manager, progress bar, interrupt,
    LoRA loader and sampler. model / clip / vae: what the graph delivered (for base_model() and generate())."""

    name = "comfyui"
    title = "ComfyUI"

    def __init__(self, model: Any = None, clip: Any = None, vae: Any = None, sampler_name: str = "euler",
                 scheduler: str = "normal", node_id: Optional[str] = None, in_place: str = "auto",
                 guidance: float = 1.0):
        self.model, self.clip, self.vae = model, clip, vae
        self.in_place, self.guidance = in_place, float(guidance)
        self.graph = None  # the in-place model's ComfyUI side (hosts/comfyui_inplace.py) while it trains
        self.sampler_name, self.scheduler = sampler_name, scheduler
        self.node_id = node_id
        self._pbar = None
        self._lora_cache: Dict[str, Tuple[Tuple[float, int], Any]] = {}
        self._lock = threading.Lock()

    # folders ---------------------------------------------------------------
    def lora_dirs(self) -> List[str]:
        import folder_paths

        dirs = folder_paths.get_folder_paths("loras")
        if not dirs:
            raise HostError("ComfyUI has no 'loras' folder configured: add one in extra_model_paths.yaml.")
        return dirs

    def runs_dir(self) -> str:
        """Run folders (config, loss log, plot, resumable state) under ComfyUI's output folder, never in `loras`."""
        import folder_paths

        return os.path.join(folder_paths.get_output_directory(), RUNS_SUBFOLDER)

    @contextlib.contextmanager
    def memory_freed(self) -> Iterator[None]:
        """ComfyUI's models off the GPU while we train, and autograd back on: ComfyUI runs every node under
        `torch.inference_mode()`, in which no training step can build a graph."""
        import torch

        with super().memory_freed(), torch.inference_mode(False), torch.enable_grad():
            yield

    def refresh_loras(self) -> None:
        """Make ComfyUI's LoRA list (LoraLoader's combo, /object_info) see new files at once."""
        import folder_paths

        cache = getattr(folder_paths, "filename_list_cache", None)
        if isinstance(cache, dict):
            cache.pop("loras", None)
        helper = getattr(folder_paths, "cache_helper", None)
        if helper is not None and hasattr(helper, "cache"):
            helper.cache.pop("loras", None)
        self._lora_cache.clear()

    def checkpoints(self) -> Dict[str, str]:
        import folder_paths

        out = {}
        for n in folder_paths.get_filename_list("checkpoints"):
            p = folder_paths.get_full_path("checkpoints", n)
            if p:
                out[n] = p
        return out

    def resolve_lora(self, name: str) -> str:
        """A LoRA as ComfyUI lists it ('sub/x.safetensors') or by stem ('x', as in <lora:x:1>) -> its path."""
        import folder_paths

        from ..prompt import LoraLibrary

        name = (name or "").strip()
        if not name:
            raise HostError("no LoRA name given: pick one from the list or connect the lora_name output of Train LoRA.")
        path = folder_paths.get_full_path("loras", name)
        if path:
            return path
        stem = os.path.splitext(os.path.basename(name))[0] if name.lower().endswith(".safetensors") else name
        try:
            return LoraLibrary(self.lora_dirs()).resolve(stem)
        except ValueError as exc:
            raise HostError(str(exc)) from None

    # model -------------------------------------------------------------------
    def base_model(self, spec: Optional[str] = None):
        if spec:
            return super().base_model(spec)
        if self.model is None:
            raise HostError("no MODEL connected: connect the MODEL, CLIP and VAE of a checkpoint loader.")
        if self.trains_in_place():
            from . import comfyui_inplace

            model = comfyui_inplace.base_model(self.model, self.clip, self.vae, graph_model_name(self.model),
                                               guidance=self.guidance)
            self.graph = model.extra["graph"]
            return model
        return base_model_from_graph(self.model, self.clip, self.vae)

    def trains_in_place(self) -> bool:
        """in_place "on": always; "off": the converter (SD1.x / SDXL / Flux.1 / SD3 only); "auto": in place for
        every family the converter does not read (Qwen-Image, Z-Image, FLUX.2, Chroma, Wan, HiDream, Lumina 2, ...)."""
        if self.in_place not in ("auto", "on", "off"):
            raise HostError(f"in_place {self.in_place!r}: use auto, on or off.")
        if self.in_place != "auto":
            return self.in_place == "on"
        inner = getattr(self.model, "model", None)
        if inner is None or not hasattr(inner, "state_dict"):
            return False  # not a ComfyUI model: base_model_from_graph says what to connect
        keys = [k for k in inner.state_dict() if k.startswith("diffusion_model.")]
        if any(k.startswith("diffusion_model.input_blocks.") for k in keys):
            return False  # an SD UNet: the converter reads it
        return graph_family(self.model) not in CONVERTER_FAMILIES

    def applies(self, path: str) -> Tuple[int, int, List[str]]:
        """ComfyUI's own loader on a written file: (modules applied, modules in the file, names not applied)."""
        from . import comfyui_inplace

        return comfyui_inplace.applies(self.model, self.load_lora_file(path))

    def memory_plan(self, device: str, fp8_base: str = "auto"):
        """The Train node's memory plan for a Flux / SD3 MODEL (hosts/comfyui_flow.py); None for UNet models."""
        return memory_plan(self.model, device, fp8_base) if self.model is not None else None

    def free_memory(self) -> None:
        """Unload every model ComfyUI holds on the GPU (their weights return to the offload device)."""
        import comfy.model_management as mm

        mm.unload_all_models()
        mm.soft_empty_cache()

    def restore_memory(self) -> None:
        import gc

        if self.graph is not None:  # our wrappers off ComfyUI's modules, its clone unloaded
            self.graph.release()
        gc.collect()
        try:
            import comfy.model_management as mm

            mm.soft_empty_cache()
        except ImportError:  # pragma: no cover - only without ComfyUI
            pass

    def interrupted(self) -> bool:
        import comfy.model_management as mm

        return bool(mm.processing_interrupted())

    def progress(self, done: int, total: int, text: str = "") -> None:
        import comfy.utils

        if self._pbar is None or self._pbar.total != total:
            self._pbar = comfy.utils.ProgressBar(total, node_id=self.node_id)
        self._pbar.update_absolute(done, total)

    # generation ------------------------------------------------------------------
    def load_lora_file(self, path: str) -> Any:
        import comfy.utils

        st = os.stat(path)
        key = (st.st_mtime, st.st_size)
        hit = self._lora_cache.get(path)
        if hit is not None and hit[0] == key:
            return hit[1]
        sd = comfy.utils.load_torch_file(path, safe_load=True)
        self._lora_cache[path] = (key, sd)
        return sd

    def apply_lora(self, model: Any, clip: Any, name: str, strength_model: float, strength_clip: float):
        """ComfyUI's own LoRA loader (comfy.sd.load_lora_for_models) on clones of model / clip."""
        import comfy.sd

        if strength_model == 0 and strength_clip == 0:
            return model, clip
        lora = self.load_lora_file(self.resolve_lora(name))
        return comfy.sd.load_lora_for_models(model, clip, lora, strength_model, strength_clip)

    def apply_prompt_loras(self, model: Any, clip: Any, prompt: str):
        """Parse `<lora:name:w>` tags, apply them through ComfyUI's loader; (model, clip, cleaned text, tags)."""
        from ..prompt import parse_prompt

        text, tags = parse_prompt(prompt or "")
        for t in tags:
            model, clip = self.apply_lora(model, clip, t.name, t.unet, t.te)
        return model, clip, text, tags

    @staticmethod
    def encode(clip: Any, text: str) -> Any:
        """CONDITIONING exactly as ComfyUI's CLIPTextEncode makes it."""
        tokens = clip.tokenize(text)
        return clip.encode_from_tokens_scheduled(tokens)

    def empty_latent(self, width: int, height: int) -> Dict[str, Any]:
        import torch

        f = 8
        if self.vae is not None and hasattr(self.vae, "spacial_compression_encode"):
            try:
                f = int(self.vae.spacial_compression_encode())
            except (TypeError, ValueError):
                f = 8
        channels = LATENT_CHANNELS.get(graph_family(self.model), 4)  # Flux / SD3 latents have 16 channels
        return {"samples": torch.zeros([1, channels, max(1, height // f), max(1, width // f)])}

    def generate(self, params):
        """One image through ComfyUI's LoRA loader, CLIP text encode, nodes.common_ksampler and VAE decode."""
        import nodes as comfy_nodes  # ComfyUI's nodes.py (ours is a subpackage of the custom node)

        if self.model is None or self.clip is None or self.vae is None:
            raise HostError("the sweep needs MODEL, CLIP and VAE connected.")
        model, clip, text, _tags = self.apply_prompt_loras(self.model, self.clip, params.prompt)
        pos = self.encode(clip, text)
        neg = self.encode(clip, params.negative_prompt or "")
        latent = self.empty_latent(params.width, params.height)
        (out,) = comfy_nodes.common_ksampler(model, params.seed, params.steps, params.cfg_scale, self.sampler_name,
                                            self.scheduler, pos, neg, latent)
        images = self.vae.decode(out["samples"])
        if images.dim() == 5:  # video VAEs: [B, T, H, W, C]
            images = images.reshape(-1, *images.shape[-3:])
        return image_to_pil(images[0])

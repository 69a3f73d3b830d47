"""ComfyUI in place: train the graph's own MODEL, for every family ComfyUI loads, with no second copy of its weights.

What a run uses of ComfyUI (0.8.0's names; imported lazily, so this module imports without ComfyUI):
- the MODEL (a ModelPatcher) is cloned; our adapters (networks/: LoRA, LoCon on 3x3 convs, LoHa, LoKr, DoRA, as
  weight deltas) are ComfyUI weight wrappers on the clone (`ModelPatcher.add_weight_wrapper`): at each forward
  ComfyUI's own ops cast the stored weight (fp8 / bf16, offloaded or not) to the compute dtype and device and call
  W' = W + delta(W), the formula its LoRA loader applies for our files. The base weights are never copied;
  ComfyUI's partial loading and fp8 storage stay as ComfyUI does them (comfy/ops.py `cast_bias_weight`).
- the forward is `BaseModel.apply_model` with the conditioning ComfyUI's own samplers build for it
  (`comfy.sampler_helpers.convert_cond`, `comfy.samplers.encode_model_conds` with the model's `extra_conds`,
  `get_area_and_mult`, `can_concat_cond` / `cond_cat` to batch samples whose conditioning concatenates);
- noise, target and loss from its `model_sampling`: noisy = `noise_scaling(sigma, noise, x0)`; apply_model gives the
  denoised x0_pred = a(sigma) x + b(sigma) out (`calculate_denoised` is linear in the model's raw output), so the
  raw output and the target of the model's own objective are out = (x0_pred - a x) / b, target = (x0 - a x) / b:
  epsilon for EPS models, v for V_PREDICTION, noise - x0 for CONST (flow) models, x0 for X0 ones. The loss is the
  MSE (or the run's loss type) of those, as every trainer of that objective computes it;
- timesteps: discrete models (EPS / V: `model_sampling.sigmas`, 1000 of them) draw an index 0..999 uniformly, as
  DDPM training does (min-SNR applies, from SNR = 1 / sigma^2); flow models draw sigma = model_sampling's own shift
  of a sigmoid(N(0, 1)) draw (`sigma(timestep(u))`: the model's shift, Flux's resolution shift included as ComfyUI
  sets it), or the run's timestep_sampling when it names one (training/flow.py); the trainer's timesteps are sigma x
  1000 for flow models and the index for discrete ones;
- text from the graph's CLIP (`tokenize` + `encode_from_tokens_scheduled`, every text encoder ComfyUI has), latents
  from the graph's VAE (`encode` + the model's `process_latent_in`); both cached by the trainer.

What a real ComfyUI (0.8.0, tests/test_comfyui_inplace_real.py) asks of a trainer, beside the above:
- its executor runs nodes under torch.inference_mode(), so the loaders' weights are inference tensors, which autograd
  does not save: while the clone is loaded each is a normal tensor on the same storage (`load`; put back by
  `release`);
- its models are written for inference: residual adds in place after a pre-norm kept the tensor (Flux / Chroma /
  FLUX.2 blocks), so our forward keeps copies of the activations autograd saves (`_pack_saved`), and gradient
  checkpointing runs each block on copies of its inputs (`_checkpointed`); comfy_kitchen's RoPE ops have no backward
  (`rope_autograd` registers one); video VAEs (Wan, Qwen-Image) encode a batch as one video (one image at a time);
  conditioning entries that are None (pooled_output of T5 / LLM encoders) are kept, extra_conds read them.

The LoRA file names every module `lora_unet_<module path in ComfyUI's diffusion model, . -> _>`: ComfyUI maps that
name for every weight of every family (comfy/lora.py `model_lora_keys_unet`), and for the families we know it is
the kohya / sd-scripts / musubi-tuner name too (BFL names for Flux, ComfyUI's for Wan and Z-Image, ldm names for
SDXL, which A1111 and Forge read as well). `applies(path)` loads a file with ComfyUI's own key map and load_lora.
"""
from __future__ import annotations

import contextlib
import logging
import math
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .base import HostError

log = logging.getLogger("lora_train.comfyui")

#: the block lists of the diffusion models ComfyUI has (a layer inside one of these is a block's layer)
_BLOCKS = re.compile(r"(^|\.)(blocks|layers|transformer_blocks|single_blocks|double_blocks|joint_blocks|"
                     r"single_transformer_blocks|input_blocks|middle_block|output_blocks|noise_refiner|"
                     r"context_refiner)\.\d+\.")


class _NoConv:
    conv_rank = 0


_NO_CONV = _NoConv()


def rope_autograd() -> List[str]:
    """comfy_kitchen (the kernels ComfyUI >= 0.8 calls for RoPE: comfy/ldm/flux/math.py takes `apply_rope` and
    `apply_rope1` from it; Flux, Chroma, FLUX.2, Qwen-Image, Wan, Z-Image / Lumina, HiDream use them) defines them as
    torch custom ops with no backward ("Trying to backward through comfy_kitchen.apply_rope1.default but no autograd
    formula was registered"), so no gradient reaches our adapters before them. RoPE rotates each pair by a 2 x 2
    matrix of freqs_cis (..., d/2, 2, 2): the input's gradient is the same op with the matrices transposed. That
    backward is registered for each op that has none (found by a tiny CPU probe; an op with its own is left alone);
    forwards are unchanged. Returns the ops it registered."""
    try:
        import comfy_kitchen  # noqa: F401
        ops = torch.ops.comfy_kitchen
    except (ImportError, AttributeError, RuntimeError):
        return []
    done = []
    x = torch.zeros(1, 1, 1, 2)
    f = torch.eye(2).reshape(1, 1, 1, 1, 2, 2)
    for name in ("apply_rope1", "apply_rope"):
        op = getattr(ops, name, None)
        if op is None:
            continue
        xr = x.clone().requires_grad_(True)
        try:
            out = op(xr, f) if name == "apply_rope1" else op(xr, xr * 1, f)[0]
            out.sum().backward()
            continue  # it has a backward
        except RuntimeError as exc:
            if "autograd" not in str(exc):
                continue
        except Exception:  # noqa: BLE001 - another signature / device: leave it
            continue

        def setup(ctx, inputs, output):
            ctx.freqs_t = inputs[-1].transpose(-1, -2)

        if name == "apply_rope1":
            def backward(ctx, grad):
                return ops.apply_rope1(grad.contiguous(), ctx.freqs_t), None
        else:
            def backward(ctx, gq, gk):
                return (None if gq is None else ops.apply_rope1(gq.contiguous(), ctx.freqs_t),
                        None if gk is None else ops.apply_rope1(gk.contiguous(), ctx.freqs_t), None)
        torch.library.register_autograd(f"comfy_kitchen::{name}", backward, setup_context=setup)
        done.append(name)
    if done:
        log.info("lora_train: registered the backward of comfy_kitchen's %s (RoPE) for training", ", ".join(done))
    return done


def _safe(path: str) -> str:
    return path.replace(".", "|")


class _Wrapped(nn.Module):
    """One layer's adapters; ComfyUI calls it with the layer's weight (cast to the compute dtype and device) and
    uses what it returns: W + strength x delta(W) (networks/delta.NetworkDelta's formula)."""

    def __init__(self, box: nn.Module):
        super().__init__()
        self.parametrizations = nn.ModuleDict({"weight": box})  # names as delta.is_adapter_parameter knows them

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        box = self.parametrizations["weight"]
        dev = next(box.parameters()).device
        if dev != weight.device:
            box.to(weight.device)
        plain = _plain_lora(box)
        if plain is not None:  # W + s up @ down as one addmm: no full-size temporaries beside W' (and its grad)
            dm, s = plain
            up = dm.lora_up.reshape(dm.lora_up.shape[0], -1).to(weight.dtype)
            down = dm.lora_down.reshape(dm.lora_down.shape[0], -1).to(weight.dtype)
            out = torch.addmm(weight.reshape(weight.shape[0], -1), up, down, alpha=dm.scale() * s).reshape(weight.shape)
        else:
            out = box(weight)
        out._lora_train_weight = True  # saved for backward as it is (_pack_saved)
        return out

    def move_to(self, device=None):  # ComfyUI's move_weight_functions
        if device is not None:
            self.to(device)
        return sum(p.numel() * p.element_size() for p in self.parameters())


def _pack_saved(t: torch.Tensor):
    """Autograd's saved tensors during our forward: activations are copied when saved, the weights are not.
    ComfyUI's models are written for inference and add to their residual streams in place (Flux / Chroma / FLUX.2
    blocks: `x += apply_mod(...)` after `pre_norm(x)` saved x for its backward), which autograd rejects ("modified by
    an inplace operation") or, under checkpointing, recomputes from the changed tensor. A copy of each saved
    activation keeps the values the backward needs; parameters and our W + delta (tagged) are never changed in place
    and are kept as they are (no copy of the weights)."""
    if isinstance(t, nn.Parameter) or getattr(t, "_lora_train_weight", False):
        return t
    return t.detach().clone()


def _unpack_saved(t: torch.Tensor) -> torch.Tensor:
    return t


def _checkpointed(block_forward, args, kwargs):
    """One block's forward with activation checkpointing that gives the same gradients as without it, although
    ComfyUI's blocks add to their inputs in place (`x += ...`): torch's non-reentrant checkpoint would recompute the
    block from its changed input and keep aliases of tensors the block then changes. Here (reentrant checkpoint)
    the first pass runs without autograd on copies of the block's tensor inputs (nothing is kept: no W + delta of
    the block lives until the backward); the backward recomputes it from the saved inputs, again on copies, with
    saved activations copied (_pack_saved). Tensor keyword arguments are inputs too (gradients reach them), the
    rest (transformer_options, ...) is passed as it is; a dummy input that requires grad makes the outputs require
    grad when no input does (the first blocks: only our adapters inside them train)."""
    from torch.utils.checkpoint import checkpoint

    flat = list(args) + list(kwargs.values())
    idx = [i for i, v in enumerate(flat) if isinstance(v, torch.Tensor)]
    keys, n = list(kwargs), len(args)

    def body(_dummy, *tensors):
        vals = list(flat)
        for i, t in zip(idx, tensors):
            vals[i] = t.clone()
        with torch.autograd.graph.saved_tensors_hooks(_pack_saved, _unpack_saved):
            return block_forward(*vals[:n], **dict(zip(keys, vals[n:])))

    dummy = torch.empty(0, requires_grad=True)
    return checkpoint(body, dummy, *[flat[i] for i in idx], use_reentrant=True)


def _plain_lora(box) -> Optional[Tuple[Any, float]]:
    """(the LoRA, its strength) when the box holds one plain LoRA (no DoRA scale, no rank / module dropout), else
    None (the box's own formula: networks/delta.NetworkDelta)."""
    from ..networks.dora import LoraDelta

    if len(box.active) != 1:
        return None
    dm = box.adapters[box.active[0]]
    if type(dm) is not LoraDelta or dm.dora_scale is not None or dm.rank_dropout or dm.module_dropout:
        return None
    return dm, float(box.strength.get(box.active[0], 1.0))


class GraphDenoiser(nn.Module):
    """model.unet of an in-place model: our adapters only (ComfyUI's diffusion model is not a submodule, so
    `.to()` / `.parameters()` never touch its weights). `graph` holds the rest."""

    def __init__(self, graph: "Graph"):
        super().__init__()
        self.layers = nn.ModuleDict()
        object.__setattr__(self, "graph", graph)  # not a submodule

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def enable_gradient_checkpointing(self) -> None:
        self.graph.gradient_checkpointing(True)

    def forward(self, *a, **kw):  # pragma: no cover - the family calls the graph
        raise RuntimeError("an in-place ComfyUI model runs through its graph (families/comfyui.py)")


class _Frozen(nn.Module):
    """A ComfyUI VAE / CLIP as BaseModel.vae / text_encoder: its torch module is a child (the caches' identity
    hashes its weights), `.to()` moves nothing (ComfyUI places it), `dtype` is what our code feeds it."""

    def __init__(self, host_object: Any, module: Optional[nn.Module]):
        super().__init__()
        object.__setattr__(self, "host_object", host_object)
        if isinstance(module, nn.Module):
            self.inner = module

    def to(self, *a, **kw):
        return self

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def config(self):
        from types import SimpleNamespace

        return SimpleNamespace()


def _family_of(inner) -> Optional[str]:
    """Our family of ComfyUI's diffusion model by its keys (families' detect_keys on the original layout), or None."""
    from .. import families

    keys = ["model.diffusion_model." + k for k in inner.diffusion_model.state_dict().keys()]
    return next((f for f in families.DETECT_ORDER if families.get(f).detect_keys(keys)), None)


class Graph:
    """The graph's MODEL / CLIP / VAE as one trainable model (see the module docstring)."""

    def __init__(self, model: Any, clip: Any, vae: Any, guidance: float = 1.0):
        inner = getattr(model, "model", None)
        if inner is None or not hasattr(inner, "apply_model") or not hasattr(inner, "diffusion_model"):
            raise HostError("the MODEL input is not a ComfyUI model (no ModelPatcher.model.apply_model): connect the "
                            "MODEL output of a checkpoint or diffusion-model loader.")
        if clip is None or not hasattr(clip, "encode_from_tokens_scheduled"):
            raise HostError("the CLIP input is missing: connect the CLIP (text encoder) loaded for this MODEL.")
        if vae is None or not hasattr(vae, "encode"):
            raise HostError("the VAE input is missing: connect the VAE loaded for this MODEL.")
        self.source = model
        self.patcher = model.clone()  # our weight wrappers go on the clone: the graph's MODEL stays as it was
        self.inner = self.patcher.model
        self.clip, self.vae = clip, vae
        self.guidance = float(guidance)
        self.family = _family_of(self.inner)  # None: a family we do not know (generic targets)
        if self.family and not self._targets(self._modules(), self._pattern(), _NO_CONV):
            self.family = None  # detected (SD1 takes any original-layout UNet key) but none of its modules here
        cfg = getattr(self.inner, "model_config", None)
        self.config_name = type(cfg).__name__ if cfg is not None else type(self.inner).__name__
        self.denoiser = GraphDenoiser(self)
        self.wrapped: Dict[str, _Wrapped] = {}
        self.loaded = False
        self._ckpt: List[nn.Module] = []

    # ------------------------------------------------------------------ what it is
    @property
    def sampling(self):
        return self.inner.model_sampling

    @property
    def is_flow(self) -> bool:
        """A flow (CONST) model: sigmas in [0, 1], x_t = sigma noise + (1 - sigma) x0."""
        ms = self.sampling
        return not hasattr(ms, "sigmas") or float(ms.sigma_max) <= 1.0 + 1e-6

    @property
    def prediction(self) -> str:
        """eps | v | flow | x0 | other: what calculate_denoised says of the raw output."""
        ms = self.sampling
        names = [c.__name__ for c in type(ms).__mro__]
        for n, p in (("CONST", "flow"), ("V_PREDICTION", "v"), ("X0", "x0"), ("EPS", "eps")):
            if n in names:
                return p
        return "other"

    def describe(self) -> str:
        from .. import families

        known = (f"{families.get(self.family).title}: its default LoRA modules" if self.family else
                 "a family lora_train has no defaults for: every Linear of its blocks")
        n = getattr(self, "n_targets", 0)
        return (f"in place on ComfyUI's {self.config_name} ({known}{f', {n} layers' if n else ''}; "
                f"{self.prediction} objective from its model_sampling); no copy of its weights")

    # ------------------------------------------------------------------ text and latents
    def encode_text(self, captions: Sequence[str]) -> Dict[str, torch.Tensor]:
        """Per caption ComfyUI's CONDITIONING as tensors: "cross_attn" padded to the longest of the chunk with its
        length in "cross_attn_len", and the tensor entries of its dict (pooled_output, attention masks, ...)."""
        rows = []
        for c in captions:
            cond = self.clip.encode_from_tokens_scheduled(self.clip.tokenize(c))
            t, extra = cond[0][0], dict(cond[0][1])
            row = {"cross_attn": t[0].float().cpu()}
            for k, v in extra.items():
                if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == 1:
                    row[f"extra.{k}"] = v[0].float().cpu() if v.is_floating_point() else v[0].cpu()
                elif v is None:  # kept as None: extra_conds read some keys unconditionally (Flux / Chroma:
                    row[f"none.{k}"] = torch.tensor(0.0)  # kwargs["pooled_output"], None without CLIP-L)
                elif isinstance(v, (int, float, bool)):
                    row[f"scalar.{k}"] = torch.tensor(float(v))
                else:
                    log.info("lora_train: conditioning entry %r (%s) is not cached; the model gets its default",
                             k, type(v).__name__)
            rows.append(row)
        n = max(r["cross_attn"].shape[0] for r in rows)
        out: Dict[str, List[torch.Tensor]] = {}
        for r in rows:
            ca = r["cross_attn"]
            r["cross_attn_len"] = torch.tensor(ca.shape[0])
            r["cross_attn"] = torch.cat([ca, ca.new_zeros((n - ca.shape[0],) + ca.shape[1:])]) if ca.shape[0] < n else ca
            for k, v in r.items():
                out.setdefault(k, []).append(v)
        keys = set(out)
        if any(set(r) != keys for r in rows):
            raise HostError("the CLIP gave conditionings of different kinds for different captions; use one text "
                            "encoder setup for the whole dataset.")
        return {k: torch.stack(v) for k, v in out.items()}

    @staticmethod
    def unpack(row: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, Any]]:
        """(cross_attn (1, L, D), the CONDITIONING dict) of one cached caption."""
        n = int(row["cross_attn_len"])
        extra: Dict[str, Any] = {}
        for k, v in row.items():
            if k.startswith("extra."):
                extra[k[len("extra."):]] = v[None]
            elif k.startswith("scalar."):
                extra[k[len("scalar."):]] = float(v)
            elif k.startswith("none."):
                extra[k[len("none."):]] = None
        return row["cross_attn"][:n][None], extra

    def vae_factor(self) -> int:
        try:
            return int(self.vae.spacial_compression_encode())
        except (AttributeError, TypeError, ValueError):
            return 8

    def encode_latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> the model's latents (process_latent_in of the VAE's)."""
        img = ((pixels.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu()
        if getattr(self.vae, "latent_dim", 2) == 3:  # a video VAE (Wan, Qwen-Image) reads a batch as frames of one
            lat = torch.cat([self.vae.encode(img[i:i + 1]) for i in range(img.shape[0])])  # video: 1 frame each
        else:
            lat = self.vae.encode(img)
        return self.inner.process_latent_in(lat.float()).float().cpu()

    # ------------------------------------------------------------------ the network
    def _modules(self) -> Dict[str, nn.Module]:
        return dict(self.inner.diffusion_model.named_modules())

    def targets(self, spec) -> List[Tuple[str, nn.Module, bool]]:
        """[(path in the diffusion model, layer, is a 3x3+ conv)]: ComfyUI layers (weight_function) that are the
        family's default LoRA targets (families' kohya names; SD UNets: kohya's attention / feed-forward / proj
        layers), or for a family we do not know every Linear inside its block lists; 3x3 convs with conv_rank."""
        out = self._targets(self._modules(), self._pattern(), spec)
        if not out:
            raise HostError(f"no trainable layers found in the {self.config_name} diffusion model (no ComfyUI Linear "
                            f"layers in its blocks).")
        return out

    def _pattern(self) -> Optional[re.Pattern]:
        known = self.known
        return re.compile(known.native_lora_pattern) if known is not None and known.native_lora_pattern else None

    @property
    def known(self):
        """Our Family of the model (its default modules, its files' metadata), or None."""
        from .. import families

        return families.get(self.family) if self.family else None

    @staticmethod
    def _targets(named, pat, spec) -> List[Tuple[str, nn.Module, bool]]:
        out = []
        for path, m in named.items():
            if not path or not hasattr(m, "weight_function") or getattr(m, "weight", None) is None:
                continue
            kname = "lora_unet_" + path.replace(".", "_")
            in_blocks = _BLOCKS.search(path) is not None
            if isinstance(m, nn.Conv2d) and tuple(m.weight.shape[2:]) != (1, 1):  # 3x3 convs: LoCon / conv_rank
                if spec.conv_rank > 0 and in_blocks:
                    out.append((path, m, True))
                continue
            if not isinstance(m, (nn.Linear, nn.Conv2d)):
                continue
            if pat is not None and pat.match(kname):  # the family's defaults (SD1's 1x1 proj_in / proj_out too)
                out.append((path, m, False))
            elif pat is None and isinstance(m, nn.Linear) and in_blocks:  # unknown family: every Linear of its blocks
                out.append((path, m, False))
        return out

    def inject(self, spec, lr: float, adapter: str) -> List[Dict[str, Any]]:
        """Our adapters on every target as weight wrappers of the clone; returns their optimizer parameter groups
        (LoRA+: the up / B side, each type's PLUS parameters, at loraplus_lr_ratio x lr)."""
        from ..networks import delta as delta_mod
        from ..networks.dora import LoraDelta
        from ..networks.layouts import DELTA_TYPES

        opts: Dict[str, Any] = {"rank_dropout": spec.rank_dropout, "module_dropout": spec.module_dropout}
        if spec.type == "lokr":
            opts.update(factor=spec.factor, full_matrix=spec.full_matrix)
        params: List[nn.Parameter] = []
        plus: List[nn.Parameter] = []
        targets = self.targets(spec)
        for path, m, conv in targets:
            rank, alpha = (spec.conv_rank, spec.conv_alpha) if conv else (spec.rank, spec.alpha)
            shape = tuple(m.weight.shape)
            if spec.type in ("lora", "locon"):
                dm = _lora(shape, rank, alpha, spec)
            elif spec.type == "dora":  # dora_scale from the stored weight (dequantised once, on the CPU)
                dm = LoraDelta.create(_dequant(m.weight), rank, alpha, dora=True,
                                      dora_on_output=spec.dora_on_output, **opts)
            else:  # LoHa / LoKr: shapes only
                dm = DELTA_TYPES[spec.type].create(torch.empty(shape, device="meta"), rank, alpha, **opts)
            box = delta_mod.NetworkDelta()
            box.adapters[adapter] = dm
            box.strength[adapter] = 1.0
            box.active.append(adapter)
            wrapped = _Wrapped(box)
            self.denoiser.layers[_safe(path)] = wrapped
            self.wrapped[path] = wrapped
            self.patcher.add_weight_wrapper(f"diffusion_model.{path}.weight", wrapped)
            up = {id(p) for p in dm.plus_parameters()}
            params += [p for p in dm.parameters() if id(p) not in up]
            plus += [p for p in dm.parameters() if id(p) in up]
        self.n_targets = len(targets)
        ratio = spec.loraplus_lr_ratio
        if ratio is None or float(ratio) == 1.0:
            return [{"params": params + plus, "lr": lr}]
        return [{"params": params, "lr": lr}, {"params": plus, "lr": lr * float(ratio), "loraplus": True}]

    def lora_weights(self, adapter: str):
        """LoraWeights of the adapters, keyed ("unet", native path) (kohya_name: lora_unet_<path with _>)."""
        from ..networks.dora import LoraDelta
        from ..networks.layouts import NetEntry
        from ..networks.lora import LoraWeights

        lw = LoraWeights()
        for path, wrapped in self.wrapped.items():
            dm = wrapped.parametrizations["weight"].adapters[adapter]
            t = dm.tensors()
            if isinstance(dm, LoraDelta) and dm.dora_scale is None:
                lw.modules[("unet", path)] = (t["lora_down.weight"], t["lora_up.weight"], float(dm.alpha))
            else:
                lw.extra[("unet", path)] = NetEntry(dm.TYPE, t)
        return lw

    def gradient_checkpointing(self, on: bool = True) -> None:
        """Checkpointing on each block of the diffusion model's block lists (as ComfyUI's TrainLoraNode), made safe
        for ComfyUI's in-place residual adds (`_checkpointed`)."""
        if not on or self._ckpt:
            return
        for name, mod in self.inner.diffusion_model.named_children():
            if not isinstance(mod, nn.ModuleList):
                continue
            for block in mod:
                fwd = block.forward

                def run(*a, _f=fwd, **kw):
                    return _checkpointed(_f, a, kw) if torch.is_grad_enabled() else _f(*a, **kw)
                block.forward = run
                block._lora_train_forward = fwd
                self._ckpt.append(block)

    def load(self) -> None:
        """ComfyUI loads the clone (weights where its memory manager puts them, our wrappers attached)."""
        if self.loaded:
            return
        import comfy.model_management as mm

        self.inner.requires_grad_(False)
        rope_autograd()
        mm.load_models_gpu([self.patcher], memory_required=0, force_full_load=True)
        self._unfreeze_inference_tensors()
        self.loaded = True

    def _unfreeze_inference_tensors(self) -> None:
        """ComfyUI runs its nodes under torch.inference_mode(), so the weights and buffers its loaders made are
        inference tensors, which autograd refuses to save for backward ("Inference tensors cannot be saved for
        backward": every LayerNorm / Linear the loss goes through). Each is swapped for a normal tensor on the same
        storage (no copy); `release` puts ComfyUI's own tensors back where they are still in place."""
        self._aliased = getattr(self, "_aliased", [])
        for mod in self.inner.modules():
            for store in (mod._parameters, mod._buffers):
                for name, t in list(store.items()):
                    if t is None or not t.is_inference():
                        continue
                    alias = torch.empty(0, dtype=t.dtype, device=t.device).set_(
                        t.untyped_storage(), t.storage_offset(), t.shape, t.stride())
                    if isinstance(t, nn.Parameter):
                        alias = nn.Parameter(alias, requires_grad=False)
                    store[name] = alias
                    self._aliased.append((store, name, t, alias))

    def _restore_inference_tensors(self) -> None:
        for store, name, t, alias in reversed(getattr(self, "_aliased", [])):
            if store.get(name) is alias:  # not moved / replaced by ComfyUI since
                store[name] = t
        self._aliased = []

    @property
    def device(self) -> torch.device:
        return getattr(self.patcher, "load_device", None) or torch.device("cpu")

    def release(self) -> None:
        """Our wrappers and checkpointing off ComfyUI's modules; the clone unloaded (the graph's MODEL is as it was)."""
        for block in self._ckpt:
            block.forward = block._lora_train_forward
            del block._lora_train_forward
        self._ckpt = []
        named = self._modules()
        for path, wrapped in self.wrapped.items():
            m = named.get(path)
            fns = getattr(m, "weight_function", None)
            if isinstance(fns, list):
                fns[:] = [f for f in fns if f is not wrapped]
        self.patcher.weight_wrapper_patches = {}
        try:
            import comfy.model_management as mm

            mm.unload_all_models()
            mm.soft_empty_cache()
        except ImportError:  # pragma: no cover
            pass
        self._restore_inference_tensors()
        self.loaded = False

    # ------------------------------------------------------------------ the objective
    def sample_timesteps(self, cfg, n: int, latent_hw, gen: torch.Generator) -> torch.Tensor:
        """(n,) timesteps: discrete models an index 0..999, flow models sigma x 1000 (module docstring)."""
        ms = self.sampling
        if not self.is_flow:
            return torch.randint(0, int(ms.sigmas.shape[0]), (n,), generator=gen).float()
        ts = getattr(cfg, "timestep_sampling", "auto") or "auto"
        if ts == "auto":
            u = torch.sigmoid(torch.randn(n, generator=gen) * float(getattr(cfg, "sigmoid_scale", 1.0)))
            with torch.no_grad():
                s = torch.stack([torch.as_tensor(ms.sigma(ms.timestep(x))).float().reshape(()) for x in u])
            return s.clamp(1e-4, 1.0) * 1000.0
        from ..training import flow as flow_train

        opts = {"timestep_sampling": ts, "weighting_scheme": getattr(cfg, "weighting_scheme", "none") or "none",
                "discrete_flow_shift": float(cfg.discrete_flow_shift if cfg.discrete_flow_shift is not None
                                             else getattr(ms, "shift", 1.0)),
                "sigmoid_scale": float(cfg.sigmoid_scale), "logit_mean": float(cfg.logit_mean),
                "logit_std": float(cfg.logit_std), "mode_scale": float(cfg.mode_scale)}
        if ts in ("sigma", "flux_shift"):
            opts["timestep_sampling"] = "shift"  # ComfyUI's own schedule has no diffusers scheduler here
        return flow_train.sample_sigmas(opts, n, latent_hw, gen).clamp(1e-4, 1.0) * 1000.0

    def sigmas_of(self, timesteps: torch.Tensor) -> torch.Tensor:
        if self.is_flow:
            return timesteps.float() / 1000.0
        s = self.sampling.sigmas
        return s[timesteps.long().clamp(0, s.shape[0] - 1).to(s.device)].float()

    def snr(self, timesteps: torch.Tensor) -> torch.Tensor:
        """SNR of the timesteps (discrete models: 1 / sigma^2), for min-SNR weighting."""
        return 1.0 / self.sigmas_of(timesteps.cpu()).cpu() ** 2

    def _conditioning(self, cross, extra, x, sigma, device):
        import comfy.sampler_helpers
        import comfy.samplers

        d = dict(extra)
        if self.guidance is not None and "guidance" not in d:
            d["guidance"] = self.guidance
        conds = comfy.sampler_helpers.convert_cond([[cross.to(device), d]])
        conds = comfy.samplers.encode_model_conds(self.inner.extra_conds, conds, x, device, "positive",
                                                  latent_image=torch.zeros_like(x), denoise_mask=None, seed=0)
        return comfy.samplers.get_area_and_mult(conds[0], x, sigma)

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, conds: Sequence[Dict[str, torch.Tensor]]) -> torch.Tensor:
        """x0 predictions of apply_model for noisy x (B, ...) at sigma (B,), one conditioning per sample; samples
        whose conditionings have the same shapes run as one batch (ComfyUI's can_concat_cond / cond_cat; not those
        ComfyUI would pad by repeating the shorter text, which changes a joint-attention model's output)."""
        import comfy.samplers

        device = x.device
        objs = []
        for i, row in enumerate(conds):
            cross, extra = self.unpack({k: v for k, v in row.items()})
            objs.append(self._conditioning(cross, extra, x[i:i + 1], sigma[i:i + 1], device))
        out: List[Optional[torch.Tensor]] = [None] * len(objs)
        todo = list(range(len(objs)))
        opts = dict(getattr(self.patcher, "model_options", {}) or {})
        while todo:
            first = todo[0]
            group = [j for j in todo if j == first or _same_shapes(objs[first], objs[j])
                     and comfy.samplers.can_concat_cond(objs[first], objs[j])]
            todo = [j for j in todo if j not in group]
            c = comfy.samplers.cond_cat([objs[j].conditioning for j in group])
            to = dict(opts.get("transformer_options", {}))
            to.update(cond_or_uncond=[0] * len(group), uuids=[objs[j].uuid for j in group],
                      sigmas=sigma[group])
            c["transformer_options"] = to
            xs = torch.cat([x[j:j + 1] for j in group])
            with (torch.autograd.graph.saved_tensors_hooks(_pack_saved, _unpack_saved) if torch.is_grad_enabled()
                  else contextlib.nullcontext()):
                pred = self.inner.apply_model(xs, sigma[group], **c)
            for k, j in enumerate(group):
                out[j] = pred[k:k + 1]
        return torch.cat(out)

    def native(self, x0_pred: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor, sigma: torch.Tensor
               ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(raw output, target) of the model's own objective from its x0 prediction (module docstring)."""
        ms = self.sampling
        view = sigma.reshape((-1,) + (1,) * (xt.dim() - 1)).to(xt.device, torch.float32)
        ones, zeros = torch.ones_like(xt, dtype=torch.float32), torch.zeros_like(xt, dtype=torch.float32)
        b = ms.calculate_denoised(view, ones, zeros).float()  # x0 = a x + b out
        a = ms.calculate_denoised(view, zeros, ones).float()
        ax = a * xt.float()
        return (x0_pred.float() - ax) / b, (x0.float() - ax) / b

    def loss(self, latents: torch.Tensor, conds, noise: torch.Tensor, timesteps: torch.Tensor, *,
             autocast=None, reduction: str = "mean", input_noise=None, elementwise=None, mask=None, weights=None,
             min_snr_gamma=None, in_dtype=None, **_ignored) -> torch.Tensor:
        """The per-sample losses of the model's own objective (see `native`), with the trainer's options."""
        import contextlib

        self.load()
        dev = self.device
        x0 = latents.to(dev, torch.float32)
        sigma = self.sigmas_of(timesteps).to(dev)
        view = sigma.reshape((-1,) + (1,) * (x0.dim() - 1))
        xt = self.sampling.noise_scaling(view, (noise if input_noise is None else input_noise).to(dev).float(), x0,
                                         False)
        with (autocast or contextlib.nullcontext)():
            x0_pred = self.denoise(xt.to(in_dtype or torch.float32), sigma, conds)
        out, target = self.native(x0_pred, x0, xt, sigma)
        if input_noise is not None:  # ip_noise_gamma: the target stays the plain noise's
            _, target = self.native(x0_pred, x0, self.sampling.noise_scaling(view, noise.to(dev).float(), x0, False),
                                    sigma)
        per = (out - target) ** 2 if elementwise is None else elementwise(out, target)
        if mask is not None:
            per = per * mask.to(per.device, per.dtype)
        loss = per.reshape(per.shape[0], -1).mean(dim=1)
        if weights is not None:
            loss = loss * weights.to(loss.device, loss.dtype)
        if min_snr_gamma and not self.is_flow and self.prediction in ("eps", "v"):
            snr = (1.0 / sigma.float() ** 2)
            w = torch.clamp(snr, max=float(min_snr_gamma))
            loss = loss * (w / (snr + 1) if self.prediction == "v" else w / snr)
        if reduction == "none":
            return loss
        return loss.mean()


def _same_shapes(a, b) -> bool:
    """The same entries, tensors of the same shapes (what is not a tensor, e.g. Lumina / Z-Image's num_tokens
    CONDConstant, is left to can_concat_cond)."""
    ca, cb = a.conditioning, b.conditioning
    if ca.keys() != cb.keys():
        return False
    for k in ca:
        x, y = getattr(ca[k], "cond", None), getattr(cb[k], "cond", None)
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.shape == y.shape):
                return False
    return True


def _key(v):
    return v[0] if isinstance(v, tuple) else v


def _dequant(w: torch.Tensor) -> torch.Tensor:
    """A layer's weight as float32 on the CPU (ComfyUI's fp8 / quantized tensors dequantised)."""
    if hasattr(w, "dequantize") and not w.is_floating_point():
        w = w.dequantize()
    try:
        return w.detach().float().cpu()
    except (RuntimeError, TypeError):
        return w.dequantize().detach().float().cpu()


def _lora(shape, rank: int, alpha: float, spec):
    """A LoRA (LoCon on convs) weight delta: down kaiming-uniform as kohya / peft, up zero."""
    from ..networks.dora import LoraDelta

    k = tuple(shape[2:])
    m = LoraDelta((rank, shape[1]) + k, (shape[0], rank) + (1,) * len(k), alpha,
                  rank_dropout=spec.rank_dropout, module_dropout=spec.module_dropout)
    with torch.no_grad():
        nn.init.kaiming_uniform_(m.lora_down, a=math.sqrt(5))
        nn.init.zeros_(m.lora_up)
    return m


def base_model(model: Any, clip: Any, vae: Any, name: str = "", guidance: float = 1.0):
    """The graph's MODEL / CLIP / VAE as a BaseModel of the in-place family (families/comfyui.py)."""
    from types import SimpleNamespace

    from .. import families
    from ..models.base import BaseModel

    g = Graph(model, clip, vae, guidance)
    vae_w = _Frozen(vae, getattr(vae, "first_stage_model", None))
    object.__setattr__(vae_w, "graph", g)
    te_w = _Frozen(clip, getattr(clip, "cond_stage_model", None))
    sched = SimpleNamespace(config=SimpleNamespace(num_train_timesteps=1000))
    res = g.known.native_resolution if g.known is not None else 1024
    return BaseModel(unet=g.denoiser, vae=vae_w, text_encoder=te_w, tokenizer=None, noise_scheduler=sched,
                     kind="comfyui", name=name or f"comfyui:{g.config_name}", path="", native_resolution=res,
                     extra={"graph": g})


def applies(model: Any, lora_sd: Dict[str, torch.Tensor]) -> Tuple[int, int, List[str]]:
    """(modules of the file ComfyUI's own key map and load_lora apply to the graph's MODEL, modules in the file, the
    names it does not apply): comfy.lora.model_lora_keys_unet + comfy.lora.load_lora, as LoraLoader does."""
    import comfy.lora

    inner = getattr(model, "model", model)
    key_map = comfy.lora.model_lora_keys_unet(inner, {})
    loaded = comfy.lora.load_lora(lora_sd, key_map, log_missing=False)
    modules = sorted({k.split(".")[0] for k in lora_sd})
    missing = [m for m in modules if m not in key_map or _key(key_map[m]) not in loaded]
    return len(modules) - len(missing), len(modules), missing

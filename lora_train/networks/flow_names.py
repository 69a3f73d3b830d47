"""Flux.1 and SD3/SD3.5 LoRA names: diffusers module paths <-> kohya sd-scripts' names, fused modules, metadata.

We train peft LoRA on the diffusers modules, which are SPLIT (`attn.to_q`, `attn.to_k`, `attn.to_v`, `proj_mlp`),
while sd-scripts and every host that reads its files (ComfyUI, Forge, diffusers' kohya converter) name the
modules after the original BFL / MMDiT models, where some of them are ONE fused Linear:

Flux (`kind="flux"`), `transformer_blocks.N` -> `lora_unet_double_blocks_N_`:
  attn.to_q + to_k + to_v -> img_attn_qkv (fused)   attn.add_q_proj + add_k_proj + add_v_proj -> txt_attn_qkv (fused)
  attn.to_out.0 -> img_attn_proj   attn.to_add_out -> txt_attn_proj   norm1.linear -> img_mod_lin
  norm1_context.linear -> txt_mod_lin   ff.net.0.proj / ff.net.2 -> img_mlp_0 / img_mlp_2   ff_context.* -> txt_mlp_*
`single_transformer_blocks.N` -> `lora_unet_single_blocks_N_`:
  attn.to_q + to_k + to_v + proj_mlp -> linear1 (fused, 4 parts)   proj_out -> linear2   norm.linear -> modulation_lin
SD3 / SD3.5 (`kind="sd3"`), `transformer_blocks.N` -> `lora_unet_joint_blocks_N_`:
  attn.to_q/k/v -> x_block_attn_qkv (fused)   attn.add_q/k/v_proj -> context_block_attn_qkv (fused)
  attn2.to_q/k/v -> x_block_attn2_qkv (fused; SD3.5 Medium's dual-attention blocks)   attn2.to_out.0 -> x_block_attn2_proj
  attn.to_out.0 -> x_block_attn_proj   attn.to_add_out -> context_block_attn_proj   ff.* -> x_block_mlp_fc1/fc2
  ff_context.* -> context_block_mlp_fc1/fc2   norm1.linear -> x_block_adaLN_modulation_1
  norm1_context.linear -> context_block_adaLN_modulation_1. The last block's context side is "pre-only": diffusers'
  AdaLayerNormContinuous orders its two chunks (scale, shift) where MMDiT has (shift, scale), so the rows of that
  module's lora_up are swapped between the halves on export and import (as diffusers' checkpoint converter does
  with the weight). Same for `final_layer_adaLN_modulation_1` (norm_out.linear), which is no default target.
Text encoders: `lora_te1_` CLIP-L and `lora_te2_` CLIP-G (named in lora.py, as for SDXL, with `text_model`),
`lora_te3_` T5-XXL (`lora_te3_encoder_block_N_layer_M_SelfAttention_q`, ...; sd-scripts uses te3 for T5 in Flux
too) - T5 is only trained with sd-scripts' `train_t5xxl`. Components: unet, te1, te2 (SD3 CLIP-G), te3 (T5).

Default targets = sd-scripts' defaults (tests/data/flux_sd3_lora_names.json): every Linear of the Flux double/single
blocks and of the SD3 joint blocks (Flux 304 modules, SD3 Medium 237, SD3.5 Medium 263, SD3.5 Large 377).

Fused modules in the file. Read: a file made by sd-scripts' default (one LoRA on the fused Linear: down r x in,
up sum(out) x r) gives each part the same down, its rows of up, the same alpha and rank: exact. A block-diagonal one
(what sd-scripts' split_qkv and our export write) gives each part its own rows of down and its diagonal block of up.
Write (trained split): ONE pair per fused module, down = cat of the parts' downs (rank R = sum of the parts' ranks),
up = block-diagonal (sum of the parts' out dims x R), alpha = (the parts' alpha / rank) * R, so that every host's
scale alpha / R times up @ down is exactly our trained delta. (sd-scripts' own split_qkv save keeps the parts'
alpha, which makes other hosts apply the fused module at 1/3 or 1/4 strength; we do not copy that.) A group whose
parts share one down (read from an sd-scripts default file) is written back in that compact form.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from .. import families

FLOW_KINDS = families.FLOW

Lora = Tuple[torch.Tensor, torch.Tensor, float]  # (down r x in, up out x r, alpha)
T5_TARGET_PARENTS = ("SelfAttention", "DenseReluDense")  # T5 attention q/k/v/o and the gated MLP wi_0/wi_1/wo


class FlowNameError(ValueError):
    """A path or kohya name that is not part of the Flux / SD3 LoRA layout (lora.py turns it into LoraFormatError)."""


@dataclass(frozen=True)
class Group:
    """One kohya module: its component, the diffusers paths it covers (in fused order) and their out dims."""

    name: str
    component: str
    paths: Tuple[str, ...]
    out_dims: Tuple[int, ...] = ()
    swap_halves: bool = False  # lora_up rows (scale, shift) <-> (shift, scale): pre-only AdaLayerNormContinuous
    default: bool = True  # a default training target (extras are read only)


def _family(kind: str):
    if kind not in FLOW_KINDS:
        raise FlowNameError(f"model kind {kind!r} is not a flow-matching family ({', '.join(FLOW_KINDS)}).")
    return families.get(kind)


def _check_kind(kind: str) -> str:
    _family(kind)
    return kind


def kind_of(transformer: nn.Module) -> Optional[str]:
    """The flow family of a diffusers transformer (peft-wrapped or not) by its class, else None."""
    return families.by_transformer_class(type(transformer).__name__)


def _split_block_path(kind: str, path: str) -> Optional[Tuple[str, int, str, Tuple[Tuple[str, Tuple[str, ...]], ...]]]:
    for block, kblock, table in _family(kind).lora_blocks:
        m = re.match(rf"^{block}\.(\d+)\.(.+)$", path)
        if m:
            return kblock, int(m.group(1)), m.group(2), table
    return None


def locate(kind: str, path: str) -> Tuple[str, int, int]:
    """(kohya name, part index, number of parts) of a diffusers transformer module path."""
    _check_kind(kind)
    hit = _split_block_path(kind, path)
    if hit:
        kblock, i, rest, table = hit
        for suffix, parts in table:
            if rest in parts:
                return f"lora_unet_{kblock}_{i}_{suffix}", parts.index(rest), len(parts)
    for suffix, p in _family(kind).lora_extras.items():
        if p == path:
            return f"lora_unet_{suffix}", 0, 1
    raise FlowNameError(f"{path!r} is not a module of the {kind} LoRA layout (sd-scripts names no module there).")


def kohya_name(component: str, path: str, kind: str) -> str:
    """kohya name of a transformer (`unet`) or T5 (`te3`) module; CLIP te1/te2 are named in lora.py."""
    if component == "unet":
        return locate(kind, path)[0]
    if component == "te3":
        return "lora_te3_" + path.replace(".", "_")
    raise FlowNameError(f"component {component!r} is not named here (unet, te3).")


def _linear_like(m: nn.Module) -> bool:
    m = getattr(m, "base_layer", m)
    return isinstance(m, (nn.Linear, nn.Conv2d))


def _named_linears(module: nn.Module) -> Dict[str, nn.Module]:
    out = {}
    for name, m in module.named_modules():
        if any(p in ("base_layer", "lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_dropout")
               for p in name.split(".")):
            continue
        if _linear_like(m):
            out[name] = getattr(m, "base_layer", m)
    return out


def _out_dim(m: nn.Module) -> int:
    return int(m.out_features if isinstance(m, nn.Linear) else m.out_channels)


def _in_dim(m: nn.Module) -> int:
    return int(m.in_features if isinstance(m, nn.Linear) else m.in_channels)


def unet_groups(kind: str, transformer: nn.Module, extras: bool = True) -> Dict[str, Group]:
    """kohya name -> Group for every default target of this transformer (and the read-only extras)."""
    fam = _family(kind)
    lin = _named_linears(transformer)
    out: Dict[str, Group] = {}
    for block, kblock, table in fam.lora_blocks:
        idx = sorted({int(m.group(1)) for m in (re.match(rf"^{block}\.(\d+)\.", n) for n in lin) if m})
        for i in idx:
            for suffix, parts in table:
                paths = tuple(f"{block}.{i}.{p}" for p in parts)
                if not all(p in lin and isinstance(lin[p], nn.Linear) for p in paths):
                    continue
                dims = tuple(_out_dim(lin[p]) for p in paths)
                swap = suffix in fam.swapped_suffixes and dims[0] == 2 * _in_dim(lin[paths[0]])
                name = f"lora_unet_{kblock}_{i}_{suffix}"
                out[name] = Group(name, "unet", paths, dims, swap)
    if extras:
        for suffix, p in fam.lora_extras.items():
            if p in lin:
                name = f"lora_unet_{suffix}"
                out[name] = Group(name, "unet", (p,), (_out_dim(lin[p]),), suffix in fam.swapped_extras, default=False)
    return out


def target_modules(kind: str, transformer: nn.Module) -> List[str]:
    """The diffusers module paths trained by default: exactly sd-scripts' default module set once fused."""
    return [p for g in unet_groups(kind, transformer, extras=False).values() for p in g.paths]


def t5_target_modules(t5: nn.Module) -> List[str]:
    """Every Linear of T5's attention and gated MLP (sd-scripts' te3 targets with train_t5xxl)."""
    return [n for n, m in _named_linears(t5).items()
            if isinstance(m, nn.Linear) and any(f".{p}." in f".{n}." for p in T5_TARGET_PARENTS)]


def t5_groups(t5: nn.Module) -> Dict[str, Group]:
    lin = _named_linears(t5)
    return {kohya_name("te3", p, "flux"): Group(kohya_name("te3", p, "flux"), "te3", (p,), (_out_dim(lin[p]),))
            for p in t5_target_modules(t5)}


def t5_encoder(model) -> Optional[nn.Module]:
    """The T5 of a flow BaseModel (Flux's text_encoder_2, SD3's text_encoder_3), or None."""
    return _family(model.kind).t5_encoder(model)


def components(model) -> List[Tuple[str, nn.Module]]:
    """[(component, module)] of a flow BaseModel: unet, then the text encoders its family names (te1 CLIP-L, te2
    SD3's CLIP-G, te3 T5)."""
    return _family(model.kind).components(model)


def diffusers_prefixes(kind: str) -> Dict[str, str]:
    """Key prefixes of diffusers' pipelines' LoRA files -> our components (what the pipeline loads)."""
    return dict(_family(kind).diffusers_prefixes)


# ----------------------------------------------------------------------------- export
def _swap_halves(up: torch.Tensor) -> torch.Tensor:
    h = up.shape[0] // 2
    return torch.cat([up[h:], up[:h]], dim=0)


def _shared_down(parts: Sequence[Optional[Lora]]) -> bool:
    if any(p is None for p in parts):
        return False
    d0, _, a0 = parts[0]
    if any(a != a0 or d.shape != d0.shape for d, _, a in parts[1:]):
        return False
    if all(d is d0 for d, _, _ in parts):
        return True
    return d0.device.type != "meta" and all(torch.equal(d, d0) for d, _, _ in parts[1:])


def fuse(kind: str, name: str, n_parts: int, parts: Dict[int, Lora]) -> Lora:
    """One kohya pair for a fused module from its trained parts {part index: (down, up, alpha)}.

    Parts sharing one down (a file read from sd-scripts' default layout) are written compact (down r x in,
    up stacked); otherwise block-diagonal with alpha scaled to the total rank. A missing part (not trained) gets
    zero rows of up; its out dim is taken from a trained attention part (q, k, v have one out dim) or, for Flux's
    proj_mlp, as 4 x the input dim (Flux's mlp_ratio)."""
    listed = [parts.get(j) for j in range(n_parts)]
    present = [p for p in listed if p is not None]
    if not present:
        raise FlowNameError(f"{name}: no part to write.")
    in_dim = int(present[0][0].shape[1])
    attn_dims = [int(p[1].shape[0]) for j, p in enumerate(listed) if p is not None and j < 3]
    dims = []
    for j, p in enumerate(listed):
        if p is not None:
            dims.append(int(p[1].shape[0]))
        elif j < 3:
            dims.append(attn_dims[0] if attn_dims else in_dim)
        else:
            dims.append(4 * in_dim)
    if _shared_down(listed):
        down, _, alpha = listed[0]
        return down, torch.cat([p[1] for p in listed], dim=0), alpha
    d0, u0, a0 = present[0]
    scale = float(a0) / float(d0.shape[0])
    ranks = [int(p[0].shape[0]) if p is not None else 0 for p in listed]
    total = sum(ranks)
    down = torch.cat([p[0] for p in present], dim=0)
    up = torch.zeros((sum(dims), total), dtype=u0.dtype, device=u0.device)
    row = col = 0
    for j, p in enumerate(listed):
        if p is not None:
            d, u, a = p
            s = float(a) / float(d.shape[0])
            up[row:row + dims[j], col:col + ranks[j]] = u if s == scale else u * (s / scale)
        row, col = row + dims[j], col + ranks[j]
    return down, up, scale * total


def export_modules(modules: Mapping[Tuple[str, str], Lora], kind: str, name_of: Callable[[str, str], str]
                   ) -> List[Tuple[str, Lora]]:
    """[(kohya name, (down, up, alpha))] sorted by name: transformer parts fused as sd-scripts saves them; other
    components named with `name_of(component, path)` (lora.kohya_name)."""
    fam = _family(kind)
    out: Dict[str, Lora] = {}
    fused: Dict[str, Tuple[int, Dict[int, Lora]]] = {}
    for (comp, path), v in modules.items():
        if comp != "unet":
            out[name_of(comp, path)] = v
            continue
        name, j, n = locate(kind, path)
        if n == 1:
            down, up, alpha = v
            swap = (name[len("lora_unet_"):] in fam.swapped_extras or
                    (name.endswith(fam.swapped_suffixes or ("\0",)) and up.shape[0] == 2 * down.shape[1]))
            out[name] = (down, _swap_halves(up) if swap else up, alpha)
        else:
            fused.setdefault(name, (n, {}))[1][j] = v
    for name, (n, parts) in fused.items():
        out[name] = fuse(kind, name, n, parts)
    return sorted(out.items())


# ----------------------------------------------------------------------------- import
def split(group: Group, down: torch.Tensor, up: torch.Tensor, alpha: float) -> Dict[Tuple[str, str], Lora]:
    """Our per-module pairs for one kohya module of the file (see the module docstring)."""
    if up.dim() != 2 and len(group.paths) > 1:
        raise FlowNameError(f"{group.name}: a fused module must be a Linear LoRA, got lora_up {tuple(up.shape)}.")
    want = sum(group.out_dims)
    if up.shape[0] != want or up.shape[1] != down.shape[0]:
        raise FlowNameError(f"LoRA module {group.name} has lora_down {tuple(down.shape)} / lora_up {tuple(up.shape)} "
                            f"but this base model needs {want} output rows: the LoRA was trained for another model.")
    if len(group.paths) == 1:
        return {(group.component, group.paths[0]): (down, _swap_halves(up) if group.swap_halves else up, alpha)}
    k, rank = len(group.paths), int(down.shape[0])
    starts = [sum(group.out_dims[:j]) for j in range(k)]
    out: Dict[Tuple[str, str], Lora] = {}
    if rank % k == 0:
        rb = rank // k
        block_diag = all(
            not up[starts[j]:starts[j] + group.out_dims[j], c * rb:(c + 1) * rb].any()
            for j in range(k) for c in range(k) if c != j)
        if block_diag:
            for j, p in enumerate(group.paths):
                out[(group.component, p)] = (down[j * rb:(j + 1) * rb].clone(),
                                             up[starts[j]:starts[j] + group.out_dims[j], j * rb:(j + 1) * rb].clone(),
                                             float(alpha) * rb / rank)
            return out
    for j, p in enumerate(group.paths):
        out[(group.component, p)] = (down.clone(), up[starts[j]:starts[j] + group.out_dims[j]].clone(), float(alpha))
    return out


# ----------------------------------------------------------------------------- weight-delta types (LoHa, LoKr, DoRA)
def part_rows(group: Group) -> List[torch.Tensor]:
    """For each of the group's paths: the row in the file's module of each of the layer's rows (fused parts are
    stacked in order; a swapped pre-only modulation has its halves exchanged)."""
    if group.swap_halves:
        h = group.out_dims[0] // 2
        return [torch.cat([torch.arange(h, 2 * h), torch.arange(0, h)])]
    starts = [sum(group.out_dims[:j]) for j in range(len(group.out_dims))]
    return [torch.arange(s, s + d) for s, d in zip(starts, group.out_dims)]


def fused_shape(group: Group, root: nn.Module) -> Tuple[int, ...]:
    lin = getattr(root.get_submodule(group.paths[0]), "base_layer", root.get_submodule(group.paths[0]))
    return (sum(group.out_dims), _in_dim(lin))


def fused_weight(group: Group, root: nn.Module) -> torch.Tensor:
    """The weight of the file's module (the original model's fused Linear) from our parts' base weights."""
    from .delta import base_weight

    ws = [base_weight(getattr(root.get_submodule(p), "base_layer", root.get_submodule(p))) for p in group.paths]
    out = torch.zeros(fused_shape(group, root), dtype=torch.float32, device=ws[0].device)
    for w, rows in zip(ws, part_rows(group)):
        out[rows.to(w.device)] = w.float()
    return out


def attach(root: nn.Module, group: Group, adapter: str, module, strength: float = 1.0) -> None:
    """Attach a weight-delta adapter `module` (LoHa, LoKr, DoRA: networks/delta.py) that holds the FILE's tensors
    of `group` (the fused module as sd-scripts + LyCORIS train it) to our split layers."""
    from . import delta as delta_mod

    layers = [root.get_submodule(p) for p in group.paths]
    if len(layers) == 1 and not group.swap_halves:
        delta_mod.add(layers[0], adapter, module, strength)
    else:
        delta_mod.add_group(layers, group.paths, part_rows(group), adapter, module, fused_shape(group, root),
                            strength)


def import_groups(model) -> Dict[str, Group]:
    """kohya name -> Group for the transformer (default targets and extras) and T5 of a flow BaseModel."""
    out = unet_groups(model.kind, model.unet)
    t5 = t5_encoder(model)
    if t5 is not None:
        out.update(t5_groups(t5))
    return out


_LORA_TAGS = (".lora_A.weight", ".lora_B.weight", ".lora_down.weight", ".lora_up.weight", ".alpha", ".dora_scale")


def diffusion_model_diffusers_names(sd: Mapping[str, torch.Tensor], transformer: nn.Module) -> Dict[str, torch.Tensor]:
    """A file whose `diffusion_model.` keys name the diffusers transformer's own modules (ai-toolkit's Z-Image and
    Qwen-Image LoRAs: `diffusion_model.layers.0.attention.to_q.lora_A.weight`) read as diffusers' peft layout
    (`transformer.` + the same path); any other file is returned as it is."""
    paths = set()
    for k in sd:
        if k.startswith("diffusion_model."):
            rest = k[len("diffusion_model."):]
            tag = next((t for t in _LORA_TAGS if rest.endswith(t)), None)
            if tag is None:
                return dict(sd)
            paths.add(rest[: -len(tag)])
    if not paths or not paths <= set(_named_linears(transformer)):
        return dict(sd)
    return {("transformer." + k[len("diffusion_model."):] if k.startswith("diffusion_model.") else k): v
            for k, v in sd.items()}


def bfl_keys_to_kohya(sd: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """`diffusion_model.<BFL/MMDiT path>.lora_A/lora_B/lora_down/lora_up.weight` (+ `.alpha`), as ComfyUI and some
    trainers write, -> kohya keys (`lora_unet_<path with _>.lora_down.weight`). Other keys are kept as they are."""
    out: Dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if not k.startswith("diffusion_model."):
            out[k] = v
            continue
        rest = k[len("diffusion_model."):]
        for tag, role in ((".lora_A.weight", "lora_down.weight"), (".lora_B.weight", "lora_up.weight"),
                          (".lora_down.weight", "lora_down.weight"), (".lora_up.weight", "lora_up.weight"),
                          (".alpha", "alpha")):
            if rest.endswith(tag):
                out["lora_unet_" + rest[: -len(tag)].replace(".", "_") + "." + role] = v
                break
        else:
            out[k] = v
    return out


def to_diffusers_state_dict(modules: Mapping[Tuple[str, str], Lora], kind: str) -> Dict[str, torch.Tensor]:
    """peft keys for diffusers' FluxPipeline / StableDiffusion3Pipeline `load_lora_weights`, split as our modules
    (`transformer.transformer_blocks.0.attn.to_q.lora_A.weight`, `text_encoder.<path>...`), the scale alpha/rank
    folded into lora_A so that diffusers' default alpha (= rank) applies the same delta. Flux's T5 (diffusers does
    not load LoRA into it) is left out."""
    pre = {c: p for p, c in diffusers_prefixes(kind).items()}
    out: Dict[str, torch.Tensor] = {}
    for (comp, path), (down, up, alpha) in sorted(modules.items()):
        if comp not in pre:  # a component the pipeline does not load (Flux's T5)
            continue
        key = pre[comp] + path
        out[f"{key}.lora_A.weight"] = (down.float() * (float(alpha) / down.shape[0])).contiguous()
        out[f"{key}.lora_B.weight"] = up.float().contiguous()
    return out


# ----------------------------------------------------------------------------- metadata
def metadata_for(kind: str, variant: Optional[str], training: Optional[Mapping[str, object]] = None) -> Dict[str, str]:
    """The family's metadata keys as sd-scripts writes them, for the trainer to merge into its `ss_*` metadata.

    kind/variant as BaseModel.kind / BaseModel.extra["variant"]: flux-dev -> ss_base_model_version "flux1",
    modelspec.architecture "flux-1-dev/lora"; flux-schnell -> "flux1", "flux-1-schnell/lora"; sd3-medium ->
    "medium", "stable-diffusion-3-medium/lora"; sd35-medium -> "5-medium", "stable-diffusion-3-5-medium/lora";
    sd35-large -> "5-large", "stable-diffusion-3-5-large/lora" (each family's `file_metadata`). A variant of None
    gets the family's stem ("flux-1/lora", "stable-diffusion-3/lora"); a variant of another family is an error.
    ss_network_module is the family's module (networks.lora_flux / networks.lora_sd3). `training` {sd-scripts
    argument name: value} adds `ss_<name>` for the keys the family records (its `training_keys`; e.g.
    timestep_sampling, discrete_flow_shift, guidance_scale); others are ignored.
    """
    fam = _family(kind)
    if variant is not None and variant not in fam.variants:
        raise FlowNameError(f"unknown {kind} variant {variant!r}: expected one of {', '.join(fam.variants)}.")
    meta = {"ss_v2": "False", "ss_network_module": fam.network_module}
    meta.update(fam.file_metadata(variant))
    for k, v in (training or {}).items():
        if k in fam.training_keys and v is not None:
            meta[f"ss_{k}"] = v if isinstance(v, str) else (f"{v:g}" if isinstance(v, float) else str(v))
    return meta

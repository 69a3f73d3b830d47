"""LoRA adapters: peft injection with kohya's default targets, kohya-format export/import, strength.

Kohya names (DESIGN.md): `lora_unet_<module path with _>` for SD1/SD2 UNets (diffusers block names),
`lora_te_text_model_<...>` for the SD1/SD2 text encoder; each module stores `.lora_down.weight`,
`.lora_up.weight` and `.alpha` (scale = alpha / rank). The `text_model` level is written whatever the
transformers version (transformers 5 dropped it from CLIPTextModel's module paths).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn
from ..io_utils import save_safetensors
from .. import families
from . import flow_names
from . import delta as delta_mod
from .layouts import NetEntry, detect as detect_type, entry_from_group, state_dict_entries
from .locon import resnet_target_modules
from .sdxl_names import diffusers_to_sgm_path

UNET_TARGET_PARENTS = ("Transformer2DModel", "SpatialTransformer")
TE_TARGET_SUFFIXES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                      "mlp.fc1", "mlp.fc2")
DEFAULT_ADAPTER = "lora_train"


class LoraFormatError(ValueError):
    """A file that is not a LoRA we can read, or that does not fit the model."""


# ----------------------------------------------------------------------------- targets and names
def _is_target_layer(m: nn.Module) -> bool:
    if isinstance(m, nn.Linear):
        return True
    return isinstance(m, nn.Conv2d) and tuple(m.kernel_size) == (1, 1)


def _base(m: nn.Module) -> nn.Module:
    """The original layer of a peft-wrapped one."""
    return getattr(m, "base_layer", m)


def unet_target_modules(unet: nn.Module) -> List[str]:
    """Every Linear / 1x1 conv inside the UNet's transformer blocks (kohya's default targets).

    Flux / SD3 transformers: sd-scripts' default set, split as diffusers has it (flow_names.target_modules)."""
    flow_kind = flow_names.kind_of(unet)
    if flow_kind:
        return flow_names.target_modules(flow_kind, unet)
    names: List[str] = []
    for pname, parent in unet.named_modules():
        if type(parent).__name__ not in UNET_TARGET_PARENTS:
            continue
        for cname, child in parent.named_modules():
            if not cname or ".base_layer" in cname or cname.endswith("base_layer") or ".lora_" in cname \
                    or cname.startswith("lora_"):
                continue
            if _is_target_layer(_base(child)) and not _has_peft_parent(parent, cname):
                names.append(f"{pname}.{cname}" if pname else cname)
    return names


def _has_peft_parent(root: nn.Module, cname: str) -> bool:
    parts = cname.split(".")
    return any(p in ("lora_A", "lora_B", "base_layer", "lora_embedding_A", "lora_embedding_B") for p in parts)


def denoiser_target_modules(model) -> List[str]:
    """The LoRA targets of a BaseModel's denoiser: the UNet's transformer blocks (SD1/SD2/SDXL), or sd-scripts'
    default set of a Flux / SD3 transformer (flow_names.target_modules)."""
    if families.is_flow(model):
        return flow_names.target_modules(model.kind, model.unet)
    return unet_target_modules(model.unet)


def te_target_modules(text_encoder: nn.Module) -> List[str]:
    names = []
    for name, m in text_encoder.named_modules():
        if any(name.endswith(s) for s in TE_TARGET_SUFFIXES) and _is_target_layer(_base(m)):
            names.append(name)
    return names


def te_canonical_path(path: str) -> str:
    """Module path as transformers 4.x names it (with the `text_model.` level)."""
    return path if path.startswith("text_model.") else "text_model." + path


def kohya_name(component: str, path: str, kind: str = "sd1") -> str:
    """component: unet | te | te1 | te2 (| te3). SDXL UNet paths are renamed to kohya's SGM block names; Flux / SD3
    transformer and T5 paths are named in flow_names (a fused module's parts share one name)."""
    if families.get(kind).flow and component in ("unet", "te3"):
        return flow_names.kohya_name(component, path, kind)
    if component == "unet":
        if families.get(kind).sgm_unet_names:
            path = diffusers_to_sgm_path(path)
        return "lora_unet_" + path.replace(".", "_")
    prefix = {"te": "lora_te_", "te1": "lora_te1_", "te2": "lora_te2_"}[component]
    return prefix + te_canonical_path(path).replace(".", "_")


# ----------------------------------------------------------------------------- the LoRA as data
@dataclass
class LoraWeights:
    """Module-level LoRA weights keyed by (component, module path in our models)."""

    modules: Dict[Tuple[str, str], Tuple[torch.Tensor, torch.Tensor, float]] = field(default_factory=dict)
    metadata: Dict[str, str] = field(default_factory=dict)
    #: modules of the weight-delta types (LoHa, LoKr, DoRA; networks/layouts.py), same keys as `modules`
    extra: Dict[Tuple[str, str], NetEntry] = field(default_factory=dict)

    def components(self) -> List[str]:
        return sorted({c for c, _ in self.modules} | {c for c, _ in self.extra})

    def rank(self) -> int:
        return max((d.shape[0] for d, _, _ in self.modules.values()), default=0)


def _components(model) -> List[Tuple[str, nn.Module]]:
    """[(component, module)] of a BaseModel: unet, te (SD1/2) or te1/te2 (SDXL); Flux / SD3: flow_names.components."""
    if families.is_flow(model):
        return flow_names.components(model)
    out = [("unet", model.unet)]
    if model.text_encoder_2 is not None:
        out += [("te1", model.text_encoder), ("te2", model.text_encoder_2)]
    else:
        out.append(("te", model.text_encoder))
    return out


def conv_name_map(model) -> Dict[str, Tuple[str, str]]:
    """kohya module name -> ("unet", path) of the UNet's ResNet-block layers (LoCon / conv_rank targets)."""
    out: Dict[str, Tuple[str, str]] = {}
    for path, _ in resnet_target_modules(model.unet):
        try:
            out[kohya_name("unet", path, model.kind)] = ("unet", path)
        except (ValueError, KeyError):
            continue
    return out


def name_map(model) -> Dict[str, Tuple[str, str]]:
    """kohya module name -> (component, module path) for every default target of the model (a fused Flux / SD3
    module -> its first part; flow_names.import_groups has all parts)."""
    out: Dict[str, Tuple[str, str]] = {}
    for comp, mod in _components(model):
        targets = unet_target_modules(mod) if comp == "unet" else \
            flow_names.t5_target_modules(mod) if comp == "te3" else te_target_modules(mod)
        for path in targets:
            out.setdefault(kohya_name(comp, path, model.kind), (comp, path))
    return out


# ----------------------------------------------------------------------------- peft injection
def inject(module: nn.Module, targets: List[str], rank: int, alpha: float, adapter: str = DEFAULT_ADAPTER,
           rank_pattern: Optional[Dict[str, int]] = None, alpha_pattern: Optional[Dict[str, float]] = None,
           dropout: float = 0.0) -> nn.Module:
    """Add a peft LoRA adapter to `targets` (exact module paths; Linear, 1x1 and 3x3 Conv2d). Works with
    peft 0.10 .. current."""
    from peft import LoraConfig, inject_adapter_in_model

    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=float(dropout),
                     init_lora_weights=True, rank_pattern=dict(rank_pattern or {}),
                     alpha_pattern=dict(alpha_pattern or {}))
    inject_adapter_in_model(cfg, module, adapter_name=adapter)
    return module


def lora_layers(module: nn.Module, adapter: str = DEFAULT_ADAPTER) -> Iterable[Tuple[str, nn.Module]]:
    for name, m in module.named_modules():
        la = getattr(m, "lora_A", None)
        if isinstance(la, nn.ModuleDict) and adapter in la:
            yield name, m


def lora_parameters(module: nn.Module, adapter: str = DEFAULT_ADAPTER) -> List[nn.Parameter]:
    params = []
    for _, m in lora_layers(module, adapter):
        params += list(m.lora_A[adapter].parameters()) + list(m.lora_B[adapter].parameters())
    return params + delta_mod.parameters(module, adapter)


def set_strength(module: nn.Module, strength: float, adapter: str = DEFAULT_ADAPTER) -> None:
    """Scale the adapter's output: effective scale = strength * alpha / rank."""
    for _, m in lora_layers(module, adapter):
        m.scaling[adapter] = float(strength) * float(m.lora_alpha[adapter]) / float(m.r[adapter])
    delta_mod.set_strength(module, strength, adapter)


def activate(module: nn.Module, adapter: str) -> None:
    """Make `adapter` active beside the already active ones on every layer that holds it."""
    for _, m in lora_layers(module, adapter):
        names = list(getattr(m, "active_adapters", []) or [])
        if adapter not in names:
            m.set_adapter(names + [adapter])
    delta_mod.activate(module, adapter)


def remove_adapter(module: nn.Module, adapter: str = DEFAULT_ADAPTER) -> None:
    """Take the adapter out again, leaving the wrapped layers' base weights untouched.

    The layers' active adapter lists are left to the caller (peft may activate a remaining adapter).
    """
    for _, m in list(lora_layers(module, adapter)):
        if hasattr(m, "delete_adapter"):
            m.delete_adapter(adapter)
            continue
        for attr in tuple(getattr(m, "adapter_layer_names", ())) + tuple(getattr(m, "other_param_names", ())):
            d = getattr(m, attr, None)
            if isinstance(d, (nn.ModuleDict, nn.ParameterDict, dict)) and adapter in d:
                del d[adapter]
        act = getattr(m, "_active_adapter", None)
        if act == adapter or (isinstance(act, list) and adapter in act):
            m._active_adapter = [a for a in ([act] if isinstance(act, str) else act) if a != adapter]
    delta_mod.remove(module, adapter)


def extract(model, adapter: str = DEFAULT_ADAPTER) -> LoraWeights:
    """Read the adapter's weights out of a BaseModel into LoraWeights."""
    lw = LoraWeights()
    for comp, mod in _components(model):
        for path, m in lora_layers(mod, adapter):
            down = m.lora_A[adapter].weight.detach().float().cpu().clone()
            up = m.lora_B[adapter].weight.detach().float().cpu().clone()
            lw.modules[(comp, path)] = (down, up, float(m.lora_alpha[adapter]))
        for path, dm in delta_mod.modules(mod, adapter):
            lw.extra[(comp, path)] = NetEntry(dm.TYPE, dm.tensors())
    return lw


def apply(model, lw: LoraWeights, adapter: str, strength: float = 1.0, strict: bool = True) -> List[str]:
    """Inject `lw` into the model as a peft adapter named `adapter`. Returns the kohya names not matched."""
    by_comp: Dict[str, Dict[str, Tuple[torch.Tensor, torch.Tensor, float]]] = {}
    for (comp, path), v in lw.modules.items():
        by_comp.setdefault(comp, {})[path] = v
    comps = dict(_components(model))
    comps.update(families.of(model).file_components(model, lw.metadata))  # Wan 2.2 A14B: the file's expert
    unmatched: List[str] = []
    kind = getattr(model, "kind", "sd1")

    def label(comp: str, p: str) -> str:
        try:
            return kohya_name(comp, p, kind)
        except (ValueError, KeyError):
            return f"{comp}:{p}"

    for comp, entries in by_comp.items():
        mod = comps.get(comp)
        if mod is None:
            unmatched += [label(comp, p) for p in entries]
            continue
        present = {n for n, _ in mod.named_modules()}
        ok = {p: v for p, v in entries.items() if p in present}
        unmatched += [label(comp, p) for p in entries if p not in present]
        if not ok:
            continue
        ranks = {p: int(v[0].shape[0]) for p, v in ok.items()}
        base_rank = max(set(ranks.values()), key=list(ranks.values()).count)
        pattern = {p: r for p, r in ranks.items() if r != base_rank}
        inject(mod, list(ok), base_rank, float(base_rank), adapter, rank_pattern=pattern)
        named = dict(mod.named_modules())
        for p, (down, up, alpha) in ok.items():
            if not set_pair(named[p], adapter, down, up, alpha):
                a, b = named[p].lora_A[adapter].weight, named[p].lora_B[adapter].weight
                raise LoraFormatError(f"LoRA module {label(comp, p)} has shapes {tuple(down.shape)}/"
                                      f"{tuple(up.shape)} but the model needs {tuple(a.shape)}/{tuple(b.shape)}: "
                                      f"the LoRA was trained for another base model.")
        activate(mod, adapter)
        set_strength(mod, strength, adapter)
        mod.requires_grad_(False)
    unmatched += _apply_extra(model, lw, adapter, strength, label)
    if strict and unmatched:
        raise LoraFormatError(f"{len(unmatched)} LoRA modules do not exist in this base model (first: "
                              f"{unmatched[0]}): the LoRA was trained for another model kind.")
    return unmatched


def set_pair(layer: nn.Module, adapter: str, down: torch.Tensor, up: torch.Tensor, alpha: float) -> bool:
    """Copy one module's (down, up, alpha) into an injected peft LoRA layer (scale = alpha / rank). False, with
    nothing copied, when the shapes differ from the layer's."""
    a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    if tuple(a.shape) != tuple(down.shape) or tuple(b.shape) != tuple(up.shape):
        return False
    with torch.no_grad():
        a.copy_(down.to(a.dtype))
        b.copy_(up.to(b.dtype))
    layer.lora_alpha[adapter] = float(alpha)
    layer.scaling[adapter] = float(alpha) / float(layer.r[adapter])
    return True


def _apply_extra(model, lw: LoraWeights, adapter: str, strength: float, label) -> List[str]:
    """Attach the weight-delta modules of `lw` (LoHa, LoKr, DoRA) as adapter `adapter`; the names not matched."""
    comps = dict(_components(model))
    unmatched: List[str] = []
    kind = getattr(model, "kind", None)
    groups = flow_names.import_groups(model) if families.get(kind).flow and lw.extra else {}
    for (comp, path), entry in sorted(lw.extra.items()):
        named = dict(comps[comp].named_modules()) if comp in comps else {}
        layer = named.get(path)
        if layer is None:
            unmatched.append(label(comp, path))
            continue
        base = getattr(layer, "base_layer", layer)
        dm = entry.module()
        group = groups.get(label(comp, path)) if comp == "unet" else None  # Flux / SD3: the file's (fused) module
        w = flow_names.fused_weight(group, comps[comp]) if group else delta_mod.base_weight(base)
        try:
            with torch.no_grad():
                if tuple(dm.delta(w.float().cpu()).shape) != tuple(w.shape):
                    raise RuntimeError(f"delta of another shape")
        except RuntimeError as exc:
            raise LoraFormatError(f"{entry.type} module {label(comp, path)} does not fit the model's weight "
                                  f"{tuple(w.shape)} ({exc}): the LoRA was trained for another base model.") from None
        dm.requires_grad_(False)
        if group:
            flow_names.attach(comps[comp], group, adapter, dm, strength)
        else:
            delta_mod.add(base, adapter, dm, strength)
    return unmatched


# ----------------------------------------------------------------------------- kohya file I/O
def to_kohya_state_dict(lw: LoraWeights, kind: str = "sd1", dtype: torch.dtype = torch.float32
                        ) -> Dict[str, torch.Tensor]:
    sd: Dict[str, torch.Tensor] = {}
    if families.get(kind).flow:  # fused modules written as sd-scripts saves them
        items = flow_names.export_modules(lw.modules, kind, lambda c, p: kohya_name(c, p, kind))
    else:
        items = [(kohya_name(comp, path, kind), v) for (comp, path), v in sorted(lw.modules.items())]
    for name, (down, up, alpha) in items:
        sd[f"{name}.lora_down.weight"] = down.to(dtype).contiguous()
        sd[f"{name}.lora_up.weight"] = up.to(dtype).contiguous()
        sd[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=dtype)
    for (comp, path), entry in sorted(lw.extra.items()):
        sd.update(state_dict_entries(kohya_name(comp, path, kind), entry, dtype))
    return sd


def save_kohya(lw: LoraWeights, path: str, kind: str = "sd1", metadata: Optional[Dict[str, str]] = None,
               overwrite: bool = False, dtype: torch.dtype = torch.float32) -> str:
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"'{path}' exists already: choose another output_name or pass --overwrite.")
    meta = {str(k): (v if isinstance(v, str) else json.dumps(v)) for k, v in (metadata or {}).items()}
    save_safetensors(to_kohya_state_dict(lw, kind, dtype), path, metadata=meta)
    return path


def _strip_prefixes(key: str) -> str:
    for p in ("base_model.model.",):
        if key.startswith(p):
            key = key[len(p):]
    return key


def from_state_dict(sd: Dict[str, torch.Tensor], model, metadata: Optional[Dict[str, str]] = None) -> LoraWeights:
    """Read kohya, diffusers (`unet.`/`text_encoder.` + lora_A/lora_B) or plain peft layouts."""
    lw = LoraWeights(metadata=dict(metadata or {}))
    flow = families.is_flow(model)
    if flow:
        sd = flow_names.bfl_keys_to_kohya(flow_names.diffusion_model_diffusers_names(sd, model.unet))
    keys = list(sd)
    if not keys:
        raise LoraFormatError("the LoRA file holds no tensors.")
    if any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_")) for k in keys):
        rev = name_map(model)
        fused = flow_names.import_groups(model) if flow else {}
        rev.update({n: v for n, v in conv_name_map(model).items() if n not in rev})
        groups: Dict[str, Dict[str, torch.Tensor]] = {}
        for k, v in sd.items():
            base, _, rest = k.partition(".")
            groups.setdefault(base, {})[rest] = v
        unknown = []
        for name, g in groups.items():
            typ = detect_type(g)
            if typ is not None:  # LoHa, LoKr, DoRA (networks/layouts.py)
                if name not in rev and name not in fused:
                    unknown.append(name)
                    continue
                key = rev[name] if name in rev else (fused[name].component, fused[name].paths[0])
                try:
                    lw.extra[key] = entry_from_group(typ, g)
                except (ValueError, KeyError, RuntimeError) as exc:  # RuntimeError: tensors that do not fit together
                    raise LoraFormatError(f"LoRA module {name} ({typ}): {exc}.") from None
                continue
            if "lora_down.weight" not in g or "lora_up.weight" not in g:
                continue  # e.g. LoCon/LyCORIS extras or dora scales we do not read
            if name not in rev and name not in fused:
                unknown.append(name)
                continue
            down, up = g["lora_down.weight"].float(), g["lora_up.weight"].float()
            alpha = float(g["alpha"].float().item()) if "alpha" in g else float(down.shape[0])
            if name in fused:  # Flux / SD3 transformer and T5: fused modules split into our parts
                try:
                    lw.modules.update(flow_names.split(fused[name], down, up, alpha))
                except flow_names.FlowNameError as exc:
                    raise LoraFormatError(str(exc)) from exc
                continue
            lw.modules[rev[name]] = (down, up, alpha)
        if unknown:
            lw.metadata["_unmatched"] = json.dumps(unknown)
            if not lw.modules and not lw.extra:
                raise LoraFormatError(f"none of the {len(unknown)} LoRA modules match this base model (first: "
                                      f"{unknown[0]}): the LoRA was made for another model kind.")
        return lw
    # diffusers / peft layouts
    comp_prefix = {"unet.": "unet", "text_encoder.": "te", "text_encoder_2.": "te2", "te1.": "te1"}
    if model.text_encoder_2 is not None:
        comp_prefix["text_encoder."] = "te1"
    if flow:
        comp_prefix = flow_names.diffusers_prefixes(model.kind)
    pairs: Dict[Tuple[str, str], Dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        k2 = _strip_prefixes(k)
        comp = "unet"
        for p, c in comp_prefix.items():
            if k2.startswith(p):
                comp, k2 = c, k2[len(p):]
                break
        for tag, role in ((".lora_A.", "down"), (".lora_B.", "up"), (".lora.down.", "down"), (".lora.up.", "up")):
            if tag in k2:
                path = k2.split(tag)[0]
                pairs.setdefault((comp, path), {})[role] = v
                break
        else:
            if k2.endswith(".alpha"):
                pairs.setdefault((comp, k2[: -len(".alpha")]), {})["alpha"] = v
    for (comp, path), g in pairs.items():
        if "down" not in g or "up" not in g:
            continue
        if comp in ("te", "te1", "te2", "te3"):
            path = _te_model_path(model, comp, path)
        alpha = float(g["alpha"].float().item()) if "alpha" in g else float(g["down"].shape[0])
        lw.modules[(comp, path)] = (g["down"].float(), g["up"].float(), alpha)
    if not lw.modules:
        raise LoraFormatError("no LoRA weights found: the file is neither kohya (lora_unet_*), diffusers "
                              "(unet.*.lora_A) nor peft (*.lora_A.weight) layout.")
    return lw


def _te_model_path(model, comp: str, path: str) -> str:
    """Map a text-encoder path with or without `text_model.` to the one the loaded model uses."""
    te = dict(_components(model)).get(comp)  # Flux / SD3: te1, te2 (CLIP-G), te3 (T5)
    if te is None and not families.is_flow(model):
        te = model.text_encoder_2 if comp == "te2" else model.text_encoder
    if te is None:
        return path
    present = {n for n, _ in te.named_modules()}
    for cand in (path, path[len("text_model."):] if path.startswith("text_model.") else "text_model." + path):
        if cand in present:
            return cand
    return path


def load_file(path: str, model) -> LoraWeights:
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise LoraFormatError(f"LoRA file '{path}' does not exist.")
    try:
        with safe_open(path, framework="pt") as fh:
            meta = fh.metadata() or {}
            sd = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:  # safetensors raises its own error types
        raise LoraFormatError(f"'{path}' is not a readable .safetensors file ({exc}).") from exc
    return from_state_dict(sd, model, meta)

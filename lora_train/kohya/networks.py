"""kohya's network modules and network_args (KOHYA_NETWORKS: import and export through one table) -> our
network keys, and back; refusals name the item we cannot train."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

from .. import families
from ..config import TrainConfig
from .common import KOHYA_DEFAULTS, KohyaConfigError, is_default, resolve_path, parse_kv_list


LYCORIS = "lycoris.kohya"
#: (kohya network_module, LyCORIS algo, dora_wd) -> our network_type, read by import and export (export writes the
#: first key of a type). A lora that also trains the 3x3 convolutions is our locon: kohya's networks.lora with
#: conv_dim, or LyCORIS' lora / locon (both train them unless the preset leaves them out).
KOHYA_NETWORKS = {
    ("networks.lora", "", False): "lora",
    **{(families.get(k).network_module, "", False): "lora" for k in families.FLOW},  # lora_flux, lora_sd3, ...
    (LYCORIS, "loha", False): "loha",
    (LYCORIS, "lokr", False): "lokr",
    (LYCORIS, "lora", True): "dora",
    (LYCORIS, "locon", True): "dora",
    (LYCORIS, "lora", False): "lora",
    (LYCORIS, "locon", False): "lora",
}
#: the family a kohya module trains (networks.lora and LyCORIS: any SD1 / SD2 / SDXL, LyCORIS also Flux / SD3);
#: the same names the families write into the files (Family.network_module)
MODULE_FAMILIES: Dict[str, Tuple[str, ...]] = {}
for _k in families.FLOW:  # sd-scripts' networks.lora_flux trains Flux.1 and Chroma
    MODULE_FAMILIES[families.get(_k).network_module] = MODULE_FAMILIES.get(families.get(_k).network_module, ()) + (_k,)
#: module -> the family it is written for (the first that names it)
MODULE_FAMILY = {m: fams[0] for m, fams in MODULE_FAMILIES.items()}
FAMILY_NAMES = dict({k: families.get(k).title for k in families.FLOW}, sd="SD1 / SD2 / SDXL")
#: LyCORIS presets we train -> whether they include the ResNet blocks' 3x3 convolutions
LYCORIS_PRESETS = {"full": True, "attn-mlp": False}
#: kohya_ss GUI LoRA_type -> (network_module, LyCORIS algo, the GUI fields it passes as network_args), as kohya_ss'
#: lora_gui.train_model builds them; the types we do not train are here so that the refusal names their algo
_LYCO_FIELDS = ("preset", "conv_dim", "conv_alpha", "rank_dropout", "module_dropout", "dora_wd", "use_scalar",
                "rank_dropout_scale", "train_norm", "bypass_mode")
_KOHYA_FIELDS = ("rank_dropout", "module_dropout", "conv_block_dims", "conv_block_alphas")
GUI_LORA_TYPES = {
    "Standard": ("networks.lora", "", _KOHYA_FIELDS),
    "Kohya LoCon": ("networks.lora", "", _KOHYA_FIELDS + ("conv_dim", "conv_alpha")),
    "LoCon": (LYCORIS, "locon", _LYCO_FIELDS + ("use_tucker",)),
    "LyCORIS/LoCon": (LYCORIS, "locon", _LYCO_FIELDS + ("use_tucker",)),
    "LyCORIS/LoHa": (LYCORIS, "loha", _LYCO_FIELDS + ("use_tucker",)),
    "LyCORIS/LoKr": (LYCORIS, "lokr", _LYCO_FIELDS + ("factor", "use_cp", "decompose_both", "full_matrix")),
    "Flux1": ("networks.lora_flux", "", ("split_mode", "split_qkv")),
    "LyCORIS/BOFT": (LYCORIS, "boft", ()), "LyCORIS/Diag-OFT": (LYCORIS, "diag-oft", ()),
    "LyCORIS/DyLoRA": (LYCORIS, "dylora", ()), "LyCORIS/GLoRA": (LYCORIS, "glora", ()),
    "LyCORIS/iA3": (LYCORIS, "ia3", ()), "LyCORIS/Native Fine-Tuning": (LYCORIS, "full", ()),
    "Kohya DyLoRA": ("networks.dylora", "", ()), "LoRA-FA": ("networks.lora_fa", "", ()),
    "Flux1 OFT": ("networks.oft_flux", "", ()),
}
#: kohya_ss GUI fields that only reach training through network_args (top-level keys of a GUI file)
GUI_NETWORK_FIELDS = tuple(sorted({"LyCORIS_preset" if f == "preset" else f for _, _, fs in GUI_LORA_TYPES.values()
                                   for f in fs} | {"train_blocks"}))
#: network_args that ask for something this trainer does not train (when on / set) -> what they are
REFUSED_ARGS = {
    "use_tucker": "LyCORIS' Tucker decomposition", "use_cp": "LyCORIS' Tucker decomposition",
    "use_scalar": "LyCORIS' trained scalar", "decompose_both": "LoKr with a decomposed w1",
    "unbalanced_factorization": "LoKr's unbalanced factorization", "train_norm": "training the norm layers",
    "rs_lora": "rank-stabilised LoRA scaling", "rank_dropout_scale": "rescaled rank dropout",
    "wd_on_output": "DoRA's scale per output channel", "conv_block_dims": "block-wise conv ranks",
    "train_t5xxl": "LoRA on T5-XXL", "split_qkv": "separate q / k / v LoRAs",
    "train_double_block_indices": "a subset of the Flux blocks", "train_single_block_indices":
    "a subset of the Flux blocks", "train_block_indices": "a subset of the SD3 blocks",
    **{k: "per-layer ranks of networks.lora_flux / lora_sd3" for k in (
        "img_attn_dim", "txt_attn_dim", "img_mlp_dim", "txt_mlp_dim", "img_mod_dim", "txt_mod_dim", "single_dim",
        "single_mod_dim", "in_dims", "emb_dims", "context_attn_dim", "context_mlp_dim", "context_mod_dim",
        "x_attn_dim", "x_mlp_dim", "x_mod_dim")},
}
#: network_args with no effect on what is trained (a computation mode; OFT-only options)
NETWORK_ARGS_NO_EFFECT = ("bypass_mode", "constrain", "rescaled", "verbose", "conv_block_alphas")
ACCEPTED_NETWORKS = ("networks.lora (conv_dim: LoCon), networks.lora_flux, networks.lora_sd3, lycoris.kohya with "
                     "algo=lora|locon|loha|lokr (dora_wd=True: DoRA)")


def _set(v: Any) -> bool:
    """Is a network_args option on / given? (False, 0, "", None and their strings are off.)"""
    return not is_default(v) and str(v).strip().lower() not in ("false", "none", "0")


def base_family(spec: str) -> Optional[str]:
    """The flow family ("flux", "sd3", ...) or "sd" (SD1 / SD2 / SDXL) of a base model told without loading it (lora_train.family: a tiny
    spec, a diffusers folder's model_index.json, a .safetensors header). None when that cannot tell."""
    from ..family import told_by_spec

    told = told_by_spec(spec)
    if told is None:
        return None
    return told[0] if families.get(told[0]).flow else "sd"


def _network_source(flat: Dict[str, Any]) -> Tuple[str, Dict[str, Any], str]:
    """(network_module, network_args, how the file named them): sd-scripts' keys, or the network_module and
    network_args kohya_ss builds from its LoRA_type and GUI fields."""
    module = flat.get("network_module")
    lt = flat.get("LoRA_type")
    if module or not lt:
        return str(module or "networks.lora"), parse_kv_list(flat.get("network_args") or [], "network_args"), \
            f"network_module '{module or 'networks.lora'}'"
    if str(lt) not in GUI_LORA_TYPES:
        raise KohyaConfigError("LoRA_type", f"LoRA_type '{lt}' is not available here: use one of "
                               f"{', '.join(t for t, v in GUI_LORA_TYPES.items() if _trainable(v[0], v[1]))}.")
    module, algo, fields = GUI_LORA_TYPES[str(lt)]
    nargs: Dict[str, Any] = {"algo": algo} if algo else {}
    for f in fields:
        src = "LyCORIS_preset" if f == "preset" else f
        if src in flat and flat[src] not in (None, ""):
            nargs[f] = flat[src]
    if nargs.pop("split_mode", False):
        nargs["train_blocks"] = "single"  # kohya_ss: split_mode trains the single blocks only
    return module, nargs, f"LoRA_type '{lt}'"


def _trainable(module: str, algo: str) -> bool:
    return any(k[0] == module and k[1] == algo for k in KOHYA_NETWORKS)


def _refuse(module: str, algo: str, dora: bool, nargs: Dict[str, Any], label: str) -> None:
    """A KohyaConfigError for a network (or a network_args option) this trainer does not train."""
    if not any(k[0] == module for k in KOHYA_NETWORKS):
        raise KohyaConfigError("network_module", f"{label} is not available here (it would train another kind of "
                               f"network): this trainer trains {ACCEPTED_NETWORKS}. Use kohya for {module}.")
    if (module, algo, dora) not in KOHYA_NETWORKS:
        what = f"algo={algo} with dora_wd=True" if dora and _trainable(module, algo) else f"algo={algo}"
        raise KohyaConfigError("network_args", f"{label} network_args {what} is not available here: use "
                               f"algo=lora, locon, loha or lokr (dora_wd=True with lora / locon: DoRA), or kohya + "
                               f"LyCORIS for it.")
    for k, what in REFUSED_ARGS.items():
        if k in nargs and _set(nargs[k]):
            raise KohyaConfigError("network_args", f"network_args {k}={nargs[k]} ({what}) is not available here: "
                                   f"remove it to train without it, or use kohya for it.")
    if str(nargs.get("train_blocks", "all")).lower() != "all":
        raise KohyaConfigError("network_args", f"network_args train_blocks={nargs['train_blocks']} (a subset of the "
                               f"Flux blocks) is not available here: this trainer trains all blocks; remove it.")
    preset = str(nargs.get("preset", "full"))
    if module == LYCORIS and preset not in LYCORIS_PRESETS:
        raise KohyaConfigError("network_args", f"network_args preset={preset} is not available here: use preset "
                               f"full (with the ResNet convolutions) or attn-mlp (without).")


def _conv(module: str, nargs: Dict[str, Any], flat: Dict[str, Any]) -> Tuple[int, Optional[float]]:
    """(conv_rank, conv_alpha) as the module trains them: kohya's networks.lora only with conv_dim (conv_alpha
    default 1); LyCORIS with its preset's convolutions at conv_dim, else network_dim (conv_alpha default
    network_alpha); none in Flux / SD3 modules."""
    dim, alpha = nargs.pop("conv_dim", None), nargs.pop("conv_alpha", None)
    if module == LYCORIS:
        if not LYCORIS_PRESETS[str(nargs.get("preset", "full"))]:
            return 0, None
        rank = int(float(dim or 0)) or int(flat.get("network_dim") or TrainConfig.lora_rank)
        a = alpha if not is_default(alpha) else flat.get("network_alpha")
        return rank, (None if is_default(a) else float(a))
    if module == "networks.lora" and dim not in (None, "") and int(float(dim)) > 0:
        return int(float(dim)), float(1.0 if alpha in (None, "") else alpha)
    if dim not in (None, "") and int(float(dim)) > 0:
        nargs["conv_dim"] = dim  # Flux / SD3 have no 3x3 convolutions: listed as not used
    return 0, None


def map_network(flat: Dict[str, Any], base_dir: str) -> Tuple[Dict[str, Any], Dict[str, Any], List[str],
                                                                 Dict[str, Any]]:
    """The network of flat kohya arguments -> (our network keys, the network_args left for the caller (block
    weights, loraplus, unknown), notes, not-used keys)."""
    module, nargs, label = _network_source(flat)
    lyco = module == LYCORIS
    algo = str(nargs.pop("algo", "lora") or "lora").lower() if lyco else ""
    dora = _set(nargs.pop("dora_wd", False)) if lyco else False
    _refuse(module, algo, dora, nargs, label)
    want, base = MODULE_FAMILIES.get(module), flat.get("pretrained_model_name_or_path")
    have = base_family(resolve_path(str(base), base_dir)) if want and base else None
    if have and have not in want:
        fix = families.get(have).network_module if have in families.FLOW else "networks.lora"
        names = " / ".join(FAMILY_NAMES[w] for w in want)
        raise KohyaConfigError("network_module", f"{label} trains {names}, but the base model '{base}' "
                               f"is {FAMILY_NAMES[have]}: set network_module = \"{fix}\", or point "
                               f"pretrained_model_name_or_path at a {names} model.")
    ours: Dict[str, Any] = {}
    notes: List[str] = []
    not_used: Dict[str, Any] = {}
    typ = KOHYA_NETWORKS[(module, algo, dora)]
    conv_rank, conv_alpha = _conv(module, nargs, flat)
    if typ == "lora" and conv_rank > 0:
        typ = "locon"
    ours.update(network_type=typ, conv_rank=conv_rank, conv_alpha=conv_alpha)
    if lyco and conv_rank and nargs.get("preset", "full") == "full":
        notes.append("LyCORIS' preset full also trains conv_in, conv_out and time_embedding: this trainer trains "
                     "the transformer and ResNet blocks (write preset=attn-mlp for the transformer blocks alone)")
    for k in ("rank_dropout", "module_dropout") + (("dropout",) if lyco else ()):
        if k in nargs:
            ours[k] = float(nargs.pop(k) or 0)
    if not lyco and flat.get("network_dropout"):
        ours["dropout"] = float(flat["network_dropout"])  # kohya's modules: the neuron dropout
    elif flat.get("network_dropout"):
        not_used["network_dropout"] = flat["network_dropout"]  # LyCORIS reads network_args dropout instead
    if typ == "lokr":
        ours["factor"] = int(nargs.pop("factor", -1))
        ours["full_matrix"] = _set(nargs.pop("full_matrix", False))
    for k in ("preset", "train_blocks") + NETWORK_ARGS_NO_EFFECT + tuple(REFUSED_ARGS):
        nargs.pop(k, None)  # at their defaults (_refuse)
    for k in ("dropout", "factor", "full_matrix", "dora_wd", "conv_dim"):
        v = nargs.pop(k, None)  # options this module does not read
        if _set(v) and v != -1:
            not_used[f"network_args.{k}"] = v
    if "LoRA_type" not in flat or flat.get("network_module"):  # sd-scripts: the GUI's fields are not arguments
        for k in GUI_NETWORK_FIELDS:
            if k in flat and _set(flat[k]) and KOHYA_DEFAULTS.get(k, object()) != flat[k]:
                not_used[k] = flat[k]
    elif flat.get("LoRA_type") == "Standard" and _set(flat.get("conv_dim")):
        notes.append(f"LoRA_type Standard trains no 3x3 convolutions in kohya_ss: conv_dim {flat['conv_dim']} is "
                     f"not used (LoRA_type Kohya LoCon trains them)")
    return ours, nargs, notes, not_used


def network_to_kohya(cfg: TrainConfig) -> Dict[str, Any]:
    """network_module / network_args / network_dropout that make kohya (+ LyCORIS) train cfg's network: the first
    KOHYA_NETWORKS key of its type, the module of the base model's family for lora, conv_dim / conv_alpha where the
    3x3 convolutions are trained (LyCORIS without them: preset=attn-mlp), factor / full_matrix, the dropouts."""
    family = base_family(cfg.base_model)
    typ = "lora" if cfg.network_type == "locon" else cfg.network_type
    module, algo, dora = next(k for k, t in KOHYA_NETWORKS.items() if t == typ)
    flow = family in families.FLOW
    if module == "networks.lora" and flow:
        module = families.get(family).network_module
    conv = 0 if flow else (cfg.conv_rank or (cfg.lora_rank if cfg.network_type == "locon" else 0))
    args: List[str] = [f"algo={algo}"] if algo else []
    if dora:
        args.append("dora_wd=True")
    if conv:
        args += [f"conv_dim={conv}", f"conv_alpha={float(conv if cfg.conv_alpha is None else cfg.conv_alpha):g}"]
    elif module == LYCORIS:
        args.append("preset=attn-mlp")  # LyCORIS' default preset trains the convolutions (at network_dim)
    if cfg.network_type == "lokr":
        args.append(f"factor={cfg.factor}")
        if cfg.full_matrix:
            args.append("full_matrix=True")
    for k in ("rank_dropout", "module_dropout") + (("dropout",) if module == LYCORIS else ()):
        if getattr(cfg, k):
            args.append(f"{k}={getattr(cfg, k):g}")
    return {"network_module": module, "network_args": args,
            "network_dropout": (cfg.dropout or None) if module != LYCORIS else None}



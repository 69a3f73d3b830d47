"""The hosts' weight-delta rules for LoRA / LoCon / LoHa / LoKr / DoRA files, written from their source.

A1111 1.10.1: extensions-builtin/Lora/network.py (NetworkModule.calc_scale, finalize_updown,
apply_weight_decompose), network_lora.py, network_hada.py, network_lokr.py, lyco_helpers.py; the weight a
layer gets is `weight + updown` (networks.network_apply_weights), updown already times the multiplier.
ComfyUI: comfy/lora.py load_lora (alpha, dora_scale per module) and comfy/weight_adapter/{lora,loha,lokr,
base}.py calculate_weight / weight_decompose; the weight a layer gets is what calculate_weight returns.
Both take the module's tensors `w` (names after `<module>.`) and the layer's weight; they return the delta.
"""
import torch


# ----------------------------------------------------------------------------- A1111 1.10.1
def _a1111_decompose(updown, orig_weight, dora_scale):
    dims = orig_weight.dim() - 1
    merged = updown + orig_weight
    norm = (merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1, keepdim=True)
            .reshape(merged.shape[1], *[1] * dims).transpose(0, 1))
    return merged * (dora_scale / norm) - orig_weight


def a1111_delta(w, orig_weight, multiplier):
    shape = orig_weight.shape
    alpha = w["alpha"].item() if "alpha" in w else None
    dim = None
    if "lora_up.weight" in w:  # network_lora.NetworkModuleLora (module types are tried in this order)
        up, down = w["lora_up.weight"], w["lora_down.weight"]
        if orig_weight.dim() == 2:
            up, down = up.reshape(up.shape[0], -1), down.reshape(down.shape[0], -1)
        else:  # Conv2d modules: down keeps its kernel, up is 1x1
            up = up.reshape(up.shape[0], -1, 1, 1) if up.dim() == 2 else up
            down = down.reshape(down.shape[0], -1, 1, 1) if down.dim() == 2 else down
        dim = down.shape[0]
        output_shape = [up.size(0), down.size(1)]
        if down.dim() == 4:
            output_shape += down.shape[2:]
        updown = (up.reshape(up.size(0), -1) @ down.reshape(down.size(0), -1)).reshape(output_shape)
    elif all(k in w for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")):  # network_hada
        w1a, w1b, w2a, w2b = w["hada_w1_a"], w["hada_w1_b"], w["hada_w2_a"], w["hada_w2_b"]
        dim = w1b.shape[0]
        output_shape = [w1a.size(0), w1b.size(1)]
        if w1b.dim() == 4:
            output_shape += w1b.shape[2:]
        u1 = (w1a.reshape(w1a.size(0), -1) @ w1b.reshape(w1b.size(0), -1)).reshape(output_shape)
        u2 = (w2a.reshape(w2a.size(0), -1) @ w2b.reshape(w2b.size(0), -1)).reshape(output_shape)
        updown = u1 * u2
    else:  # network_lokr
        w1 = w.get("lokr_w1")
        if w1 is None:
            w1 = w["lokr_w1_a"] @ w["lokr_w1_b"]
            dim = w["lokr_w1_b"].shape[0]
        w2 = w.get("lokr_w2")
        if w2 is None:
            w2 = w["lokr_w2_a"] @ w["lokr_w2_b"]
            dim = w["lokr_w2_b"].shape[0]
        output_shape = [w1.size(0) * w2.size(0), w1.size(1) * w2.size(1)]
        if orig_weight.dim() == 4:
            output_shape = orig_weight.shape
        if w2.dim() == 4:
            w1 = w1.unsqueeze(2).unsqueeze(2)
        updown = torch.kron(w1, w2.contiguous()).reshape(output_shape)
    # finalize_updown
    if len(output_shape) == 4:
        updown = updown.reshape(output_shape)
    if orig_weight.numel() == updown.numel():
        updown = updown.reshape(shape)
    scale = alpha / dim if (dim is not None and alpha is not None) else 1.0  # calc_scale
    updown = updown * scale
    if "dora_scale" in w:
        updown = _a1111_decompose(updown, orig_weight, w["dora_scale"])
    return updown * multiplier


# ----------------------------------------------------------------------------- ComfyUI
def _comfy_decompose(dora_scale, weight, lora_diff, alpha, strength):
    lora_diff = lora_diff * alpha
    weight_calc = weight + lora_diff
    if dora_scale.shape[0] == weight_calc.shape[0]:
        norm = weight.reshape(weight.shape[0], -1).norm(dim=1, keepdim=True).reshape(
            weight.shape[0], *[1] * (weight.dim() - 1))
    else:
        norm = (weight_calc.transpose(0, 1).reshape(weight_calc.shape[1], -1).norm(dim=1, keepdim=True)
                .reshape(weight_calc.shape[1], *[1] * (weight_calc.dim() - 1)).transpose(0, 1))
    norm = norm + torch.finfo(weight.dtype).eps
    weight_calc = weight_calc * (dora_scale / norm)
    if strength != 1.0:
        return weight + strength * (weight_calc - weight)
    return weight_calc


def comfy_delta(w, weight, strength):
    """calculate_weight(...) - weight for one module (strength_model = strength, no offset / function)."""
    weight = weight.clone()
    alpha_v = w["alpha"].item() if "alpha" in w else None
    dora_scale = w.get("dora_scale")
    if "lora_up.weight" in w:  # LoRAAdapter
        mat1, mat2 = w["lora_up.weight"], w["lora_down.weight"]
        alpha = alpha_v / mat2.shape[0] if alpha_v is not None else 1.0
        diff = torch.mm(mat1.flatten(start_dim=1), mat2.flatten(start_dim=1)).reshape(weight.shape)
    elif "hada_w1_a" in w:  # LoHaAdapter
        alpha = alpha_v / w["hada_w1_b"].shape[0] if alpha_v is not None else 1.0
        m1 = torch.mm(w["hada_w1_a"], w["hada_w1_b"])
        m2 = torch.mm(w["hada_w2_a"], w["hada_w2_b"])
        diff = (m1 * m2).reshape(weight.shape)
    else:  # LoKrAdapter
        dim = None
        w1 = w.get("lokr_w1")
        if w1 is None:
            dim = w["lokr_w1_b"].shape[0]
            w1 = torch.mm(w["lokr_w1_a"], w["lokr_w1_b"])
        w2 = w.get("lokr_w2")
        if w2 is None:
            dim = w["lokr_w2_b"].shape[0]
            w2 = torch.mm(w["lokr_w2_a"], w["lokr_w2_b"])
        if w2.dim() == 4:
            w1 = w1.unsqueeze(2).unsqueeze(2)
        alpha = alpha_v / dim if (alpha_v is not None and dim is not None) else 1.0
        diff = torch.kron(w1, w2).reshape(weight.shape)
    if dora_scale is not None:
        return _comfy_decompose(dora_scale, weight, diff, alpha, strength) - weight
    return (strength * alpha) * diff

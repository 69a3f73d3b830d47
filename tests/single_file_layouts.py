"""Test helper: a diffusers transformer state dict written back in its family's original single-file layout (what
ComfyUI's / the releases' diffusion model files hold), the inverse of diffusers' single-file converters, so that a
tiny model can stand in for a released file. tests/test_families_2026.py checks that the loader's conversion of
each gives back the same state dict exactly."""
import re

import torch

#: Flux-style double / single blocks (Chroma, FLUX.2): diffusers name -> BFL name (regexes over whole keys)
_DOUBLE = [(r"transformer_blocks\.(\d+)\.attn\.norm_q\.weight", r"double_blocks.\1.img_attn.norm.query_norm.scale"),
           (r"transformer_blocks\.(\d+)\.attn\.norm_k\.weight", r"double_blocks.\1.img_attn.norm.key_norm.scale"),
           (r"transformer_blocks\.(\d+)\.attn\.norm_added_q\.weight", r"double_blocks.\1.txt_attn.norm.query_norm.scale"),
           (r"transformer_blocks\.(\d+)\.attn\.norm_added_k\.weight", r"double_blocks.\1.txt_attn.norm.key_norm.scale"),
           (r"transformer_blocks\.(\d+)\.attn\.to_out\.0\.(\w+)", r"double_blocks.\1.img_attn.proj.\2"),
           (r"transformer_blocks\.(\d+)\.attn\.to_add_out\.(\w+)", r"double_blocks.\1.txt_attn.proj.\2"),
           (r"single_transformer_blocks\.(\d+)\.attn\.norm_q\.weight", r"single_blocks.\1.norm.query_norm.scale"),
           (r"single_transformer_blocks\.(\d+)\.attn\.norm_k\.weight", r"single_blocks.\1.norm.key_norm.scale"),
           (r"context_embedder\.(\w+)", r"txt_in.\1"), (r"x_embedder\.(\w+)", r"img_in.\1"),
           (r"proj_out\.(\w+)", r"final_layer.linear.\1")]
RENAMES = {
    "chroma": _DOUBLE + [
        (r"distilled_guidance_layer\.layers\.(\d+)\.linear_1\.(\w+)", r"distilled_guidance_layer.layers.\1.in_layer.\2"),
        (r"distilled_guidance_layer\.layers\.(\d+)\.linear_2\.(\w+)", r"distilled_guidance_layer.layers.\1.out_layer.\2"),
        (r"distilled_guidance_layer\.norms\.(\d+)\.weight", r"distilled_guidance_layer.norms.\1.scale"),
        (r"transformer_blocks\.(\d+)\.ff\.net\.0\.proj\.(\w+)", r"double_blocks.\1.img_mlp.0.\2"),
        (r"transformer_blocks\.(\d+)\.ff\.net\.2\.(\w+)", r"double_blocks.\1.img_mlp.2.\2"),
        (r"transformer_blocks\.(\d+)\.ff_context\.net\.0\.proj\.(\w+)", r"double_blocks.\1.txt_mlp.0.\2"),
        (r"transformer_blocks\.(\d+)\.ff_context\.net\.2\.(\w+)", r"double_blocks.\1.txt_mlp.2.\2"),
        (r"single_transformer_blocks\.(\d+)\.proj_out\.(\w+)", r"single_blocks.\1.linear2.\2")],
    "flux2": _DOUBLE + [
        (r"time_guidance_embed\.timestep_embedder\.linear_1\.(\w+)", r"time_in.in_layer.\1"),
        (r"time_guidance_embed\.timestep_embedder\.linear_2\.(\w+)", r"time_in.out_layer.\1"),
        (r"time_guidance_embed\.guidance_embedder\.linear_1\.(\w+)", r"guidance_in.in_layer.\1"),
        (r"time_guidance_embed\.guidance_embedder\.linear_2\.(\w+)", r"guidance_in.out_layer.\1"),
        (r"(double_stream_modulation_img|double_stream_modulation_txt|single_stream_modulation)\.linear\.(\w+)",
         r"\1.lin.\2"),
        (r"transformer_blocks\.(\d+)\.ff\.linear_in\.(\w+)", r"double_blocks.\1.img_mlp.0.\2"),
        (r"transformer_blocks\.(\d+)\.ff\.linear_out\.(\w+)", r"double_blocks.\1.img_mlp.2.\2"),
        (r"transformer_blocks\.(\d+)\.ff_context\.linear_in\.(\w+)", r"double_blocks.\1.txt_mlp.0.\2"),
        (r"transformer_blocks\.(\d+)\.ff_context\.linear_out\.(\w+)", r"double_blocks.\1.txt_mlp.2.\2"),
        (r"single_transformer_blocks\.(\d+)\.attn\.to_qkv_mlp_proj\.(\w+)", r"single_blocks.\1.linear1.\2"),
        (r"single_transformer_blocks\.(\d+)\.attn\.to_out\.(\w+)", r"single_blocks.\1.linear2.\2"),
        (r"norm_out\.linear\.(\w+)", r"final_layer.adaLN_modulation.1.\1")],
    "wan": [(r"scale_shift_table", "head.modulation"), (r"blocks\.(\d+)\.scale_shift_table", r"blocks.\1.modulation"),
            (r"condition_embedder\.time_embedder\.linear_1\.(\w+)", r"time_embedding.0.\1"),
            (r"condition_embedder\.time_embedder\.linear_2\.(\w+)", r"time_embedding.2.\1"),
            (r"condition_embedder\.text_embedder\.linear_1\.(\w+)", r"text_embedding.0.\1"),
            (r"condition_embedder\.text_embedder\.linear_2\.(\w+)", r"text_embedding.2.\1"),
            (r"condition_embedder\.time_proj\.(\w+)", r"time_projection.1.\1"),
            (r"blocks\.(\d+)\.attn1\.to_(q|k|v)\.(\w+)", r"blocks.\1.self_attn.\2.\3"),
            (r"blocks\.(\d+)\.attn2\.to_(q|k|v)\.(\w+)", r"blocks.\1.cross_attn.\2.\3"),
            (r"blocks\.(\d+)\.attn1\.to_out\.0\.(\w+)", r"blocks.\1.self_attn.o.\2"),
            (r"blocks\.(\d+)\.attn2\.to_out\.0\.(\w+)", r"blocks.\1.cross_attn.o.\2"),
            (r"blocks\.(\d+)\.attn1\.(norm_q|norm_k)\.(\w+)", r"blocks.\1.self_attn.\2.\3"),
            (r"blocks\.(\d+)\.attn2\.(norm_q|norm_k)\.(\w+)", r"blocks.\1.cross_attn.\2.\3"),
            (r"blocks\.(\d+)\.norm2\.(\w+)", r"blocks.\1.norm3.\2"),  # diffusers' norm2 is the cross-attention norm
            (r"blocks\.(\d+)\.ffn\.net\.0\.proj\.(\w+)", r"blocks.\1.ffn.0.\2"),
            (r"blocks\.(\d+)\.ffn\.net\.2\.(\w+)", r"blocks.\1.ffn.2.\2"),
            (r"proj_out\.(\w+)", r"head.head.\1")],
    "z_image": [(r"all_final_layer\.2-1\.(.+)", r"final_layer.\1"), (r"all_x_embedder\.2-1\.(.+)", r"x_embedder.\1"),
                (r"(.+)\.attention\.to_out\.0\.(\w+)", r"\1.attention.out.\2"),
                (r"(.+)\.attention\.norm_k\.(\w+)", r"\1.attention.k_norm.\2"),
                (r"(.+)\.attention\.norm_q\.(\w+)", r"\1.attention.q_norm.\2")],
    "qwen_image": [],  # diffusers' names are Qwen-Image's own
}
#: fused weights: (diffusers parts under a prefix, the original's name under the same prefix), per family
_FLUX_FUSED = [(r"transformer_blocks\.(\d+)\.", ("attn.to_q", "attn.to_k", "attn.to_v"), r"double_blocks.\1.img_attn.qkv"),
               (r"transformer_blocks\.(\d+)\.", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
                r"double_blocks.\1.txt_attn.qkv")]
FUSED = {"chroma": _FLUX_FUSED + [(r"single_transformer_blocks\.(\d+)\.",
                                   ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), r"single_blocks.\1.linear1")],
         "flux2": _FLUX_FUSED,
         "z_image": [(r"(.+\.attention)\.", ("to_q", "to_k", "to_v"), r"\1.qkv")]}

#: the originals' (shift, scale) modulations that diffusers' converter swaps to (scale, shift)
SWAPPED = {"flux2": ("final_layer.adaLN_modulation.",)}


def _swap_halves(t):
    """BFL's (shift, scale) modulation order <-> diffusers' (scale, shift)."""
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def original_layout(kind, sd, prefix="model.diffusion_model.", dtype=torch.bfloat16):
    """`sd` (a diffusers transformer's state dict) in the family's original layout, each key under `prefix`, in
    `dtype` (None: as they are)."""
    sd, out = dict(sd), {}
    for pre, parts, fused in FUSED.get(kind, []):
        first = re.compile(f"({pre}){re.escape(parts[0])}\\.(weight|bias)")
        for k in [k for k in sd if first.fullmatch(k)]:
            m = first.fullmatch(k)
            stem, param = m.group(1), m.group(m.lastindex)
            keys = [f"{stem}{x}.{param}" for x in parts]
            if all(x in sd for x in keys):
                out[f"{re.fullmatch(pre, stem).expand(fused)}.{param}"] = torch.cat([sd.pop(x) for x in keys])
    for k, v in sd.items():
        for pat, repl in RENAMES[kind]:
            if re.fullmatch(pat, k):
                k = re.fullmatch(pat, k).expand(repl)
                v = _swap_halves(v) if k.startswith(SWAPPED.get(kind, ())) else v
                break
        out[k] = v
    return {prefix + k: (v if dtype is None else v.to(dtype)).contiguous() for k, v in out.items()}


# ----------------------------------------------------------------------------- Wan 2.1 / Qwen-Image VAE
_RESIDUAL = {"norm1.gamma": "residual.0.gamma", "conv1.weight": "residual.2.weight", "conv1.bias": "residual.2.bias",
             "norm2.gamma": "residual.3.gamma", "conv2.weight": "residual.6.weight", "conv2.bias": "residual.6.bias",
             "conv_shortcut.weight": "shortcut.weight", "conv_shortcut.bias": "shortcut.bias"}


def _wan_vae_key(k):
    """One diffusers AutoencoderKLWan / AutoencoderKLQwenImage key in Wan 2.1's original VAE layout (what
    wan_2.1_vae.safetensors and ComfyUI's qwen_image_vae.safetensors hold), for the released structure (4 levels,
    2 residual blocks each: the shape diffusers' convert_wan_vae_to_diffusers is written for)."""
    flat = {"encoder.conv_in.": "encoder.conv1.", "decoder.conv_in.": "decoder.conv1.", "quant_conv.": "conv1.",
            "post_quant_conv.": "conv2.", "encoder.norm_out.gamma": "encoder.head.0.gamma",
            "decoder.norm_out.gamma": "decoder.head.0.gamma", "encoder.conv_out.": "encoder.head.2.",
            "decoder.conv_out.": "decoder.head.2."}
    for a, b in flat.items():
        if k.startswith(a):
            return b + k[len(a):]
    m = re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.+)", k)
    if m:
        return f"{m[1]}.middle.{2 * int(m[2])}.{_RESIDUAL[m[3]]}"
    m = re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", k)
    if m:
        return f"{m[1]}.middle.1.{m[2]}"
    m = re.fullmatch(r"encoder\.down_blocks\.(\d+)\.(.+)", k)
    if m:
        return f"encoder.downsamples.{m[1]}.{_RESIDUAL.get(m[2], m[2])}"
    m = re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", k)
    if m:
        return f"decoder.upsamples.{4 * int(m[1]) + int(m[2])}.{_RESIDUAL[m[3]]}"
    m = re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)", k)
    if m:
        return f"decoder.upsamples.{4 * int(m[1]) + 3}.{m[2]}"
    return k


def wan_vae_original_layout(vae, dtype=None):
    """A diffusers Wan-layout VAE's state dict in Wan 2.1's original layout (inverse of diffusers'
    convert_wan_vae_to_diffusers; tests check the round trip exactly)."""
    return {_wan_vae_key(k): (v if dtype is None else v.to(dtype)).detach().clone().contiguous()
            for k, v in vae.state_dict().items()}


# ----------------------------------------------------------------------------- text encoders as ComfyUI ships them
def comfy_text_encoder(te, dtype=None):
    """A transformers text encoder's state dict in the layout of ComfyUI's / Forge Neo's text encoder files:
    Qwen2.5-VL as the original checkpoint names it (`model.layers.*`, `visual.*`, no lm_head: qwen_2.5_vl_7b),
    Qwen3Model under `model.` (qwen_3_4b), T5 / UMT5 encoders as they are without the tied
    `encoder.embed_tokens` (t5xxl_fp16, umt5_xxl_fp16)."""
    out = {}
    for k, v in te.state_dict().items():
        if k.startswith("lm_head.") or k == "encoder.embed_tokens.weight":
            continue
        if k.startswith("model.language_model."):
            k = "model." + k[len("model.language_model."):]
        elif k.startswith("model.visual."):
            k = "visual." + k[len("model.visual."):]
        elif type(te).__name__ == "Qwen3Model":
            k = "model." + k
        out[k] = (v if dtype is None else v.to(dtype)).detach().clone().contiguous()
    return out


def scaled_fp8(sd):
    """`sd` as ComfyUI's older *_fp8_scaled files hold it: every 2-D weight as float8_e4m3fn over a per-tensor
    `scale_weight` (absmax / 448), a `scaled_fp8` marker; the rest as it is."""
    out = {}
    for k, v in sd.items():
        if k.endswith(".weight") and v.dim() == 2 and v.is_floating_point():
            scale = (v.float().abs().max() / 448.0).clamp_min(1e-12)
            out[k] = (v.float() / scale).to(torch.float8_e4m3fn)
            out[k[:-len("weight")] + "scale_weight"] = scale.reshape(())
        else:
            out[k] = v
    out["scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    return out

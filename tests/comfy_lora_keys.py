"""A fake of ComfyUI 0.8.0's LoRA key map for Flux / SD3 models (comfy/lora.py model_lora_keys_unet and
model_lora_keys_clip; comfy/utils.py flux_to_diffusers, MMDIT_MAP_BLOCK / mmdit_to_diffusers), transcribed from its
source so the CPU tests can check every name we write without ComfyUI. ComfyUI's model state dict is in the
BFL / MMDiT layout; here it is derived from a diffusers model with ComfyUI's own diffusers -> BFL tables (the same
tables ComfyUI uses to read diffusers LoRAs), so the fake needs no BFL model. The real ComfyUI is checked in
tests/test_flow_comfyui_real.py."""
from typing import Dict, Tuple

# comfy/lora.py LORA_CLIP_MAP
LORA_CLIP_MAP = {"mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2", "self_attn.k_proj": "self_attn_k_proj",
                 "self_attn.q_proj": "self_attn_q_proj", "self_attn.v_proj": "self_attn_v_proj",
                 "self_attn.out_proj": "self_attn_out_proj"}

# comfy/utils.py flux_to_diffusers: block_map (double / single), the q/k/v (+ proj_mlp) slices of the fused Linears
_FLUX_DOUBLE = {"attn.to_out.0": "img_attn.proj", "norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin",
                "attn.to_add_out": "txt_attn.proj", "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
                "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2",
                "attn.to_q": "img_attn.qkv", "attn.to_k": "img_attn.qkv", "attn.to_v": "img_attn.qkv",
                "attn.add_q_proj": "txt_attn.qkv", "attn.add_k_proj": "txt_attn.qkv", "attn.add_v_proj": "txt_attn.qkv"}
_FLUX_SINGLE = {"norm.linear": "modulation.lin", "proj_out": "linear2", "attn.to_q": "linear1", "attn.to_k": "linear1",
                "attn.to_v": "linear1", "proj_mlp": "linear1"}
_FLUX_BASIC = {"proj_out": "final_layer.linear", "x_embedder": "img_in",
               "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
               "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer", "context_embedder": "txt_in",
               "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
               "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
               "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
               "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
               "norm_out.linear": "final_layer.adaLN_modulation.1"}
# comfy/utils.py MMDIT_MAP_BLOCK (diffusers -> MMDiT) and the attn/attn2 q/k/v slices of mmdit_to_diffusers
_MMDIT_BLOCK = {"norm1_context.linear": "context_block.adaLN_modulation.1", "attn.to_add_out": "context_block.attn.proj",
                "ff_context.net.0.proj": "context_block.mlp.fc1", "ff_context.net.2": "context_block.mlp.fc2",
                "norm1.linear": "x_block.adaLN_modulation.1", "attn.to_out.0": "x_block.attn.proj",
                "attn2.to_out.0": "x_block.attn2.proj", "ff.net.0.proj": "x_block.mlp.fc1",
                "ff.net.2": "x_block.mlp.fc2",
                "attn.to_q": "x_block.attn.qkv", "attn.to_k": "x_block.attn.qkv", "attn.to_v": "x_block.attn.qkv",
                "attn.add_q_proj": "context_block.attn.qkv", "attn.add_k_proj": "context_block.attn.qkv",
                "attn.add_v_proj": "context_block.attn.qkv",
                "attn2.to_q": "x_block.attn2.qkv", "attn2.to_k": "x_block.attn2.qkv", "attn2.to_v": "x_block.attn2.qkv"}
_MMDIT_BASIC = {"context_embedder": "context_embedder", "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
                "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2", "pos_embed.proj": "x_embedder.proj",
                "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
                "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2", "norm_out.linear":
                "final_layer.adaLN_modulation.1", "proj_out": "final_layer.linear"}


def _bfl_path(kind: str, path: str) -> str:
    parts = path.split(".")
    if kind == "flux":
        if parts[0] == "transformer_blocks":
            return f"double_blocks.{parts[1]}.{_FLUX_DOUBLE[('.'.join(parts[2:]))]}"
        if parts[0] == "single_transformer_blocks":
            return f"single_blocks.{parts[1]}.{_FLUX_SINGLE['.'.join(parts[2:])]}"
        return _FLUX_BASIC[path]
    if parts[0] == "transformer_blocks":
        return f"joint_blocks.{parts[1]}.{_MMDIT_BLOCK['.'.join(parts[2:])]}"
    return _MMDIT_BASIC[path]


def comfy_unet_weights(kind: str, transformer) -> Dict[str, Tuple[int, ...]]:
    """ComfyUI's `diffusion_model.*.weight` keys (Linear / conv weights only) with their shapes, fused ones summed."""
    from torch import nn

    out: Dict[str, Tuple[int, ...]] = {}
    for name, m in transformer.named_modules():
        if not isinstance(m, (nn.Linear, nn.Conv2d)):
            continue
        key = "diffusion_model." + _bfl_path(kind, name) + ".weight"
        shape = tuple(m.weight.shape)
        if key in out:  # a slice of a fused Linear: rows add up
            shape = (out[key][0] + shape[0],) + shape[1:]
        out[key] = shape
    return out


def comfy_key_map(kind: str, transformer, clip_l=None, clip_g=None, t5=None) -> Dict[str, str]:
    """kohya LoRA name -> ComfyUI weight key: model_lora_keys_unet's `lora_unet_<key with _>` for every
    `diffusion_model.*.weight`, and model_lora_keys_clip's te1 / te2 / te3 keys."""
    key_map: Dict[str, str] = {}
    for k in comfy_unet_weights(kind, transformer):
        key_map["lora_unet_" + k[len("diffusion_model."):-len(".weight")].replace(".", "_")] = k
    clip_l_present = clip_g_present = False
    for te, tag in ((clip_l, "clip_l"), (clip_g, "clip_g")):
        if te is None:
            continue
        n = te.config.num_hidden_layers
        for b in range(n):
            for c, lk in LORA_CLIP_MAP.items():
                k = f"{tag}.transformer.text_model.encoder.layers.{b}.{c}.weight"
                if tag == "clip_l":
                    key_map[f"lora_te1_text_model_encoder_layers_{b}_{lk}"] = k
                    clip_l_present = True
                else:
                    clip_g_present = True
                    if clip_l_present:
                        key_map[f"lora_te2_text_model_encoder_layers_{b}_{lk}"] = k
    if t5 is not None:
        from torch import nn

        for name, m in t5.named_modules():
            if not isinstance(m, nn.Linear):
                continue
            t5_index = 1 + int(clip_g_present) + int(clip_l_present)
            if clip_l_present and t5_index == 2:
                key_map[f"lora_te{t5_index}_{name.replace('.', '_')}"] = f"t5xxl.transformer.{name}.weight"
                t5_index += 1
            key_map[f"lora_te{t5_index}_{name.replace('.', '_')}"] = f"t5xxl.transformer.{name}.weight"
    return key_map

"""Test-side writers of Flux / SD3 original-layout files from the tiny diffusers models (diffusers has converters
only the other way: original -> diffusers). Each is the inverse of diffusers' loaders.single_file_utils converter."""
import torch


def _swap(w):  # scale, shift <-> shift, scale (its own inverse)
    a, b = w.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def _lin(out, dst, d, src):
    out[f"{dst}.weight"] = d[f"{src}.weight"]
    if f"{src}.bias" in d:
        out[f"{dst}.bias"] = d[f"{src}.bias"]


def _cat(out, dst, d, srcs):
    out[f"{dst}.weight"] = torch.cat([d[f"{s}.weight"] for s in srcs])
    out[f"{dst}.bias"] = torch.cat([d[f"{s}.bias"] for s in srcs])


def flux_to_bfl(transformer, prefix=""):
    """FluxTransformer2DModel -> BFL keys (double_blocks.*, single_blocks.*), optionally under `prefix`."""
    d = {k: v.detach().clone() for k, v in transformer.state_dict().items()}
    o = {}
    _lin(o, "time_in.in_layer", d, "time_text_embed.timestep_embedder.linear_1")
    _lin(o, "time_in.out_layer", d, "time_text_embed.timestep_embedder.linear_2")
    _lin(o, "vector_in.in_layer", d, "time_text_embed.text_embedder.linear_1")
    _lin(o, "vector_in.out_layer", d, "time_text_embed.text_embedder.linear_2")
    if "time_text_embed.guidance_embedder.linear_1.weight" in d:
        _lin(o, "guidance_in.in_layer", d, "time_text_embed.guidance_embedder.linear_1")
        _lin(o, "guidance_in.out_layer", d, "time_text_embed.guidance_embedder.linear_2")
    _lin(o, "txt_in", d, "context_embedder")
    _lin(o, "img_in", d, "x_embedder")
    for i in range(transformer.config.num_layers):
        p, b = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        _lin(o, b + "img_mod.lin", d, p + "norm1.linear")
        _lin(o, b + "txt_mod.lin", d, p + "norm1_context.linear")
        _cat(o, b + "img_attn.qkv", d, [p + "attn.to_q", p + "attn.to_k", p + "attn.to_v"])
        _cat(o, b + "txt_attn.qkv", d, [p + "attn.add_q_proj", p + "attn.add_k_proj", p + "attn.add_v_proj"])
        o[b + "img_attn.norm.query_norm.scale"] = d[p + "attn.norm_q.weight"]
        o[b + "img_attn.norm.key_norm.scale"] = d[p + "attn.norm_k.weight"]
        o[b + "txt_attn.norm.query_norm.scale"] = d[p + "attn.norm_added_q.weight"]
        o[b + "txt_attn.norm.key_norm.scale"] = d[p + "attn.norm_added_k.weight"]
        _lin(o, b + "img_mlp.0", d, p + "ff.net.0.proj")
        _lin(o, b + "img_mlp.2", d, p + "ff.net.2")
        _lin(o, b + "txt_mlp.0", d, p + "ff_context.net.0.proj")
        _lin(o, b + "txt_mlp.2", d, p + "ff_context.net.2")
        _lin(o, b + "img_attn.proj", d, p + "attn.to_out.0")
        _lin(o, b + "txt_attn.proj", d, p + "attn.to_add_out")
    for i in range(transformer.config.num_single_layers):
        p, b = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        _lin(o, b + "modulation.lin", d, p + "norm.linear")
        _cat(o, b + "linear1", d, [p + "attn.to_q", p + "attn.to_k", p + "attn.to_v", p + "proj_mlp"])
        o[b + "norm.query_norm.scale"] = d[p + "attn.norm_q.weight"]
        o[b + "norm.key_norm.scale"] = d[p + "attn.norm_k.weight"]
        _lin(o, b + "linear2", d, p + "proj_out")
    _lin(o, "final_layer.linear", d, "proj_out")
    o["final_layer.adaLN_modulation.1.weight"] = _swap(d["norm_out.linear.weight"])
    o["final_layer.adaLN_modulation.1.bias"] = _swap(d["norm_out.linear.bias"])
    return {prefix + k: v for k, v in o.items()}


def sd3_to_original(transformer, prefix="model.diffusion_model."):
    """SD3Transformer2DModel -> the original MMDiT keys (joint_blocks.*)."""
    d = {k: v.detach().clone() for k, v in transformer.state_dict().items()}
    n = transformer.config.num_layers
    o = {"pos_embed": d["pos_embed.pos_embed"]}
    _lin(o, "x_embedder.proj", d, "pos_embed.proj")
    _lin(o, "t_embedder.mlp.0", d, "time_text_embed.timestep_embedder.linear_1")
    _lin(o, "t_embedder.mlp.2", d, "time_text_embed.timestep_embedder.linear_2")
    _lin(o, "context_embedder", d, "context_embedder")
    _lin(o, "y_embedder.mlp.0", d, "time_text_embed.text_embedder.linear_1")
    _lin(o, "y_embedder.mlp.2", d, "time_text_embed.text_embedder.linear_2")
    for i in range(n):
        p, x, c = f"transformer_blocks.{i}.", f"joint_blocks.{i}.x_block.", f"joint_blocks.{i}.context_block."
        last = i == n - 1
        _cat(o, x + "attn.qkv", d, [p + "attn.to_q", p + "attn.to_k", p + "attn.to_v"])
        _cat(o, c + "attn.qkv", d, [p + "attn.add_q_proj", p + "attn.add_k_proj", p + "attn.add_v_proj"])
        if p + "attn.norm_q.weight" in d:
            o[x + "attn.ln_q.weight"] = d[p + "attn.norm_q.weight"]
            o[x + "attn.ln_k.weight"] = d[p + "attn.norm_k.weight"]
            o[c + "attn.ln_q.weight"] = d[p + "attn.norm_added_q.weight"]
            o[c + "attn.ln_k.weight"] = d[p + "attn.norm_added_k.weight"]
        _lin(o, x + "attn.proj", d, p + "attn.to_out.0")
        if not last:
            _lin(o, c + "attn.proj", d, p + "attn.to_add_out")
        if p + "attn2.to_q.weight" in d:
            _cat(o, x + "attn2.qkv", d, [p + "attn2.to_q", p + "attn2.to_k", p + "attn2.to_v"])
            if p + "attn2.norm_q.weight" in d:
                o[x + "attn2.ln_q.weight"] = d[p + "attn2.norm_q.weight"]
                o[x + "attn2.ln_k.weight"] = d[p + "attn2.norm_k.weight"]
            _lin(o, x + "attn2.proj", d, p + "attn2.to_out.0")
        _lin(o, x + "adaLN_modulation.1", d, p + "norm1.linear")
        if not last:
            _lin(o, c + "adaLN_modulation.1", d, p + "norm1_context.linear")
        else:
            o[c + "adaLN_modulation.1.weight"] = _swap(d[p + "norm1_context.linear.weight"])
            o[c + "adaLN_modulation.1.bias"] = _swap(d[p + "norm1_context.linear.bias"])
        _lin(o, x + "mlp.fc1", d, p + "ff.net.0.proj")
        _lin(o, x + "mlp.fc2", d, p + "ff.net.2")
        if not last:
            _lin(o, c + "mlp.fc1", d, p + "ff_context.net.0.proj")
            _lin(o, c + "mlp.fc2", d, p + "ff_context.net.2")
    _lin(o, "final_layer.linear", d, "proj_out")
    o["final_layer.adaLN_modulation.1.weight"] = _swap(d["norm_out.linear.weight"])
    o["final_layer.adaLN_modulation.1.bias"] = _swap(d["norm_out.linear.bias"])
    return {prefix + k: v for k, v in o.items()}


def hf_state(model, prefix=""):
    """A transformers model's state dict under `prefix`, with the `text_model.` level (ComfyUI's files)."""
    out = {}
    for k, v in model.state_dict().items():
        if k.endswith("position_ids"):
            continue
        if type(model).__name__.startswith("CLIP") and not k.startswith(("text_model.", "text_projection")):
            k = "text_model." + k
        out[prefix + k] = v.detach().clone().contiguous()
    return out

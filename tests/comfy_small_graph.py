"""ComfyUI-side helpers (import after comfy_side.start_cpu(), with ComfyUI's python): the small CLIP and VAE of a
family built from ComfyUI's own classes with random weights, or a stand-in CLIP where ComfyUI's text encoder has a
fixed full size. Used by tests/comfyui_inplace_check.py and bench/comfyui_inplace_memory.py.

    make_clip({"type": "flux" | "sd3" | "chroma" | "z_image", widths...}) -> comfy.sd.CLIP (ComfyUI's tokenizer and
        text encoder classes, made small through model_options `<name>_model_config`);
    make_clip({"type": "standin", "width": W}) -> StandInCLIP (ComfyUI's CLIP interface);
    make_vae({"type": "ae16" | "ae_flux2" | "wan21", ...}) -> comfy.sd.VAE detected from a random state dict of
        ComfyUI's own module for the family.
"""
import re
import zlib

import torch

import comfy.sd
import comfy.supported_models_base as smb


def randomize(sd, seed):
    """Random weights for a module ComfyUI built (its ops leave them uninitialised): norms 1 / 0, matrices and
    convolutions N(0, 1 / fan_in), biases 0."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in sd.items():
        if not v.is_floating_point() or v.dim() == 0 or "running_" in k:
            out[k] = torch.ones_like(v) if k.endswith("running_var") else (
                torch.zeros_like(v) if "running_" in k else v)
        elif v.dim() == 1 and re.search(r"(norm|gamma|scale|ln_|layer_norm|\.g$)", k) and not k.endswith("bias"):
            out[k] = torch.ones_like(v, dtype=torch.float32)
        elif v.dim() == 1:
            out[k] = torch.zeros_like(v, dtype=torch.float32)
        else:
            fan_in = v[0].numel()
            out[k] = torch.randn(v.shape, generator=g) / fan_in ** 0.5
    return out


# ----------------------------------------------------------------------------- CLIP and VAE
class StandInCLIP:
    """ComfyUI's CLIP interface for a family whose text encoder ComfyUI builds at a fixed full size (Qwen2.5-VL 7B,
    UMT5-XXL, Mistral 24B): `tokenize(text)` (one id per word, crc32), `encode_from_tokens_scheduled(tokens)` ->
    [[(1, words, width) tensor, {"pooled_output": None}]] from a frozen random embedding (lengths vary by caption),
    `cond_stage_model` (that embedding)."""

    def __init__(self, width, seed=5, vocab=4096):
        g = torch.Generator().manual_seed(seed)
        self.cond_stage_model = torch.nn.Embedding(vocab, width)
        with torch.no_grad():
            self.cond_stage_model.weight.copy_(torch.randn(vocab, width, generator=g))
        self.cond_stage_model.requires_grad_(False)
        self.vocab = vocab

    def tokenize(self, text, **kw):
        return {"ids": [zlib.crc32(w.encode()) % self.vocab for w in (text.split() or [""])]}

    def encode_from_tokens_scheduled(self, tokens, **kw):
        with torch.no_grad():
            emb = self.cond_stage_model(torch.tensor(tokens["ids"]))[None].float()
        return [[emb, {"pooled_output": None}]]


def make_clip(c):
    t = c["type"]
    if t == "standin":
        return StandInCLIP(c["width"])
    if t == "flux":  # Flux.1: CLIP-L (pooled) + T5-XXL, small
        import comfy.text_encoders.flux as te

        target = smb.ClipTarget(te.FluxTokenizer, te.flux_clip())
        opts = {"clip_l_model_config": dict(hidden_size=c["pooled"], intermediate_size=2 * c["pooled"],
                                            num_attention_heads=4, num_hidden_layers=3, projection_dim=c["pooled"]),
                "t5xxl_model_config": dict(d_model=c["width"], d_kv=16, num_heads=4, d_ff=2 * c["width"],
                                           num_layers=2)}
    elif t == "sd3":  # SD3.5: CLIP-L + CLIP-G (pooled = both projections; context padded to 4096 by ComfyUI)
        import comfy.text_encoders.sd3_clip as te

        target = smb.ClipTarget(te.SD3Tokenizer, te.sd3_clip(clip_l=True, clip_g=True, t5=False))
        a, b = c["pooled_l"], c["pooled_g"]
        opts = {"clip_l_model_config": dict(hidden_size=a, intermediate_size=2 * a, num_attention_heads=4,
                                            num_hidden_layers=3, projection_dim=a),
                "clip_g_model_config": dict(hidden_size=b, intermediate_size=2 * b, num_attention_heads=4,
                                            num_hidden_layers=3, projection_dim=b)}
    elif t == "chroma":  # Chroma: T5-XXL alone (PixArt's), small
        import comfy.text_encoders.pixart_t5 as te

        target = smb.ClipTarget(te.PixArtTokenizer, te.pixart_te())
        opts = {"t5xxl_model_config": dict(d_model=c["width"], d_kv=16, num_heads=4, d_ff=2 * c["width"],
                                           num_layers=2)}
    elif t == "z_image":  # Z-Image: Qwen3 (4B's layout; head_dim 128 is fixed), small
        import comfy.text_encoders.z_image as te

        target = smb.ClipTarget(te.ZImageTokenizer, te.te())
        w = c["width"]
        opts = {"qwen3_4b_model_config": dict(hidden_size=w, intermediate_size=2 * w, num_hidden_layers=3,
                                              num_attention_heads=w // 128, num_key_value_heads=1)}
    else:
        raise ValueError(t)
    clip = comfy.sd.CLIP(target=target, embedding_directory=None, model_options=opts)
    missing, unexpected = clip.load_sd(randomize(clip.get_sd(), 1), full_model=True)
    return clip


def make_vae(c):
    """ComfyUI's own VAE module for the family, random weights, then comfy.sd.VAE on its state dict (detection)."""
    t = c["type"]
    if t in ("ae16", "ae_flux2"):  # the Flux / SD3 autoencoder (16 channels); FLUX.2's (32, batch-norm latents)
        from comfy.ldm.models.autoencoder import AutoencodingEngine

        dd = {"double_z": True, "z_channels": 32 if t == "ae_flux2" else 16, "resolution": 256, "in_channels": 3,
              "out_ch": 3, "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [],
              "dropout": 0.0, **({"batch_norm_latent": True} if t == "ae_flux2" else {})}
        if t == "ae_flux2":  # quant convs + the latents' batch norm (ComfyUI: 4 x 32 channels at 1/16)
            from comfy.ldm.models.autoencoder import AutoencoderKL

            m = AutoencoderKL(ddconfig=dd, embed_dim=32)
        else:
            m = AutoencodingEngine(
                regularizer_config={"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
                encoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Encoder", "params": dd},
                decoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Decoder", "params": dd})
    elif t == "wan21":  # the Wan 2.1 VAE (Qwen-Image's too), small: ComfyUI reads its width from the file
        from comfy.ldm.wan import vae as wan_vae

        m = wan_vae.WanVAE(dim=c.get("dim", 16), z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                                     attn_scales=[], temperal_downsample=[False, True, True], dropout=0.0)
    else:
        raise ValueError(t)
    sd = randomize(m.state_dict(), 2)
    del m
    return comfy.sd.VAE(sd=sd)

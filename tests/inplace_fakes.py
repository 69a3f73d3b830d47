"""Small ComfyUI-shaped graphs for the in-place tests (tests/test_comfyui_inplace.py), built on the fakes in
tests/fake_comfy (which must be on sys.path first): a diffusion model made of comfy.ops layers inside a
comfy.model_base-like model with apply_model / extra_conds / process_latent_in / model_sampling, a CLIP whose
conditioning length depends on the caption (as Qwen / T5 encoders' do), and a VAE. Random, seeded weights.

Layouts: "wan" names its layers as ComfyUI's Wan (blocks.N.self_attn.q, cross_attn.k, ffn.0, ...: our Wan family
by its keys, so its default LoRA modules apply); "other" as no family we know (blocks.N.attn.qkv, mlp.fc1: the
generic targets, every Linear of the blocks)."""
import hashlib

import torch
from torch import nn

import comfy.conds
import comfy.model_patcher
import comfy.model_sampling
import comfy.ops

ops = comfy.ops.disable_weight_init
TEXT, DIM, CH = 16, 32, 4


class Block(nn.Module):
    def __init__(self, layout):
        super().__init__()
        self.layout = layout
        if layout == "wan":
            self.self_attn = nn.Module()
            for n in ("q", "k", "v", "o"):
                setattr(self.self_attn, n, ops.Linear(DIM, DIM))
            self.cross_attn = nn.Module()
            self.cross_attn.q, self.cross_attn.o = ops.Linear(DIM, DIM), ops.Linear(DIM, DIM)
            self.cross_attn.k, self.cross_attn.v = ops.Linear(TEXT, DIM), ops.Linear(TEXT, DIM)
            self.ffn = nn.Sequential(ops.Linear(DIM, 2 * DIM), nn.GELU(), ops.Linear(2 * DIM, DIM))
        else:
            self.attn = nn.Module()
            self.attn.qkv, self.attn.proj = ops.Linear(DIM, 3 * DIM), ops.Linear(DIM, DIM)
            self.attn.ctx = ops.Linear(TEXT, 2 * DIM)
            self.mlp = nn.Module()
            self.mlp.fc1, self.mlp.fc2 = ops.Linear(DIM, 2 * DIM), ops.Linear(2 * DIM, DIM)

    def forward(self, x, ctx, temb):
        if self.layout == "wan":
            x = x + temb[:, None]
            a = self.self_attn
            q, k, v = a.q(x), a.k(x), a.v(x)
            x = x + a.o(torch.softmax(q @ k.transpose(1, 2) / DIM ** 0.5, -1) @ v)
            c = self.cross_attn
            q, k, v = c.q(x), c.k(ctx), c.v(ctx)
            x = x + c.o(torch.softmax(q @ k.transpose(1, 2) / DIM ** 0.5, -1) @ v)
            return x + self.ffn(x)
        # as ComfyUI's Flux / Chroma / FLUX.2 blocks: pre-norms (which keep their input for the backward) and
        # residual adds in place (`x += apply_mod(...)`), on the block's own input too
        x += temb[:, None] - temb[:, None].detach()  # an in-place add on the input (no change of value)
        h = nn.functional.layer_norm(x, (DIM,))
        q, k, v = self.attn.qkv(h).chunk(3, -1)
        ck, cv = self.attn.ctx(ctx).chunk(2, -1)
        k, v = torch.cat([k, ck], 1), torch.cat([v, cv], 1)
        x += self.attn.proj(torch.softmax(q @ k.transpose(1, 2) / DIM ** 0.5, -1) @ v)
        x += self.mlp.fc2(torch.relu(self.mlp.fc1(nn.functional.layer_norm(x, (DIM,)))))
        return x


class TinyDiT(nn.Module):
    """Patchify 2x2 -> blocks -> unpatchify; timestep by a sinusoid; text by cross attention."""

    def __init__(self, layout, depth=2):
        super().__init__()
        self.patch_embedding = ops.Linear(CH * 4, DIM)
        self.time_embedding = ops.Linear(32, DIM)
        self.blocks = nn.ModuleList([Block(layout) for _ in range(depth)])
        self.head = ops.Linear(DIM, CH * 4)

    def forward(self, x, timesteps, context=None, **kw):
        b, c, h, w = x.shape
        t = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)
        freqs = torch.exp(-torch.arange(16, dtype=torch.float32) * (9.2 / 16)).to(x.device)
        ang = timesteps.float()[:, None] * freqs[None]
        temb = self.time_embedding(torch.cat([ang.sin(), ang.cos()], -1).to(x.dtype))
        y = self.patch_embedding(t)
        for blk in self.blocks:
            y = blk(y, context.to(x.dtype), temb)
        y = self.head(y).reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)
        return y


class _Flow(comfy.model_sampling.ModelSamplingDiscreteFlow, comfy.model_sampling.CONST):
    pass


class _Eps(comfy.model_sampling.ModelSamplingDiscrete, comfy.model_sampling.EPS):
    pass


class _V(comfy.model_sampling.ModelSamplingDiscrete, comfy.model_sampling.V_PREDICTION):
    pass


class Config:
    """Stands for the supported_models config class ComfyUI attaches (its name is what we report)."""


class WAN21_T2V(Config):
    pass


class UnknownDiT(Config):
    pass


class Model(nn.Module):
    """comfy.model_base.BaseModel as our glue sees it: apply_model(x, sigma, c_crossattn=..., **) returns the
    denoised latents through model_sampling; extra_conds makes c_crossattn from the cross_attn tensor (and
    guidance when asked); process_latent_in scales by the latent format's factor."""

    def __init__(self, layout, objective="flow", scale=0.5):
        super().__init__()
        self.diffusion_model = TinyDiT(layout)
        self.model_sampling = {"flow": _Flow, "eps": _Eps, "v": _V}[objective]()
        self.model_config = (WAN21_T2V if layout == "wan" else UnknownDiT)()
        self.scale = scale
        self.seen_guidance = []

    def apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        sigma = t
        xc = self.model_sampling.calculate_input(sigma, x)
        ts = self.model_sampling.timestep(sigma).float()
        if "guidance" in kwargs:
            self.seen_guidance.append(kwargs["guidance"])
        out = self.diffusion_model(xc, ts, context=c_crossattn).float()
        return self.model_sampling.calculate_denoised(sigma, out, x)

    def extra_conds(self, **kwargs):
        out = {"c_crossattn": comfy.conds.CONDCrossAttn(kwargs["cross_attn"])}
        if kwargs.get("guidance") is not None:
            out["guidance"] = comfy.conds.CONDRegular(torch.FloatTensor([kwargs["guidance"]]))
        pooled = kwargs["pooled_output"]  # read as Flux's encode_adm does: a KeyError when the entry is missing
        if pooled is not None:
            out["y"] = comfy.conds.CONDRegular(pooled)
        if isinstance(self.model_config, UnknownDiT):  # as Lumina / Z-Image: the text length as a constant
            out["num_tokens"] = comfy.conds.CONDConstant(int(kwargs["cross_attn"].shape[1]))
        return out

    def process_latent_in(self, latent):
        return latent * self.scale


class CLIP:
    """tokenize / encode_from_tokens_scheduled: one row of TEXT width per word (1 + words long), deterministic;
    pooled_output their mean, or None (pooled=False: as a T5-only / LLM encoder gives it)."""

    def __init__(self, pooled=True):
        self.cond_stage_model = ops.Linear(8, TEXT)
        self.calls = 0
        self.pooled = pooled

    def tokenize(self, text):
        return {"words": text.split()}

    def encode_from_tokens_scheduled(self, tokens):
        self.calls += 1
        rows = []
        for w in ["<s>"] + tokens["words"]:
            g = torch.Generator().manual_seed(int(hashlib.sha256(w.encode()).hexdigest()[:8], 16))
            rows.append(torch.randn(TEXT, generator=g))
        cond = torch.stack(rows)[None]
        return [[cond, {"pooled_output": cond.mean(1) if self.pooled else None}]]


class VAE:
    """encode([B, H, W, 3] in 0..1) -> (B, 4, H/4, W/4) through a fixed conv; factor 4."""

    def __init__(self):
        torch.manual_seed(3)
        self.first_stage_model = nn.Conv2d(3, CH, 4, stride=4)
        self.calls = 0

    def spacial_compression_encode(self):
        return 4

    def encode(self, pixel_samples):
        self.calls += 1
        with torch.no_grad():
            return self.first_stage_model(pixel_samples.permute(0, 3, 1, 2) * 2 - 1)


def graph(layout="wan", objective="flow", seed=0, pooled=True):
    """(MODEL patcher, CLIP, VAE) of a tiny graph, built under torch.inference_mode() as ComfyUI's executor runs
    its loader nodes (the weights and buffers are inference tensors)."""
    torch.manual_seed(seed)
    with torch.inference_mode():
        model = Model(layout, objective)
        model.requires_grad_(False)
    return comfy.model_patcher.ModelPatcher(model), CLIP(pooled), VAE()

"""Qwen-Image / Z-Image / Chroma / Wan 2.1 / FLUX.2 [dev] LoRAs we write, applied by a real ComfyUI 0.8.0's own
LoRA code. Runs when COMFYUI_DIR points at a ComfyUI checkout with its venv ($COMFYUI_PYTHON, else
$COMFYUI_DIR/.venv/bin/python); skipped otherwise. The ComfyUI side is tests/comfyui_families_check.py, run with
ComfyUI's python. Seen with ComfyUI 0.8.0 (`fetch pollockjj/ComfyUI`, commit fc0cb10b "ComfyUI v0.8.0") on the
CPU, its venv with its requirements.txt and torch 2.14.1 + torchvision 0.29.1 (torch 2.13.0+cpu has no torchvision
wheel that loads here: ComfyUI imports torchvision); about 6 minutes on 2 cores: the first four in 2 minutes, 8 GB
at most (Z-Image's 0.9 B parameters in float32, patched), FLUX.2 [dev] in 3-4 minutes, 15.4 GB (2.2 B parameters:
ComfyUI fixes its width; skipped with less than NEEDS_GB free).

Per family: a random diffusers transformer of the smallest size ComfyUI's detection (comfy/model_detection.py,
comfy/supported_models.py) builds right, its weights rounded to bf16, written in the original single-file layout
(`model.diffusion_model.` + ComfyUI's names; the layout is checked by mapping it back with diffusers' own
single-file converter, which must give our state dict exactly). ComfyUI detects and loads it (float32, no key
missing or unexpected). Our LoRA on every default target (random, seeded, rank 4, alpha 2; fused modules written
by our writer) goes through comfy.lora.load_lora + ModelPatcher.add_patches: 0 keys not loaded, every module of our
file matched, and the weights ComfyUI patched equal base + our delta (alpha / rank; in ComfyUI's fused layout) on
probes of every module; the model's output changes, and comes back once unpatched.

Sizes ComfyUI fixes (0.8.0):
- Qwen-Image: only in_channels and the block count are read; 24 heads x 128 (hidden 3072) and text width 3584 are
  the model's defaults -> 1 block (0.38 B parameters).
- Z-Image: a Lumina2 state dict is Z-Image only at dim 3840 (30 heads, ffn 10240); 2 noise + 2 context refiners
  are fixed -> 1 main layer, caption width 64 (0.9 B parameters).
- Chroma: Flux's detection fixes 24 heads with rope axes (16, 56, 56) (hidden 3072), and the distilled guidance
  layer (64 -> 5120 x 5 layers -> 3072) -> 1 double + 1 single block, text width 64 (0.62 B parameters).
- Wan 2.1 T2V: heads = dim / 128, freq_dim 256, text width 4096 (the model's default) -> dim 128 (1 head),
  ffn 256, 2 blocks (1.1 M parameters).
- FLUX.2 [dev]: found by `double_blocks.0.img_attn.norm.key_norm.scale` + `double_stream_modulation_img.lin`, so
  at least 1 double block; read are in_channels and hidden (img_in), text width (txt_in), guidance (guidance_in
  present: dev) and both block counts; fixed are 48 heads with rope axes (32, 32, 32, 32) (head 128: hidden 6144),
  mlp ratio 3 (SwiGLU), theta 2000, out_channels 128 (so in_channels 128: x - sigma * v), no biases and the three
  global modulations (6144 -> 6 / 6 / 3 x 6144, 0.57 B parameters with 0 blocks) -> 1 double + 1 single block
  (0.98 B + 0.49 B), text width 64, guidance_embeds (2.19 B parameters; 1.70 B without the single block, the least
  ComfyUI detects). The only family over 8 GB: float32 keeps the patched = base + delta check at 1e-4.
"""
import gc
import json
import os
import subprocess
import time
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from single_file_layouts import original_layout
from lora_train.networks import flow_names as F
from lora_train.networks import lora as L
from lora_train.networks.delta import base_weight

COMFY = os.environ.get("COMFYUI_DIR", "")
PY = os.environ.get("COMFYUI_PYTHON") or os.path.join(COMFY, ".venv", "bin", "python")
CHECK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "comfyui_families_check.py")
pytestmark = [pytest.mark.skipif(not COMFY, reason="set COMFYUI_DIR to a ComfyUI checkout with its venv to run"),
              pytest.mark.slow]

RANK, ALPHA = 4, 2.0
#: GB of free memory a family's case needs (MemAvailable; skipped below that): FLUX.2's fixed width makes its
#: smallest model 2.2 B parameters, ComfyUI's process peaks at 15.4 GB (float32, patched), ours at 14.3 GB
NEEDS_GB = {"flux2": 17}
#: kind -> (diffusers class, config, ComfyUI's model config, kohya modules of our file, text width)
FAMILIES = {
    "qwen_image": ("QwenImageTransformer2DModel", dict(num_layers=1), "QwenImage", 14, 3584),
    "z_image": ("ZImageTransformer2DModel", dict(n_layers=1, cap_feat_dim=64), "ZImage", 1 * 6 + 2 * 6 + 2 * 5, 64),
    "chroma": ("ChromaTransformer2DModel", dict(num_layers=1, num_single_layers=1, joint_attention_dim=64), "Chroma",
               8 + 2, 64),
    "wan": ("WanTransformer3DModel", dict(num_attention_heads=1, attention_head_dim=128, ffn_dim=256, num_layers=2,
                                          text_dim=4096, freq_dim=256), "WAN21_T2V", 2 * 10, 4096),
    "flux2": ("Flux2Transformer2DModel", dict(num_layers=1, num_single_layers=1, joint_attention_dim=64,
                                              guidance_embeds=True), "Flux2", 8 + 2, 64),
}


# ----------------------------------------------------------------------------- diffusers -> original layout
# original_layout (tests/single_file_layouts.py): `model.diffusion_model.` + the family's original (ComfyUI) names, bf16


def diffusers_from_original(kind, orig):
    """diffusers' own single-file converter (what `from_single_file` runs) applied to the original layout."""
    from diffusers.loaders import single_file_utils as S

    ck = dict(orig)  # the converters pop the dict's entries (the tensors are left as they are)
    if kind == "qwen_image":  # diffusers' mapping for Qwen-Image is the identity (its names are the original ones)
        return {k[len("model.diffusion_model."):]: v for k, v in ck.items()}
    if kind == "flux2":  # diffusers' FLUX.2 converter takes BFL's bare names (from_single_file strips the prefix)
        return S.convert_flux2_transformer_checkpoint_to_diffusers(
            {k[len("model.diffusion_model."):]: v for k, v in ck.items()})
    fn = {"z_image": S.convert_z_image_transformer_checkpoint_to_diffusers,
          "chroma": S.convert_chroma_transformer_checkpoint_to_diffusers,
          "wan": S.convert_wan_transformer_to_diffusers}[kind]
    return fn(ck)


# ----------------------------------------------------------------------------- the model and our LoRA
def small_model(kind):
    import diffusers

    cls, cfg = FAMILIES[kind][:2]
    torch.manual_seed(0)
    unet = getattr(diffusers, cls)(**cfg).eval().requires_grad_(False)
    with torch.no_grad():  # the bf16 file then holds exactly these weights
        for p in unet.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    return unet


def random_lora(model, seed=1):
    """Our peft LoRA on every default target, random nonzero weights (fixed seed), read out as LoraWeights."""
    unet = model.unet
    targets = L.denoiser_target_modules(model)
    L.inject(unet, targets, RANK, ALPHA)
    g = torch.Generator().manual_seed(seed)
    for _, m in L.lora_layers(unet):
        a, b = m.lora_A[L.DEFAULT_ADAPTER].weight, m.lora_B[L.DEFAULT_ADAPTER].weight
        with torch.no_grad():
            a.copy_(torch.randn(a.shape, generator=g) / a.shape[1] ** 0.5)
            b.copy_(torch.randn(b.shape, generator=g) * 0.05)
    lw = L.extract(model)
    L.remove_adapter(unet)
    return targets, lw


def probes_for(kind, unet, lw, seed=2):
    """Per kohya module: x, our delta @ x and (base + delta) @ x, rows in the file's (ComfyUI's fused) order."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    groups = F.unet_groups(kind, unet, extras=False)
    for name, grp in groups.items():
        n_out, n_in = F.fused_shape(grp, unet)
        x = torch.randn(n_in, 3, generator=g, dtype=torch.float64)
        wx, dx = torch.zeros(n_out, 3, dtype=torch.float64), torch.zeros(n_out, 3, dtype=torch.float64)
        for path, rows in zip(grp.paths, F.part_rows(grp)):
            lin = unet.get_submodule(path)
            w = base_weight(getattr(lin, "base_layer", lin))
            # base @ x and delta @ x part by part, in float64 (FLUX.2's fused weights are 0.3 B entries each)
            wx[rows] = torch.cat([c.double() @ x for c in w.detach().split(4096)])
            d, u, a = lw.modules[("unet", path)]
            dx[rows] = (float(a) / d.shape[0]) * (u.double() @ (d.double() @ x))
        out[f"{name}.x"] = x.float()
        out[f"{name}.dy"] = dx.float()
        out[f"{name}.wy"] = (wx + dx).float()
    return groups, out


def comfy(spec, tmp_path, timeout=1800):
    sp, out = tmp_path / "spec.json", tmp_path / "out.json"
    sp.write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.update(PYTHONPATH=COMFY, OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
    r = subprocess.run([PY, CHECK, str(sp), str(out)], cwd=COMFY, env=env, capture_output=True, text=True,
                       timeout=timeout)
    print(r.stdout[-6000:], r.stderr[-4000:])
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(out.read_text())


def mem_available_gb():
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2 ** 20
    return float("inf")


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_comfyui_applies_our_lora_to_a_small_real_model(kind, tmp_path):
    if mem_available_gb() < NEEDS_GB.get(kind, 0):
        pytest.skip(f"{kind} needs about {NEEDS_GB[kind]} GB free, {mem_available_gb():.1f} GB available")
    t0 = time.time()
    cls, cfg, config, n_modules, ctx_dim = FAMILIES[kind]
    unet = small_model(kind)
    sd = {k: v for k, v in unet.state_dict().items()}
    orig = original_layout(kind, sd)
    model_file = str(tmp_path / f"{kind}_small_bf16.safetensors")
    save_file(orig, model_file)
    # the layout is the original one: diffusers' own single-file converter maps it back to our state dict exactly
    back = diffusers_from_original(kind, orig)
    del orig
    assert set(back) == set(sd), (sorted(set(back) - set(sd))[:5], sorted(set(sd) - set(back))[:5])
    assert all(torch.equal(back[k].float(), sd[k]) for k in sd)
    del back, sd
    model = SimpleNamespace(kind=kind, unet=unet, text_encoder=None, text_encoder_2=None, text_encoder_3=None)
    targets, lw = random_lora(model)
    lora_file = L.save_kohya(lw, str(tmp_path / f"{kind}_lora.safetensors"), kind)
    groups, probes = probes_for(kind, unet, lw)
    assert len(groups) == n_modules and len(targets) == len(lw.modules)
    probe_file = str(tmp_path / "probes.safetensors")
    save_file(probes, probe_file)
    params = sum(p.numel() for p in unet.parameters())
    del model, unet, lw, probes
    gc.collect()
    t1 = time.time()
    res = comfy({"kind": kind, "model": model_file, "lora": lora_file, "probes": probe_file, "context_dim": ctx_dim},
                tmp_path)
    print(f"{kind}: ComfyUI {res['model_config']} ({res['diffusion_model_class']}), {params / 1e6:.1f} M parameters, "
          f"{len(targets)} peft layers -> {res['lora_modules']} modules, {res['patches']} patches, "
          f"{len(res['not_loaded'])} not loaded, probe max abs diff {res['probe_max_abs_diff']:.3g} "
          f"(delta scale {res['probe_delta_scale']:.3g}), full {res['probe_full_max_abs_diff']:.3g} "
          f"(scale {res['probe_full_scale']:.3g}), output change {res['output_change']:.3g} "
          f"(scale {res['output_scale']:.3g}); ours {t1 - t0:.0f} s, ComfyUI {time.time() - t1:.0f} s "
          f"({res['max_rss_mb']} MB)")
    assert res["comfyui_version"] == "0.8.0"
    assert res["model_config"] == config and res["weight_dtype"] == "torch.float32"
    assert res["load_warnings"] == [] and res["model_params"] == params  # every weight loaded, none left over
    # every module of our file is a whole weight of ComfyUI's model (fused q/k/v included: no slices)
    assert res["unmatched_names"] == [] and res["sliced_targets"] == [] and res["not_loaded"] == []
    assert res["lora_modules"] == res["patches"] == res["model_patched"] == n_modules
    assert res["probe_modules"] == n_modules
    assert res["probe_max_abs_diff"] <= 1e-4 * max(res["probe_delta_scale"], 1.0)
    assert res["probe_full_max_abs_diff"] <= 1e-4 * max(res["probe_full_scale"], 1.0)
    assert res["output_finite"] and res["output_change"] > 1e-3 * max(res["output_scale"], 1.0)
    assert res["unpatched_again_diff"] <= 1e-5

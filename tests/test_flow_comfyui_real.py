"""Flux / SD3.5 LoRAs we write, loaded by a real ComfyUI's own LoRA code (issue 16, must-have 7). Runs when
COMFYUI_DIR points at a ComfyUI checkout with its venv ($COMFYUI_PYTHON, else $COMFYUI_DIR/.venv/bin/python);
skipped otherwise. The ComfyUI side is tests/comfyui_flow_lora_check.py, run with ComfyUI's python:

- key map (full size, meta tensors): a diffusers-layout Flux.1 dev / SD3.5 Medium / SD3.5 Large state dict of our
  full-size meta models' shapes -> ComfyUI converts and detects it (Flux / SD3) and builds the model and its text
  encoders on the meta device; our file with every default module (transformer, CLIP-L, CLIP-G, T5) goes through
  comfy.lora.load_lora + ModelPatcher.add_patches: 0 keys not loaded, every module matched, shapes right.
- small real runs: a random Flux-architecture model ComfyUI accepts (hidden size 3072 as ComfyUI's Flux detection
  assumes, 1 double + 1 single block, ~0.5 B parameters, bf16 file) and a small SD3.5-Medium-like one are loaded by
  comfy.sd.load_diffusion_model (diffusers layout, converted by ComfyUI); our LoRA (trained split, written fused)
  is applied by ComfyUI: 0 keys not loaded, the patched weights change by exactly our trained deltas (probes, in
  ComfyUI's fused layout), and the model's output changes.
"""
import json
import os
import subprocess
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

import test_flow_names as T
from lora_train.networks import flow_names as F
from lora_train.networks import lora as L

COMFY = os.environ.get("COMFYUI_DIR", "")
PY = os.environ.get("COMFYUI_PYTHON") or os.path.join(COMFY, ".venv", "bin", "python")
CHECK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "comfyui_flow_lora_check.py")
pytestmark = [pytest.mark.skipif(not COMFY, reason="set COMFYUI_DIR to a ComfyUI checkout with its venv to run")]


def comfy(mode, spec, tmp_path, timeout=1800):
    sp, out = tmp_path / f"{mode}_spec.json", tmp_path / f"{mode}_out.json"
    sp.write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.update(PYTHONPATH=COMFY, OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
    r = subprocess.run([PY, CHECK, mode, str(sp), str(out)], cwd=COMFY, env=env, capture_output=True, text=True,
                       timeout=timeout)
    print(r.stdout[-4000:], r.stderr[-4000:])
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("key,config", [("flux_dev", "Flux"), ("flux_schnell", "FluxSchnell"),
                                        ("sd3_medium", "SD3"), ("sd35_medium", "SD3"), ("sd35_large", "SD3")])
def test_comfyui_loads_every_module_of_our_full_size_file(key, config, tmp_path):
    model = T.meta_model(key)
    lw = T.full_lora(model, device="cpu")
    path = L.save_kohya(lw, str(tmp_path / "lora.safetensors"), model.kind)
    shapes = {k: list(v.shape) for k, v in model.unet.state_dict().items()}
    res = comfy("keymap", {"transformer_shapes": shapes, "clip": model.kind, "lora": path}, tmp_path)
    ref = T.reference()[key]
    n = sum(len(ref.get(c, [])) for c in ("unet", "te1", "te2", "te3"))
    assert res["model_config"] == config
    assert res["not_loaded"] == [] and res["unmatched_names"] == [] and res["shape_mismatches"] == []
    assert res["lora_modules"] == res["patches"] == n
    assert res["model_patched"] == len(ref["unet"]) and res["clip_patched"] == n - len(ref["unet"])
    # each module lands on the fused weight it came from
    for name, target in res["targets"].items():
        assert target.endswith(".weight") and \
            target[:-len(".weight")].replace(".", "_") == "diffusion_model_" + name[len("lora_unet_"):], (name, target)


def small_model(kind):
    """A random model of the architecture ComfyUI detects: Flux needs hidden size 3072 (24 heads of 128, rope
    16/56/56 are fixed in ComfyUI's Flux detection); SD3's sizes follow its depth (64 x depth)."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    torch.manual_seed(0)
    if kind == "flux":
        return FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                      joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=True).eval()
    return SD3Transformer2DModel(sample_size=32, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=64,
                                 num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=128,
                                 pooled_projection_dim=32, out_channels=16, pos_embed_max_size=16,
                                 qk_norm="rms_norm", dual_attention_layers=(0,)).eval()


@pytest.mark.parametrize("kind,config,modules", [("flux", "Flux", 13), ("sd3", "SD3", 19)])
def test_comfyui_applies_our_lora_to_a_small_real_model(kind, config, modules, tmp_path):
    """SD3: an SD3.5-Medium-like model (qk norm, a dual-attention block) whose last block's context adaLN has
    ComfyUI's (shift, scale) order: the probes check that our swapped rows land right."""
    from diffusers.loaders.lora_conversion_utils import swap_scale_shift

    unet = small_model(kind)
    model_file = str(tmp_path / "small.safetensors")
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in unet.state_dict().items()}, model_file)
    dims = ((unet.config.joint_attention_dim, unet.config.pooled_projection_dim))
    model = SimpleNamespace(kind=kind, unet=unet, text_encoder=None, text_encoder_2=None, text_encoder_3=None)
    lw = T.trained_split_lora(model, rank=4, mixed=True)
    # small deltas relative to weights, as training makes them
    lw.modules = {k: (d * 0.05, u * 0.05, a) for k, (d, u, a) in lw.modules.items()}
    lora_file = L.save_kohya(lw, str(tmp_path / "lora.safetensors"), kind)
    # probes: per kohya module, (our trained delta in ComfyUI's layout) @ x
    g = torch.Generator().manual_seed(1)
    probes, ours = {}, T.deltas(lw)
    groups = F.unet_groups(kind, model.unet, extras=False)
    assert (kind == "flux") or any(grp.swap_halves for grp in groups.values())
    for name, grp in groups.items():
        delta = torch.cat([ours[("unet", p)] for p in grp.paths]).float()
        if grp.swap_halves:
            delta = swap_scale_shift(delta)  # diffusers' own converter's (scale, shift) <-> (shift, scale)
        x = torch.randn(delta.shape[1], 3, generator=g)
        probes[f"{name}.x"], probes[f"{name}.y"] = x, delta @ x
    probe_file = str(tmp_path / "probes.safetensors")
    save_file(probes, probe_file)
    del model, lw, ours, unet
    res = comfy("run", {"model": model_file, "lora": lora_file, "probes": probe_file, "kind": kind,
                        "context_dim": dims[0], "pooled_dim": dims[1]}, tmp_path)
    assert res["model_config"] == config
    assert res["not_loaded"] == [] and res["lora_modules"] == res["patches"] == res["model_patched"] == modules
    assert res["probe_modules"] == modules and res["probe_max_abs_diff"] <= 1e-3
    assert res["output_change"] > 1e-3 * max(res["output_scale"], 1.0)
    assert res["unpatched_again_diff"] <= 1e-5


def test_train_node_in_real_comfyui_on_a_flux_graph(tmp_path):
    """Our Train node inside a real ComfyUI on a Flux graph ComfyUI built (tests/comfyui_flow_train_check.py): a small
    Flux-architecture model (hidden 3072, 1 double + 1 single block) trained 2 steps at 64 px; the LoRA in loras/ is
    applied by ComfyUI's loader with 0 keys not loaded and changes the output; the sweep runs through ComfyUI's
    sampler."""
    from lora_train.data.demo import write_demo_dataset

    unet = small_model("flux")
    model_file = str(tmp_path / "flux_small.safetensors")
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in unet.state_dict().items()}, model_file)
    dims = (unet.config.joint_attention_dim, unet.config.pooled_projection_dim)
    del unet
    data = write_demo_dataset(str(tmp_path / "data"), n=2, size=64)
    sp, out = tmp_path / "train_spec.json", tmp_path / "train_out.json"
    sp.write_text(json.dumps({"model": model_file, "context_dim": dims[0], "pooled_dim": dims[1], "data": data,
                              "base": str(tmp_path / "comfy_base")}))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.update(PYTHONPATH=COMFY, OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
    check = os.path.join(os.path.dirname(CHECK), "comfyui_flow_train_check.py")
    r = subprocess.run([PY, check, str(sp), str(out)], cwd=COMFY, env=env, capture_output=True, text=True,
                       timeout=3600)
    print(r.stdout[-6000:], r.stderr[-6000:])
    assert r.returncode == 0, r.stderr[-4000:]
    res = json.loads(out.read_text())
    assert res["model_config"] == "Flux"
    assert res["lora_name"] == "flux_real.safetensors"
    assert res["lora_path"] == str(tmp_path / "comfy_base" / "loras" / "flux_real.safetensors")
    assert "memory plan: Flux.1 transformer" in res["report"] and "2 steps" in res["report"]
    assert "lora_unet_double_blocks_0_img_attn_qkv" in res["lora_modules"]
    assert "lora_unet_single_blocks_0_linear1" in res["lora_modules"]
    assert res["not_loaded"] == [] and res["model_patches"] == len(res["lora_modules"])
    assert res["output_change"] > 0.0
    assert res["sweep_cells"] == [2, 64, 64, 3] and res["sweep_lora_changes"] > 0.0


@pytest.mark.parametrize("typ", ["loha", "lokr", "dora"])
@pytest.mark.parametrize("kind,config,modules", [("flux", "Flux", 13), ("sd3", "SD3", 19)])
def test_comfyui_applies_our_network_types_to_a_small_real_model(kind, config, modules, typ, tmp_path):
    """Issue 17 on the flow families: LoHa / LoKr / DoRA trained on our split modules, one adapter per module of
    the file (fused q/k/v), applied by ComfyUI's own loader to its fused weights: 0 keys not loaded and the patched
    weights change by our delta (in ComfyUI's layout; SD3's swapped pre-only rows included)."""
    import test_networks_flow as NF

    unet = small_model(kind)
    with torch.no_grad():  # bf16 base weights, as in the file ComfyUI loads: DoRA's norms see the same weight
        for p in unet.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    model_file = str(tmp_path / "small.safetensors")
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in unet.state_dict().items()}, model_file)
    dims = (unet.config.joint_attention_dim, unet.config.pooled_projection_dim)
    model = SimpleNamespace(kind=kind, unet=unet, text_encoder=None, text_encoder_2=None, text_encoder_3=None)
    NF.randomized_network(unet, typ)
    lora_file = L.save_kohya(L.extract(model), str(tmp_path / "lora.safetensors"), kind)
    parts = NF._part_deltas(unet)
    g = torch.Generator().manual_seed(1)
    probes = {}
    for name, grp in F.unet_groups(kind, unet, extras=False).items():
        delta = NF._fused_delta(grp, parts).float()  # rows in the file's (ComfyUI's) order
        x = torch.randn(delta.shape[1], 3, generator=g)
        probes[f"{name}.x"], probes[f"{name}.y"] = x, delta @ x
    probe_file = str(tmp_path / "probes.safetensors")
    save_file(probes, probe_file)
    scale = max(float(v.abs().max()) for k, v in probes.items() if k.endswith(".y"))
    del model, unet, parts
    res = comfy("run", {"model": model_file, "lora": lora_file, "probes": probe_file, "kind": kind,
                        "context_dim": dims[0], "pooled_dim": dims[1]}, tmp_path)
    print(typ, kind, "probe max abs diff", res["probe_max_abs_diff"], "largest probe", scale)
    assert res["model_config"] == config
    assert res["not_loaded"] == [] and res["lora_modules"] == res["patches"] == res["model_patched"] == modules
    assert res["probe_modules"] == modules and res["probe_max_abs_diff"] <= 1e-3 * max(scale, 1.0)
    assert res["output_change"] > 0.0

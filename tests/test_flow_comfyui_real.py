"""Flux / SD3.5 LoRAs we write, loaded by a real ComfyUI's own LoRA code (issue 16, must-have 7). Runs when
COMFYUI_DIR points at a ComfyUI checkout with its venv ($COMFYUI_PYTHON, else $COMFYUI_DIR/.venv/bin/python);
skipped otherwise. The ComfyUI side is tests/comfyui_flow_lora_check.py, run with ComfyUI's python:

- key map (full size, meta tensors): a diffusers-layout Flux.1 dev / SD3.5 Medium / SD3.5 Large state dict of our
  full-size meta models' shapes -> ComfyUI converts and detects it (Flux / SD3) and builds the model and its text
  encoders on the meta device; our file with every default module (transformer, CLIP-L, CLIP-G, T5) goes through
  comfy.lora.load_lora + ModelPatcher.add_patches: 0 keys not loaded, every module matched, shapes right.
- small real run: a random Flux-architecture model ComfyUI accepts (hidden size 3072 as ComfyUI's Flux detection
  assumes, 1 double + 1 single block, ~0.5 B parameters, bf16 file) is loaded by comfy.sd.load_diffusion_model;
  our LoRA (trained split, written fused) is applied by ComfyUI: 0 keys not loaded, the patched weights change by
  exactly our trained deltas (probes), and the model's output changes.
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


def test_comfyui_applies_our_flux_lora_to_a_small_real_model(tmp_path):
    torch.manual_seed(0)
    from diffusers import FluxTransformer2DModel

    unet = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                  joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=True).eval()
    model_file = str(tmp_path / "flux_small.safetensors")
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in unet.state_dict().items()}, model_file)
    model = SimpleNamespace(kind="flux", unet=unet, text_encoder=None, text_encoder_2=None, text_encoder_3=None)
    lw = T.trained_split_lora(model, rank=4, mixed=True)
    # small deltas relative to weights, as training makes them
    lw.modules = {k: (d * 0.05, u * 0.05, a) for k, (d, u, a) in lw.modules.items()}
    del unet
    lora_file = L.save_kohya(lw, str(tmp_path / "lora.safetensors"), "flux")
    # probes: per kohya module, (our trained delta in the fused layout) @ x
    g = torch.Generator().manual_seed(1)
    probes, ours = {}, T.deltas(lw)
    for name, grp in F.unet_groups("flux", model.unet, extras=False).items():
        delta = torch.cat([ours[("unet", p)] for p in grp.paths]).float()
        x = torch.randn(delta.shape[1], 3, generator=g)
        probes[f"{name}.x"], probes[f"{name}.y"] = x, delta @ x
    probe_file = str(tmp_path / "probes.safetensors")
    save_file(probes, probe_file)
    del model, lw, ours
    res = comfy("run", {"model": model_file, "lora": lora_file, "probes": probe_file}, tmp_path)
    assert res["model_config"] == "Flux"
    assert res["not_loaded"] == [] and res["lora_modules"] == res["patches"] == res["model_patched"] == 13
    assert res["probe_modules"] == 13 and res["probe_max_abs_diff"] <= 1e-3  # weights patched in fp32 from bf16 file
    assert res["output_change"] > 1e-3 * max(res["output_scale"], 1.0)
    assert res["unpatched_again_diff"] <= 1e-5

"""Run INSIDE a real ComfyUI (its python, cwd = the ComfyUI checkout; started by tests/test_families_comfyui_real.py):
ComfyUI detects a Qwen-Image / Z-Image / Chroma / Wan 2.1 / FLUX.2 [dev] model from a state dict we made (the
original single-file layout) and applies a LoRA file we wrote with its own LoRA code.

    python comfyui_families_check.py SPEC.json OUT.json
        SPEC: {"kind": "qwen_image" | "z_image" | "chroma" | "wan" | "flux2",
               "model": original-layout .safetensors (bf16),
               "lora": our kohya file, "probes": .safetensors with, per kohya module NAME of our file,
               NAME.x (in x 3), NAME.dy (our delta in ComfyUI's fused layout @ x) and NAME.wy ((base + delta) @ x)}
        comfy.sd.load_diffusion_model_state_dict detects the model (comfy.model_detection) and loads it in float32
        ("unet missing" / "unet unexpected" warnings are collected); the LoRA goes through
        comfy.lora.model_lora_keys_unet, comfy.lora_convert.convert_lora, comfy.lora.load_lora and
        ModelPatcher.add_patches as comfy.sd.load_lora_for_models does; comfy.model_management.load_models_gpu
        patches the weights; each probed module's weight (base W0 and patched W1) is read from the model: (W1 - W0) @ x
        is compared with dy and W1 @ x with wy. The model's output (its velocity prediction) with and without the
        LoRA is compared, and once unpatched again with the first.
OUT: JSON with what ComfyUI did (model config, unet config, keys, warnings, diffs).
"""
import json
import logging
import sys

SPEC, OUT = sys.argv[1:3]
from comfy_side import capture_warnings, start_cpu  # noqa: E402

start_cpu()
import torch  # noqa: E402

import comfy.lora  # noqa: E402
import comfy.lora_convert  # noqa: E402
import comfy.model_management  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.utils  # noqa: E402


WARN = capture_warnings()
spec = json.load(open(SPEC))
kind = spec["kind"]
result = {"comfyui_version": __import__("comfyui_version").__version__, "kind": kind}

sd = comfy.utils.load_torch_file(spec["model"], safe_load=True)
result["model_file_keys"] = len(sd)
patcher = comfy.sd.load_diffusion_model_state_dict(sd, model_options={"dtype": torch.float32})
del sd
assert patcher is not None, "ComfyUI did not detect the model"
model = patcher.model
result["model_config"] = type(model.model_config).__name__
result["model_class"] = type(model).__name__
result["diffusion_model_class"] = type(model.diffusion_model).__name__
result["unet_config"] = {k: (v if isinstance(v, (int, float, str, bool, type(None))) else str(v))
                         for k, v in model.model_config.unet_config.items()}
result["weight_dtype"] = str(next(model.diffusion_model.parameters()).dtype)
result["load_warnings"] = [w for w in WARN.lines if w.startswith(("unet missing", "unet unexpected"))]
result["model_params"] = sum(p.numel() for p in model.diffusion_model.parameters())

torch.manual_seed(0)
t = torch.tensor([0.5])
if kind in ("qwen_image", "wan"):  # 3-D latents (B, C, T, H, W): Wan21 latent format
    x = torch.randn(1, 16, 1, 16, 16)
elif kind == "flux2":  # Flux2 latent format: 128 channels (the VAE's 32 patchified 2x2), patch size 1
    x = torch.randn(1, 128, 16, 16)
else:
    x = torch.randn(1, 16, 16, 16)
ctx_dim = {"qwen_image": 3584, "wan": 4096}.get(kind) or int(spec["context_dim"])
ctx = torch.randn(1, 8, ctx_dim)
extra = {"z_image": {"num_tokens": 8}, "chroma": {"guidance": torch.tensor([0.0])},
         "flux2": {"guidance": torch.tensor([4.0])}}.get(kind, {})  # FLUX.2 [dev]: guidance-distilled


def output(p):
    """The model's own prediction (velocity): apply_model gives the flow models' denoised x - sigma * v."""
    comfy.model_management.load_models_gpu([p])
    with torch.no_grad():
        denoised = p.model.apply_model(x, t, c_crossattn=ctx, **extra).float()
    return (x - denoised) / t.view(-1, *([1] * (x.dim() - 1)))


lora = comfy.utils.load_torch_file(spec["lora"], safe_load=True)
probes = comfy.utils.load_torch_file(spec["probes"], safe_load=True)
names = sorted({k.split(".")[0] for k in lora})
key_map = comfy.lora.model_lora_keys_unet(model, {})
result["unmatched_names"] = [n for n in names if n not in key_map]
targets = {n: (key_map[n] if isinstance(key_map[n], str) else key_map[n][0]) for n in names if n in key_map}
result["sliced_targets"] = [n for n in names if n in key_map and not isinstance(key_map[n], str)]
probe_names = sorted({p.rsplit(".", 1)[0] for p in probes if p.endswith(".x")})


def peak_rss_mb():
    """This process's peak resident memory (VmHWM: counted from the exec, unlike ru_maxrss)."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) // 1024
    return -1


def weight(key):
    return comfy.utils.get_attr(model, key)


out0 = output(patcher)
with torch.no_grad():  # the base weights as ComfyUI loaded them, seen through the probes
    before = {n: weight(targets[n]).float() @ probes[f"{n}.x"].float() for n in probe_names if n in targets}

lora_c = comfy.lora_convert.convert_lora(lora)
loaded = comfy.lora.load_lora(lora_c, key_map)
patched = patcher.clone()
k = set(patched.add_patches(loaded, 1.0))
for xk in loaded:
    if xk not in k:
        logging.warning("NOT LOADED {}".format(xk))
out1 = output(patched)  # load_models_gpu applies the patches to the weights
worst_delta = worst_full = 0.0
scale_delta = scale_full = 0.0
checked = 0
with torch.no_grad():
    for n in probe_names:
        if n not in targets:
            continue
        w1x = weight(targets[n]).float() @ probes[f"{n}.x"].float()
        dy, wy = probes[f"{n}.dy"].float(), probes[f"{n}.wy"].float()
        worst_delta = max(worst_delta, float((w1x - before[n] - dy).abs().max()))
        worst_full = max(worst_full, float((w1x - wy).abs().max()))
        scale_delta, scale_full = max(scale_delta, float(dy.abs().max())), max(scale_full, float(wy.abs().max()))
        checked += 1
comfy.model_management.unload_all_models()
out_again = output(patcher)
comfy.model_management.unload_all_models()
result.update(lora_modules=len(names), patches=len(loaded), model_patched=len(k),
              not_loaded=[w for w in WARN.lines if w.startswith(("lora key not loaded", "NOT LOADED"))],
              warnings=WARN.lines[-20:], probe_modules=checked, probe_max_abs_diff=worst_delta,
              probe_delta_scale=scale_delta, probe_full_max_abs_diff=worst_full, probe_full_scale=scale_full,
              output_shape=list(out0.shape), output_change=float((out1 - out0).abs().max()),
              output_scale=float(out0.abs().max()), output_finite=bool(torch.isfinite(out1).all()),
              unpatched_again_diff=float((out_again - out0).abs().max()),
              max_rss_mb=peak_rss_mb())
json.dump(result, open(OUT, "w"), indent=1)
print(json.dumps({k: v for k, v in result.items() if k not in ("warnings",)}, indent=1))

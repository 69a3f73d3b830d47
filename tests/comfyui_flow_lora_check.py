"""Run INSIDE a real ComfyUI (its python, cwd = the ComfyUI checkout; started by tests/test_flow_comfyui_real.py):
ComfyUI detects a Flux / SD3 model from a state dict we made and loads a LoRA file we wrote with its own LoRA code.

    python comfyui_flow_lora_check.py keymap SPEC.json OUT.json
        SPEC: {"transformer_shapes": {diffusers key: shape}, "clip": "flux" | "sd3" | null, "lora": path}
        The diffusers-layout state dict is made of meta tensors, converted by ComfyUI's own
        comfy.model_detection.convert_diffusers_mmdit, detected by model_config_from_unet and built on the meta
        device; the text encoders are ComfyUI's own FluxClipModel / SD3ClipModel on meta. The LoRA goes through
        comfy.lora.model_lora_keys_unet / model_lora_keys_clip, comfy.lora_convert.convert_lora, comfy.lora.load_lora
        and ModelPatcher.add_patches exactly as comfy.sd.load_lora_for_models does.
    python comfyui_flow_lora_check.py run SPEC.json OUT.json
        SPEC: {"model": diffusers-layout transformer .safetensors, "lora": path, "probes": .safetensors,
               "kind": "flux" | "sd3", "context_dim": int, "pooled_dim": int}
        comfy.sd.load_diffusion_model loads the model, load_lora_for_models applies the LoRA, the patched weights'
        change is measured on the probes (delta @ x per kohya module, made by the test from our trained weights),
        and the model's output with and without the LoRA is compared.
OUT: JSON with what ComfyUI did (model config, keys, warnings, mismatches, diffs).
"""
import json
import logging
import sys

MODE, SPEC, OUT = sys.argv[1:4]
from comfy_side import capture_warnings, start_cpu  # noqa: E402

start_cpu()
import torch  # noqa: E402

import comfy.lora  # noqa: E402
import comfy.lora_convert  # noqa: E402
import comfy.model_detection  # noqa: E402
import comfy.model_management  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.utils  # noqa: E402


WARN = capture_warnings()
spec = json.load(open(SPEC))
result = {"comfyui_version": __import__("comfyui_version").__version__}


def not_loaded():
    return [w for w in WARN.lines if w.startswith(("lora key not loaded", "NOT LOADED"))]


def apply_keys(lora, key_map, model_patcher, clip_patcher):
    """comfy.sd.load_lora_for_models' steps, with the two patchers."""
    lora = comfy.lora_convert.convert_lora(lora)
    loaded = comfy.lora.load_lora(lora, key_map)
    k = set(model_patcher.clone().add_patches(loaded, 1.0)) if model_patcher is not None else set()
    k1 = set(clip_patcher.clone().add_patches(loaded, 1.0)) if clip_patcher is not None else set()
    for x in loaded:
        if x not in k and x not in k1:
            logging.warning("NOT LOADED {}".format(x))
    return loaded, k, k1


cpu = torch.device("cpu")
if MODE == "keymap":
    sd = {k: torch.empty(s, device="meta", dtype=torch.bfloat16) for k, s in spec["transformer_shapes"].items()}
    bfl = comfy.model_detection.convert_diffusers_mmdit(sd, "")
    model_config = comfy.model_detection.model_config_from_unet(bfl, "")
    result["model_config"] = type(model_config).__name__
    with torch.device("meta"):
        model = model_config.get_model(bfl, "", device=torch.device("meta"))
    model_sd_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    result["model_params_bfl"] = len(model_sd_shapes)
    key_map = comfy.lora.model_lora_keys_unet(model, {})
    clip_model = None
    if spec.get("clip") == "flux":
        import comfy.text_encoders.flux as te_mod

        with torch.device("meta"):
            clip_model = te_mod.FluxClipModel(device=torch.device("meta"))
    elif spec.get("clip") == "sd3":
        import comfy.text_encoders.sd3_clip as te_mod

        with torch.device("meta"):
            clip_model = te_mod.SD3ClipModel(device=torch.device("meta"))
    if clip_model is not None:
        key_map = comfy.lora.model_lora_keys_clip(clip_model, key_map)
        clip_shapes = {k: tuple(v.shape) for k, v in clip_model.state_dict().items()}
    else:
        clip_shapes = {}
    model_patcher = comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)
    clip_patcher = comfy.model_patcher.ModelPatcher(clip_model, load_device=cpu, offload_device=cpu) \
        if clip_model is not None else None
    lora = comfy.utils.load_torch_file(spec["lora"], safe_load=True)
    names = sorted({k.split(".")[0] for k in lora})
    loaded, k, k1 = apply_keys(lora, key_map, model_patcher, clip_patcher)
    result.update(lora_modules=len(names), patches=len(loaded), model_patched=len(k), clip_patched=len(k1),
                  not_loaded=not_loaded(), unmatched_names=[n for n in names if n not in key_map])
    # every patch lands on a weight of the shape up @ down makes (whole weight or the key map's slice)
    bad = []
    for n in names:
        target = key_map.get(n)
        if target is None:
            continue
        key, offset = (target, None) if isinstance(target, str) else (target[0], target[1])
        shape = model_sd_shapes.get(key) or clip_shapes.get(key)
        up, down = lora[f"{n}.lora_up.weight"], lora[f"{n}.lora_down.weight"]
        want = (up.shape[0], down.shape[1])
        have = tuple(shape[:2]) if offset is None else (offset[2], shape[1])
        if want != have:
            bad.append([n, key, list(want), list(have)])
    result["shape_mismatches"] = bad
    result["targets"] = {n: (key_map[n] if isinstance(key_map[n], str) else key_map[n][0]) for n in names
                         if n in key_map and n.startswith("lora_unet_")}
elif MODE == "run":
    patcher = comfy.sd.load_diffusion_model(spec["model"])
    result["model_config"] = type(patcher.model.model_config).__name__
    lora = comfy.utils.load_torch_file(spec["lora"], safe_load=True)
    probes = comfy.utils.load_torch_file(spec["probes"], safe_load=True)
    torch.manual_seed(0)
    dm = patcher.model.diffusion_model
    in_ch = patcher.model.model_config.unet_config["in_channels"]
    x = torch.randn(1, in_ch, 16, 16)
    t = torch.tensor([0.5])
    ctx = torch.randn(1, 8, spec["context_dim"])
    vec = torch.randn(1, spec["pooled_dim"])
    extra = {"guidance": torch.tensor([1.0])} if spec["kind"] == "flux" else {}

    def output(p):
        comfy.model_management.load_models_gpu([p])
        with torch.no_grad():
            return p.model.apply_model(x, t, c_crossattn=ctx, y=vec, **extra).float()

    before_w = {k: v.detach().float().clone() for k, v in patcher.model.state_dict().items()}
    out0 = output(patcher)
    key_map = comfy.lora.model_lora_keys_unet(patcher.model, {})
    lora_c = comfy.lora_convert.convert_lora(lora)
    loaded = comfy.lora.load_lora(lora_c, key_map)
    patched = patcher.clone()
    k = set(patched.add_patches(loaded, 1.0))
    for xk in loaded:
        if xk not in k:
            logging.warning("NOT LOADED {}".format(xk))
    out1 = output(patched)
    after = patched.model.state_dict()
    worst = 0.0
    checked = 0
    for name in sorted({p.rsplit(".", 1)[0] for p in probes if p.endswith(".x")}):
        key = key_map[name] if isinstance(key_map[name], str) else key_map[name][0]
        delta = after[key].float() - before_w[key]
        got = delta @ probes[f"{name}.x"].float()
        worst = max(worst, float((got - probes[f"{name}.y"].float()).abs().max()))
        checked += 1
    comfy.model_management.unload_all_models()
    out_again = output(patcher)
    result.update(lora_modules=len({k.split(".")[0] for k in lora}), patches=len(loaded), model_patched=len(k),
                  not_loaded=not_loaded(), probe_modules=checked, probe_max_abs_diff=worst,
                  output_change=float((out1 - out0).abs().max()), output_scale=float(out0.abs().max()),
                  unpatched_again_diff=float((out_again - out0).abs().max()))
json.dump(result, open(OUT, "w"), indent=1)
print(json.dumps({k: v for k, v in result.items() if k != "targets"}, indent=1))

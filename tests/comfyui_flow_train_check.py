"""Run INSIDE a real ComfyUI (its python, cwd = the ComfyUI checkout; started by tests/test_flow_comfyui_real.py):
our Train node trains on a Flux graph ComfyUI built, and ComfyUI's own LoRA code and sampler use the result.

    python comfyui_flow_train_check.py SPEC.json OUT.json
        SPEC: {"model": diffusers-layout Flux transformer .safetensors (hidden 3072, as ComfyUI's Flux detection
               needs), "context_dim": int, "pooled_dim": int, "data": image folder, "base": temp folder}
The graph as ComfyUI's loaders make it (under torch.inference_mode, as its executor runs nodes):
  MODEL  comfy.sd.load_diffusion_model (detected as Flux, converted from the diffusers layout by ComfyUI);
  CLIP   comfy.sd.CLIP with ComfyUI's own FluxTokenizer / FluxClipModel (clip_l + t5xxl), made small through its
         model_options (`clip_l_model_config`, `t5xxl_model_config`: widths that fit the transformer), random weights;
  VAE    comfy.sd.VAE of a random full-size Flux ae (LDM keys, as ae.safetensors holds them).
Then our package is loaded as ComfyUI loads a custom node, its folders are a temp base dir (folder_paths), and:
LoraTrainTrain (2 steps, 64 px) -> the LoRA in loras/ -> comfy.sd.load_lora_for_models (warnings counted) -> the
model's output with / without it -> LoraTrainStrengthSweep through ComfyUI's common_ksampler and VAE decode.
OUT: JSON with what happened.
"""
import importlib.util
import json
import os
import sys

SPEC, OUT = sys.argv[1:3]
from comfy_side import capture_warnings, start_cpu  # noqa: E402

start_cpu()
import torch  # noqa: E402

import comfy.lora  # noqa: E402
import comfy.model_management  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.supported_models_base  # noqa: E402
import comfy.text_encoders.flux as flux_te  # noqa: E402
import comfy.utils  # noqa: E402
import folder_paths  # noqa: E402
import nodes  # noqa: E402,F401  (ComfyUI's nodes.py, imported by its main.py before any custom node)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


WARN = capture_warnings()
spec = json.load(open(SPEC))
result = {"comfyui_version": __import__("comfyui_version").__version__}
base = spec["base"]
for sub in ("loras", "output", "temp"):
    os.makedirs(os.path.join(base, sub), exist_ok=True)
folder_paths.add_model_folder_path("loras", os.path.join(base, "loras"), is_default=True)
folder_paths.set_output_directory(os.path.join(base, "output"))
folder_paths.set_temp_directory(os.path.join(base, "temp"))


def randomize(sd, seed):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in sd.items():
        if not v.is_floating_point() or v.dim() == 0:
            out[k] = v
        elif "norm" in k and k.endswith(("weight", "scale")):
            out[k] = torch.ones_like(v, dtype=torch.float32)
        elif k.endswith("bias") or "norm" in k:
            out[k] = torch.zeros_like(v, dtype=torch.float32)
        else:
            out[k] = torch.randn(v.shape, generator=g) * 0.02
    return out


with torch.inference_mode():
    model = comfy.sd.load_diffusion_model(spec["model"])
    result["model_config"] = type(model.model.model_config).__name__
    ctx, pooled = spec["context_dim"], spec["pooled_dim"]
    opts = {"clip_l_model_config": {"hidden_size": pooled, "intermediate_size": 2 * pooled, "num_attention_heads": 4,
                                    "num_hidden_layers": 2, "projection_dim": pooled},
            "t5xxl_model_config": {"d_model": ctx, "d_kv": 16, "num_heads": 4, "d_ff": 2 * ctx, "num_layers": 2}}
    target = comfy.supported_models_base.ClipTarget(flux_te.FluxTokenizer, flux_te.flux_clip())
    clip = comfy.sd.CLIP(target=target, embedding_directory=None, model_options=opts)
    missing, unexpected = clip.load_sd(randomize(clip.get_sd(), 1), full_model=True)
    result["clip_keys"] = len(clip.get_sd())
    from diffusers import AutoencoderKL

    sys.path.insert(0, ROOT)
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from ldm_writers import vae_to_ldm

    torch.manual_seed(2)
    ae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                       down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                       layers_per_block=2, use_quant_conv=False, use_post_quant_conv=False)
    vae = comfy.sd.VAE(sd={k[len("first_stage_model."):]: v for k, v in vae_to_ldm(ae).items()})
    del ae

spec_mod = importlib.util.spec_from_file_location("lora_train_pack", os.path.join(ROOT, "__init__.py"))
pack = importlib.util.module_from_spec(spec_mod)
sys.modules["lora_train_pack"] = pack
spec_mod.loader.exec_module(pack)
maps = pack.NODE_CLASS_MAPPINGS
with torch.inference_mode():
    ref = maps["LoraTrainDatasetFromFolder"]().load(spec["data"], "zq", 64, 1)["result"][0]
    out = maps["LoraTrainTrain"]().train(
        model, clip, vae, ref, "flux_real", learning_rate=1e-3, rank=4, alpha=4.0, batch_size=1,
        gradient_accumulation=1, epochs=1, max_steps=2, lr_scheduler="constant", warmup_steps=0, optimizer="AdamW",
        train_text_encoder=False, training_seed=1, save_every_n_epochs=0, mixed_precision="no", unique_id="1")
lora_name, lora_path, _plot, report = out["result"]
result.update(lora_name=lora_name, lora_path=lora_path, report=report)
lora = comfy.utils.load_torch_file(lora_path, safe_load=True)
result["lora_keys"] = len(lora)
result["lora_modules"] = sorted({k.split(".")[0] for k in lora})
WARN.lines.clear()
with torch.inference_mode():
    m2, c2 = comfy.sd.load_lora_for_models(model, clip, lora, 1.0, 1.0)
result["not_loaded"] = [w for w in WARN.lines if w.startswith(("lora key not loaded", "NOT LOADED"))]
result["model_patches"] = len(m2.patches)

torch.manual_seed(0)
x = torch.randn(1, 16, 8, 8)
t = torch.tensor([0.5])
c = torch.randn(1, 8, ctx)
y = torch.randn(1, pooled)


def output(p):
    comfy.model_management.load_models_gpu([p])
    with torch.no_grad():
        return p.model.apply_model(x, t, c_crossattn=c, y=y, guidance=torch.tensor([1.0])).float()


o0 = output(model)
o1 = output(m2)
comfy.model_management.unload_all_models()
result.update(output_change=float((o1 - o0).abs().max()), output_scale=float(o0.abs().max()))
with torch.inference_mode():
    grid, cells, info = maps["LoraTrainStrengthSweep"]().sweep(
        model, clip, vae, lora_name, "a zq picture", "", "1.0", "1", 2, 1.0, "euler", "simple", 64, 64, False)
result.update(sweep_cells=list(cells.shape), sweep_info=info,
              sweep_lora_changes=float((cells[1] - cells[0]).abs().max()))
json.dump(result, open(OUT, "w"), indent=1)
print(json.dumps(result, indent=1))

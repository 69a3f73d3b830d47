"""Run INSIDE a real ComfyUI (its python, cwd = the ComfyUI checkout; started by tests/test_comfyui_inplace_real.py):
our Train node trains a graph's own MODEL in place (in_place "on"), and ComfyUI's own LoRA loader and sampler use
the file.

    python comfyui_inplace_check.py SPEC.json OUT.json
        SPEC: {"kind": sd15 | flux | sd3 | chroma | z_image | qwen_image | wan | flux2,
               "model": a .safetensors ComfyUI detects (a checkpoint for sd15, a diffusion model otherwise),
               "dtype": "float32" | "bfloat16" (the weights as ComfyUI stores them), "clip": {...}, "vae": {...},
               "data": image folder, "base": temp folder, "steps", "lr", "rank", "alpha", "batch",
               "lora": (mode verify) a LoRA file trained elsewhere (the /prompt run), "train": extra node inputs}
        "clip": {"type": "checkpoint"} (the checkpoint's own), {"type": "flux" | "sd3" | "chroma" | "z_image", ...
               widths}: ComfyUI's own tokenizer and text encoder classes (comfy.sd.CLIP with its ClipTarget), made
               small through its model_options (`<name>_model_config`), random weights; {"type": "standin",
               "width": W}: `StandInCLIP` below, for the families whose ComfyUI text encoder has a fixed full size.
        "vae": {"type": "checkpoint"}; {"type": "ae16" | "ae_flux2" | "wan21", ...}: ComfyUI's own VAE class
               (comfy.sd.VAE detects it from a random state dict of ComfyUI's own module).
The graph as ComfyUI's executor makes it (loaders and our node under torch.inference_mode()):
  MODEL  comfy.sd.load_checkpoint_guess_config (sd15) / comfy.sd.load_diffusion_model_state_dict (the rest);
then LoraTrainTrain.train(in_place="on") -> the file in loras/ -> checks with ComfyUI's own code:
  - the graph's MODEL is as before (every parameter and buffer: the same tensor objects, equal sums; no weight /
    bias function left on any module; its patcher's patches and weight wrappers as before);
  - comfy.sd.load_lora_for_models: "lora key not loaded" warnings (none), modules patched (all of the file);
  - after load_models_gpu the patched weights = base + alpha / rank * up @ down: elementwise on the 3 smallest
    modules, and on every module of the file through probes (W @ x for random x, base read before training);
  - the native objective (||x0_pred - x0||^2 / sigma^2: epsilon for EPS models, v for flow ones) on the training
    images at fixed noise and sigmas (percent_to_sigma 0.35, 0.7), through comfy.samplers.process_conds +
    calc_cond_batch, without and with the LoRA: it falls;
  - a 1-step euler comfy.sample.sample (KSampler's path) without / with the LoRA: the latents differ.
OUT: JSON with what happened.
"""
import importlib.util
import json
import os
import re
import sys
import time

SPEC, OUT = sys.argv[1:3]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from comfy_side import capture_warnings, start_cpu  # noqa: E402

start_cpu()
import torch  # noqa: E402

import comfy.lora  # noqa: E402
import comfy.model_management as mm  # noqa: E402
import comfy.sample  # noqa: E402
import comfy.sampler_helpers  # noqa: E402
import comfy.samplers  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.utils  # noqa: E402
import folder_paths  # noqa: E402
import nodes  # noqa: E402,F401  (ComfyUI's nodes.py, imported by its main.py before any custom node)

from comfy_small_graph import StandInCLIP, make_clip, make_vae  # noqa: E402

WARN = capture_warnings()
spec = json.load(open(SPEC))
kind = spec["kind"]
T0 = time.time()
result = {"comfyui_version": __import__("comfyui_version").__version__, "kind": kind}
base = spec["base"]
for sub in ("loras", "output", "temp"):
    os.makedirs(os.path.join(base, sub), exist_ok=True)
folder_paths.add_model_folder_path("loras", os.path.join(base, "loras"), is_default=True)
folder_paths.set_output_directory(os.path.join(base, "output"))
folder_paths.set_temp_directory(os.path.join(base, "temp"))


def rss_mb(field="VmRSS"):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) // 1024
    return -1


def load_graph():
    dtype = getattr(torch, spec.get("dtype", "float32"))
    with torch.inference_mode():  # as ComfyUI's executor runs the loader nodes
        if spec["clip"]["type"] == "checkpoint":
            model, clip, vae = comfy.sd.load_checkpoint_guess_config(
                spec["model"], output_vae=True, output_clip=True, model_options={"dtype": dtype})[:3]
        else:
            sd = comfy.utils.load_torch_file(spec["model"], safe_load=True)
            model = comfy.sd.load_diffusion_model_state_dict(sd, model_options={"dtype": dtype})
            del sd
            clip, vae = make_clip(spec["clip"]), make_vae(spec["vae"])
    assert model is not None, "ComfyUI did not detect the model"
    return model, clip, vae


# ----------------------------------------------------------------------------- what ComfyUI holds
def layers(inner):
    """ComfyUI's weight layers of the diffusion model: {path: module} (Linear / Conv with weight_function)."""
    return {n: m for n, m in inner.diffusion_model.named_modules()
            if hasattr(m, "weight_function") and getattr(m, "weight", None) is not None and m.weight.dim() >= 2}


def fingerprint(inner):
    """Every parameter and buffer of ComfyUI's model: (tensor object id, dtype, shape, float64 sum, sum of squares)."""
    out = {}
    with torch.no_grad():
        for name, t in list(inner.named_parameters()) + list(inner.named_buffers()):
            f = t.detach().double()
            out[name] = (id(t), str(t.dtype), tuple(t.shape), float(f.sum()), float((f * f).sum()))
    return out


def leftovers(inner):
    return sum(len(getattr(m, "weight_function", []) or []) + len(getattr(m, "bias_function", []) or [])
               for m in inner.modules())


def probe_inputs(lay, seed=3):
    g = torch.Generator().manual_seed(seed)
    xs, ys = {}, {}
    with torch.no_grad():
        for n, m in lay.items():
            w = m.weight.detach().float().flatten(1)
            xs[n] = torch.randn(w.shape[1], 3, generator=g)
            ys[n] = w @ xs[n]
    return xs, ys


def delta_of(lora, name, shape):
    """alpha / rank * up @ down of one module of our file, in the weight's shape."""
    down, up = lora[f"{name}.lora_down.weight"].float(), lora[f"{name}.lora_up.weight"].float()
    rank = down.shape[0]
    alpha = float(lora[f"{name}.alpha"]) if f"{name}.alpha" in lora else rank
    return (alpha / rank) * (up.flatten(1) @ down.flatten(1)).reshape(shape)


# ----------------------------------------------------------------------------- the checks
def images_and_captions():
    sys.path.insert(0, ROOT)
    from PIL import Image

    ds = pack.NODE_CLASS_MAPPINGS["LoraTrainDatasetFromFolder"]().load(spec["data"], "zq", 64, 1)["result"][0]
    items = ds.load().items
    pix = []
    for it in items:
        with Image.open(it.path) as im:
            pix.append(torch.frombuffer(bytearray(im.convert("RGB").resize((64, 64)).tobytes()), dtype=torch.uint8)
                       .reshape(64, 64, 3).float() / 255.0)
    return ds, torch.stack(pix), [it.caption for it in items]


def conditioning(clip, text):
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def native_loss(patcher, x0s, conds, noise, percents):
    """Mean over images and sigmas of ||x0_pred - x0||^2 / sigma^2 (the model's own eps / v objective) at fixed
    noise, x0_pred from ComfyUI's sampling forward (process_conds + calc_cond_batch)."""
    mm.load_models_gpu([patcher])
    m = patcher.model
    ms = m.model_sampling
    total, n = 0.0, 0
    patcher.pre_run()  # as a sampler does (model.current_patcher)
    with torch.no_grad():
        for x0, cond, nz in zip(x0s, conds, noise):
            for p in percents:
                s = torch.tensor([float(ms.percent_to_sigma(p))])
                view = s.reshape((1,) + (1,) * (x0.dim() - 1))
                xt = ms.noise_scaling(view, nz, x0, False)
                c = comfy.samplers.process_conds(m, nz, {"positive": comfy.sampler_helpers.convert_cond(cond)},
                                                 "cpu", latent_image=x0, seed=0)
                out = comfy.samplers.calc_cond_batch(m, [c["positive"]], xt, s, patcher.model_options)[0]
                total += float(((out.float() - x0.float()) ** 2).mean() / s[0] ** 2)
                n += 1
    patcher.cleanup()
    return total / n


def sample(patcher, latent, pos, neg):
    with torch.no_grad():
        noise = comfy.sample.prepare_noise(latent, 7)
        return comfy.sample.sample(patcher, noise, 1, 1.0, "euler", "simple", pos, neg, latent, seed=7,
                                   disable_pbar=True).float()


spec_mod = importlib.util.spec_from_file_location("lora_train_pack", os.path.join(ROOT, "__init__.py"))
pack = importlib.util.module_from_spec(spec_mod)
sys.modules["lora_train_pack"] = pack
spec_mod.loader.exec_module(pack)

model, clip, vae = load_graph()
inner = model.model
result["model_config"] = type(inner.model_config).__name__
result["diffusion_model_class"] = type(inner.diffusion_model).__name__
result["model_sampling"] = type(inner.model_sampling).__name__
result["weight_dtype"] = str(next(inner.diffusion_model.parameters()).dtype)
result["model_params"] = sum(p.numel() for p in inner.diffusion_model.parameters())
result["load_warnings"] = [w for w in WARN.lines if w.startswith(("unet missing", "unet unexpected"))]
result["t_load"] = time.time() - T0
lay = layers(inner)
xs, ys0 = probe_inputs(lay)
before = fingerprint(inner)
patches_before = (dict(model.patches), dict(model.weight_wrapper_patches))
ds, pixels, captions = images_and_captions()

rss0 = rss_mb()
t1 = time.time()
if spec.get("lora"):  # verify mode: a file trained elsewhere (through the /prompt API)
    lora_path, report = spec["lora"], ""
else:
    kw = dict(learning_rate=spec["lr"], rank=spec["rank"], alpha=spec["alpha"], batch_size=spec["batch"],
              gradient_accumulation=1, epochs=100, max_steps=spec["steps"], lr_scheduler="constant", warmup_steps=0,
              optimizer="AdamW", train_text_encoder=False, training_seed=1, save_every_n_epochs=0,
              mixed_precision="no", unique_id="1", in_place="on")
    kw.update(spec.get("train", {}))
    if spec.get("kohya"):  # kohya keys without a widget (gradient_checkpointing) through the node's kohya_config
        toml = os.path.join(base, "kohya.toml")
        with open(toml, "w") as fh:
            fh.writelines(f"{k} = {json.dumps(v)}\n" for k, v in spec["kohya"].items())
        kw["kohya_config"] = toml
    with torch.inference_mode():  # as ComfyUI's executor runs every node
        out = pack.NODE_CLASS_MAPPINGS["LoraTrainTrain"]().train(model, clip, vae, ds, f"{kind}_inplace", **kw)
    lora_name, lora_path, _plot, report = out["result"]
    result.update(lora_name=lora_name, report=report)
    m = re.search(r"loss: first ([0-9.eE+-]+|nan|inf), last ([0-9.eE+-]+|nan|inf)", report)
    result["node_loss_first"], result["node_loss_last"] = (float(m.group(1)), float(m.group(2))) if m else (None, None)
    m = re.search(r"ComfyUI applies (\d+) of (\d+) LoRA modules", report)
    result["node_applies"] = [int(m.group(1)), int(m.group(2))] if m else None
result["t_train"] = time.time() - t1
result["train_peak_rss_mb"] = rss_mb("VmHWM")
result["rss_before_train_mb"] = rss0

# the graph's MODEL as it was
after = fingerprint(inner)
result["source_changed"] = sorted(k for k in before if after.get(k) != before[k])[:10]
result["source_tensors"] = len(before)
result["source_leftover_functions"] = leftovers(inner)
result["source_patches_same"] = (dict(model.patches), dict(model.weight_wrapper_patches)) == patches_before

# ComfyUI's own loader on the file
lora = comfy.utils.load_torch_file(lora_path, safe_load=True)
names = sorted({k.split(".")[0] for k in lora})
result["lora_modules"] = len(names)
result["lora_module_sample"] = names[:3] + names[-2:]
WARN.lines.clear()
with torch.inference_mode():
    m2, _c2 = comfy.sd.load_lora_for_models(model, None if isinstance(clip, StandInCLIP) else clip, lora, 1.0, 1.0)
result["not_loaded"] = [w for w in WARN.lines if "lora key not loaded" in w or "NOT LOADED" in w]
result["model_patches"] = len(m2.patches)

# patched weights = base + delta
key_map = comfy.lora.model_lora_keys_unet(inner, {})
paths = {}
for n in names:
    k = key_map.get(n)
    k = k[0] if isinstance(k, tuple) else k
    paths[n] = k[len("diffusion_model."):-len(".weight")] if k else None
result["unmapped"] = [n for n in names if paths[n] is None]
exact = sorted((n for n in names if paths[n]), key=lambda n: lay[paths[n]].weight.numel())[:3]  # the 3 smallest
w0 = {n: comfy.utils.get_attr(inner, f"diffusion_model.{paths[n]}.weight").detach().float().clone() for n in exact}
mm.load_models_gpu([m2])
worst, scale, worst_probe, scale_probe, probed = 0.0, 0.0, 0.0, 0.0, 0
#: one rounding step of the stored weights, relative (ComfyUI patches in float32 and stores in the weight's dtype)
ulp = {torch.float32: 2 ** -24, torch.bfloat16: 2 ** -8, torch.float16: 2 ** -11}[next(iter(lay.values())).weight.dtype]
round_exact = round_probe = 0.0
with torch.no_grad():
    for n in names:
        if not paths[n]:
            continue
        w1 = comfy.utils.get_attr(inner, f"diffusion_model.{paths[n]}.weight").detach().float()
        d = delta_of(lora, n, w1.shape)
        if n in w0:
            worst = max(worst, float((w1 - (w0[n] + d)).abs().max()))
            scale = max(scale, float(d.abs().max()))
            round_exact = max(round_exact, ulp * float((w0[n] + d).abs().max()))
        round_probe = max(round_probe, ulp * float((w1.abs().flatten(1) @ xs[paths[n]].abs()).max()))
        y1 = w1.flatten(1) @ xs[paths[n]]
        dy = d.flatten(1) @ xs[paths[n]]
        worst_probe = max(worst_probe, float((y1 - ys0[paths[n]] - dy).abs().max()))
        scale_probe = max(scale_probe, float(dy.abs().max()))
        probed += 1
result.update(exact_modules=exact, patched_max_abs_diff=worst, delta_scale=scale, probe_modules=probed,
              probe_max_abs_diff=worst_probe, probe_delta_scale=scale_probe, rounding_exact=round_exact,
              rounding_probe=round_probe)
mm.unload_all_models()
result["t_weights"] = time.time() - t1 - result["t_train"]
t2 = time.time()

# the objective on the training images at fixed noise, and a sample, without / with the LoRA
with torch.no_grad():
    raw = [vae.encode(pixels[i:i + 1]) for i in range(pixels.shape[0])]
    x0s = [inner.process_latent_in(r.float()) for r in raw]
    conds = [conditioning(clip, c) for c in captions]
    g = torch.Generator().manual_seed(11)
    noise = [torch.randn(x.shape, generator=g) for x in x0s]
pct = [0.35, 0.7]
result["latent_shape"] = list(raw[0].shape)
result["loss_base"] = native_loss(model, x0s, conds, noise, pct)
result["loss_lora"] = native_loss(m2, x0s, conds, noise, pct)
mm.unload_all_models()
result["t_objective"] = time.time() - t2
t3 = time.time()
pos, neg = conds[0], conditioning(clip, "")
latent = torch.zeros_like(raw[0])
s0 = sample(model, latent, pos, neg)
s1 = sample(m2, latent, pos, neg)
s0b = sample(model, latent, pos, neg)
result.update(sample_change=float((s1 - s0).abs().max()), sample_scale=float(s0.abs().max()),
              sample_finite=bool(torch.isfinite(s1).all()), sample_repeat_diff=float((s0b - s0).abs().max()))
mm.unload_all_models()
result["t_sample"] = time.time() - t3
# (ComfyUI's unpatch puts each patched weight back as a new Parameter of the same tensor: values only here)
result["source_changed_end"] = sorted(k for k, v in fingerprint(inner).items() if v[1:] != before[k][1:])[:10]
result["peak_rss_mb"] = rss_mb("VmHWM")
result["t_total"] = time.time() - T0
json.dump(result, open(OUT, "w"), indent=1)
print(json.dumps(result, indent=1))

"""Our Train node trains a real ComfyUI 0.8.0's own MODEL in place (in_place "on", hosts/comfyui_inplace.py), for
every family it loads, and ComfyUI's own LoRA loader and sampler use the file. Runs when COMFYUI_DIR points at a
ComfyUI checkout with its venv ($COMFYUI_PYTHON, else $COMFYUI_DIR/.venv/bin/python); skipped otherwise. The
ComfyUI side is tests/comfyui_inplace_check.py (its docstring lists the checks), run with ComfyUI's python.

What is real, per family (random weights everywhere):
- SD1.5 (through ComfyUI's /prompt API, the server of tests/test_nodes_comfyui_real.py): everything. The full-size
  random SD1.5 checkpoint is loaded by CheckpointLoaderSimple (its UNet, CLIP-L and VAE; fp16 weights computed in
  fp32 by ComfyUI's casts); Train LoRA in place; LoraLoader + KSampler + SaveLatent sample with / without the file,
  and with the file at strength 0 (the graph's own MODEL after training: the latents equal those before it). The
  checks on the weights run after, in another ComfyUI process on the same checkpoint and file (verify mode).
- Flux.1 (dev layout, hidden 3072 as ComfyUI fixes it, 1 double + 1 single block), SD3.5 (Medium-like: 2 blocks,
  qk norm, a dual-attention block), Chroma (1 + 1 blocks), Z-Image (1 layer, dim 3840 as ComfyUI fixes it): model,
  text encoder and VAE are ComfyUI's own classes. The text encoders are ComfyUI's tokenizers and encoder modules
  made small through its model_options (`<name>_model_config`): CLIP-L + T5-XXL (Flux.1), CLIP-L + CLIP-G (SD3.5;
  no T5, ComfyUI pads the context to its 4096), T5-XXL (Chroma), Qwen3 (Z-Image, head_dim 128 fixed: 2 heads,
  width 256). VAEs: ComfyUI's own module for the family at full size (the 16-channel Flux / SD3 autoencoder),
  random weights, detected by comfy.sd.VAE from its state dict.
- Qwen-Image (1 block), Wan 2.1 T2V (dim 128, 2 blocks), FLUX.2 [dev] (1 + 1 blocks, 2.2 B): the model and the VAE
  are ComfyUI's (Wan 2.1 VAE for Qwen-Image and Wan, small: ComfyUI reads its width; FLUX.2's 32-channel
  batch-norm autoencoder); the text encoder is a stand-in with ComfyUI's CLIP interface (comfyui_inplace_check.py
  `StandInCLIP`: tokenize / encode_from_tokens_scheduled / cond_stage_model; one random embedding per word, so the
  lengths vary by caption), because ComfyUI builds Qwen2.5-VL 7B (3584 wide, with its vision tower), UMT5-XXL
  (4096 wide, 256 k vocabulary) and Mistral 24B (tokenizer in the weights file) at their full size.
FLUX.2 runs only with LORA_TRAIN_REAL_FLUX2=1 (and 16 GB free): its 2.2 B parameters are stored in bf16 (computed in
float32 by ComfyUI's casts) and trained with gradient checkpointing (through the node's kohya_config); about 10
minutes, 11 GB while training, 13-15 GB during the checks (ComfyUI patching its bf16 weights).
Every model file is written the way the releases hold it (single-file original layout for the 2026 families, the
diffusers layout for Flux.1 / SD3.5, which ComfyUI converts) and loaded by comfy.sd.load_diffusion_model_state_dict
(comfy.sd.load_checkpoint_guess_config for SD1.5) under torch.inference_mode(), as ComfyUI's executor runs loaders.
The node trains `steps` steps at batch 2 on 2 demo images (64 px); each case's own memory and time are printed.
Seen here (2 cores, shared): the file in about 6.5 minutes without FLUX.2; Z-Image's case peaks at 9 GB (0.9 B
parameters in float32), the SD1.5 one at 6.7 GB (the verify process; the server holds about 4.5 GB beside it).
"""
import gc
import json
import os
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
COMFY = os.environ.get("COMFYUI_DIR", "")
PY = os.environ.get("COMFYUI_PYTHON") or os.path.join(COMFY, ".venv", "bin", "python")
CHECK = os.path.join(ROOT, "tests", "comfyui_inplace_check.py")
pytestmark = [pytest.mark.skipif(not COMFY, reason="set COMFYUI_DIR to a ComfyUI checkout with its venv to run"),
              pytest.mark.slow]

#: kind -> (ComfyUI's model config, CLIP spec, VAE spec, steps, lr); the model itself: model_file()
CASES = {
    "flux": ("Flux", {"type": "flux", "width": 64, "pooled": 32}, {"type": "ae16"}, 6, 1e-3),
    "sd3": ("SD3", {"type": "sd3", "pooled_l": 64, "pooled_g": 64}, {"type": "ae16"}, 6, 1e-3),
    "chroma": ("Chroma", {"type": "chroma", "width": 64}, {"type": "ae16"}, 6, 1e-3),
    "z_image": ("ZImage", {"type": "z_image", "width": 256}, {"type": "ae16"}, 6, 1e-3),
    "qwen_image": ("QwenImage", {"type": "standin", "width": 3584}, {"type": "wan21", "dim": 16}, 6, 1e-3),
    "wan": ("WAN21_T2V", {"type": "standin", "width": 4096}, {"type": "wan21", "dim": 16}, 8, 2e-3),
    "flux2": ("Flux2", {"type": "standin", "width": 64}, {"type": "ae_flux2"}, 4, 1e-3),
}
#: how ComfyUI stores a case's weights (default float32) and kohya options given through the node's kohya_config:
#: FLUX.2's 2.2 B parameters (ComfyUI fixes its width) in bf16, computed in float32 by ComfyUI's casts, with
#: gradient checkpointing (one block's W + delta at a time), keep its case under 12 GB
DTYPE = {"flux2": "bfloat16"}
KOHYA = {"flux2": {"gradient_checkpointing": True}}
#: GB of free memory (MemAvailable) a case needs; skipped below that
NEEDS_GB = {"flux2": 16, "z_image": 10}
#: cases that run only when asked for (LORA_TRAIN_REAL_<KIND>=1): FLUX.2 [dev] takes about 10 minutes here and
#: peaks at about 13-15 GB (2.2 B parameters: 11 GB while training, ComfyUI's LoRA patching of its bf16 weights after)
OPT_IN = {"flux2"}


def mem_available_gb():
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2 ** 20
    return float("inf")


def model_file(kind, folder):
    """A random model of the family as its files hold it (bf16): original single-file layout for the 2026 families
    (tests/test_families_comfyui_real.py's sizes and builder), diffusers layout for Flux.1 / SD3.5."""
    path = os.path.join(folder, f"{kind}_small_bf16.safetensors")
    if kind in ("flux", "sd3"):
        from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

        torch.manual_seed(0)
        if kind == "flux":
            unet = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                          joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=True)
        else:  # SD3.5 Medium-like; context 4096 (ComfyUI pads CLIP-L + CLIP-G to it), pooled = both projections
            unet = SD3Transformer2DModel(sample_size=32, patch_size=2, in_channels=16, num_layers=2,
                                         attention_head_dim=64, num_attention_heads=2, joint_attention_dim=4096,
                                         caption_projection_dim=128, pooled_projection_dim=128, out_channels=16,
                                         pos_embed_max_size=16, qk_norm="rms_norm", dual_attention_layers=(0,))
        sd = {k: v.to(torch.bfloat16).contiguous() for k, v in unet.state_dict().items()}
    else:
        import test_families_comfyui_real as R
        from single_file_layouts import original_layout

        if kind == "z_image":  # caption width = the small Qwen3's (ComfyUI reads cap_feat_dim from the file)
            R.FAMILIES[kind] = R.FAMILIES[kind][:1] + (dict(n_layers=1, cap_feat_dim=256),) + R.FAMILIES[kind][2:]
        unet = R.small_model(kind)
        sd = original_layout(kind, unet.state_dict())
    params = sum(p.numel() for p in unet.parameters())
    save_file(sd, path)
    del unet, sd
    gc.collect()
    return path, params


def comfy(spec, tmp_path, timeout=1800):
    sp, out = tmp_path / "spec.json", tmp_path / "out.json"
    sp.write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.update(PYTHONPATH=COMFY, OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "2"))
    r = subprocess.run([PY, CHECK, str(sp), str(out)], cwd=COMFY, env=env, capture_output=True, text=True,
                       timeout=timeout)
    print(r.stdout[-5000:], r.stderr[-5000:])
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(out.read_text())


def check(res, config):
    """What every case asserts (comfyui_inplace_check.py's OUT)."""
    assert res["comfyui_version"] == "0.8.0"
    assert res["model_config"] == config and res["load_warnings"] == []
    # the graph's MODEL: the same tensors, the same values, no weight function left, its patcher as it was
    assert res["source_changed"] == [] and res["source_leftover_functions"] == 0 and res["source_patches_same"]
    assert res["source_changed_end"] == []
    # ComfyUI's own loader: every module of the file placed, none left over
    n = res["lora_modules"]
    assert n > 0 and res["not_loaded"] == [] and res["unmapped"] == [] and res["model_patches"] == n
    if res.get("node_applies") is not None:
        assert res["node_applies"] == [n, n]
    # patched = base + alpha / rank * up @ down (elementwise on 3 modules, probes on all)
    assert res["probe_modules"] == n and len(res["exact_modules"]) == 3
    # (a bf16 weight is patched in float32 and stored in bf16: one rounding step of the weight, no more)
    assert res["patched_max_abs_diff"] <= 1e-5 * max(res["delta_scale"], 1.0) + 2 * res["rounding_exact"]
    assert res["probe_max_abs_diff"] <= 1e-4 * max(res["probe_delta_scale"], 1.0) + 2 * res["rounding_probe"]
    # the objective at fixed noise on the training images falls with the LoRA; the sampler's output changes
    assert res["loss_lora"] < res["loss_base"], (res["loss_base"], res["loss_lora"])
    assert res["sample_finite"] and res["sample_repeat_diff"] == 0.0 and res["sample_change"] > 0.0


def summary(kind, res, params, t):
    return (f"{kind}: ComfyUI {res['model_config']} ({res['diffusion_model_class']}, {res['model_sampling']}), "
            f"{params / 1e6:.1f} M parameters stored {res['weight_dtype']}; node loss first {res.get('node_loss_first')} "
            f"last {res.get('node_loss_last')}; ComfyUI applies {res['model_patches']} of {res['lora_modules']} "
            f"modules, {len(res['not_loaded'])} not loaded; |patched - (base + delta)| max {res['patched_max_abs_diff']:.3g} "
            f"(delta {res['delta_scale']:.3g}), probes {res['probe_max_abs_diff']:.3g} "
            f"(delta {res['probe_delta_scale']:.3g}); objective at fixed noise {res['loss_base']:.5g} -> "
            f"{res['loss_lora']:.5g}; sample change {res['sample_change']:.3g} (scale {res['sample_scale']:.3g}); "
            f"train {res['t_train']:.0f} s (checks: weights {res['t_weights']:.0f} s, objective "
            f"{res['t_objective']:.0f} s, sample {res['t_sample']:.0f} s), peak RSS {res['peak_rss_mb']} MB (before training "
            f"{res['rss_before_train_mb']} MB, training peak {res['train_peak_rss_mb']} MB); case {t:.0f} s")


@pytest.mark.parametrize("kind", list(CASES))
def test_train_node_in_place_on_a_real_comfyui_model(kind, tmp_path):
    if kind in OPT_IN and os.environ.get(f"LORA_TRAIN_REAL_{kind.upper()}") != "1":
        pytest.skip(f"{kind}: set LORA_TRAIN_REAL_{kind.upper()}=1 to run it (about 10 minutes, up to 15 GB)")
    if mem_available_gb() < NEEDS_GB.get(kind, 0):
        pytest.skip(f"{kind} needs about {NEEDS_GB[kind]} GB free, {mem_available_gb():.1f} GB available")
    from lora_train.data.demo import write_demo_dataset

    t0 = time.time()
    config, clip, vae, steps, lr = CASES[kind]
    path, params = model_file(kind, str(tmp_path))
    data = write_demo_dataset(str(tmp_path / "data"), n=2, size=64)
    res = comfy({"kind": kind, "model": path, "dtype": DTYPE.get(kind, "float32"), "clip": clip, "vae": vae,
                 "data": data, "base": str(tmp_path / "comfy_base"), "steps": steps, "lr": lr, "rank": 4,
                 "alpha": 2.0, "batch": 2, "kohya": KOHYA.get(kind, {})}, tmp_path)
    print(summary(kind, res, params, time.time() - t0))
    assert res["model_params"] == params
    check(res, config)


# ----------------------------------------------------------------------------- SD1.5 through ComfyUI's /prompt API
# (last in the file: the module-scoped server of tests/test_nodes_comfyui_real.py starts for this test only)
from test_nodes_comfyui_real import error_text, run_prompt, server  # noqa: E402,F401  (server: a pytest fixture)


def _executed(msgs, node):
    return [m["data"]["output"] for m in msgs if m["type"] == "executed" and m["data"]["node"] == node]


def _latents(s, out):
    from safetensors.torch import load_file

    f = out[0]["latents"][0]
    return load_file(os.path.join(s.base, "output", f["subfolder"], f["filename"]))["latent_tensor"].float()


def _sample_prompt(ckpt, prefix, lora=None, strength=0.0):
    """loader (-> LoraLoader) -> text -> 1-step KSampler (cfg 1) -> SaveLatent; the same seed and inputs each time."""
    model, clip = ["1", 0], ["1", 1]
    p = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}}}
    if lora:
        p["2"] = {"class_type": "LoraLoader", "inputs": {"model": model, "clip": clip, "lora_name": lora,
                                                          "strength_model": strength, "strength_clip": strength}}
        model, clip = ["2", 0], ["2", 1]
    p.update({"3": {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": "zq, a red circle"}},
              "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": ""}},
              "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
              "6": {"class_type": "KSampler", "inputs": {"model": model, "seed": 1, "steps": 1, "cfg": 1.0,
                                                        "sampler_name": "euler", "scheduler": "normal",
                                                        "positive": ["3", 0], "negative": ["4", 0],
                                                        "latent_image": ["5", 0], "denoise": 1.0}},
              "7": {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": f"latents/{prefix}"}}})
    return p


def test_sd15_in_place_through_the_prompt_api(server, tmp_path):  # noqa: F811
    """SD1.5, everything real: CheckpointLoaderSimple's MODEL / CLIP / VAE (the random full-size checkpoint, fp16
    weights computed in fp32), Train LoRA with in_place "on" through /prompt; the latents of a KSampler on the
    graph's MODEL are the same before and after the training (LoraLoader at strength 0 passes that MODEL on), and
    differ with the LoRA at strength 1 (0 "lora key not loaded" in ComfyUI's log). Then comfyui_inplace_check.py
    (verify mode) checks the file on the same checkpoint in a fresh ComfyUI process: patched = base + delta, the
    objective at fixed noise falls."""
    from real_hosts import SD15_NAME, http_json

    s = server
    t0 = time.time()
    kind, msgs = run_prompt(s, _sample_prompt(SD15_NAME, "inplace_before"), timeout=600)
    assert kind == "execution_success", error_text(msgs) + s.log()[-3000:]
    before = _latents(s, _executed(msgs, "7"))
    train = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": SD15_NAME}},
             "2": {"class_type": "LoraTrainDatasetFromFolder",
                   "inputs": {"folder": "lora_train_dataset", "trigger_word": "zq", "resolution": 64, "repeats": 1}},
             "3": {"class_type": "LoraTrainTrain", "inputs": dict(
                 model=["1", 0], clip=["1", 1], vae=["1", 2], dataset=["2", 0], lora_name="sd15_inplace",
                 learning_rate=2e-3, rank=4, alpha=4.0, batch_size=2, gradient_accumulation=1, epochs=10,
                 max_steps=3, lr_scheduler="constant", warmup_steps=0, optimizer="AdamW", train_text_encoder=False,
                 training_seed=1, save_every_n_epochs=0, mixed_precision="auto", in_place="on")}}
    t1 = time.time()
    kind, msgs = run_prompt(s, train, timeout=1200)
    assert kind == "execution_success", error_text(msgs) + s.log()[-4000:]
    t_train = time.time() - t1
    report = _executed(msgs, "3")[0]["text"][0]
    print(report)
    m = __import__("re").search(r"ComfyUI applies (\d+) of (\d+) LoRA modules", report)
    assert m and m.group(1) == m.group(2)
    lora = os.path.join(s.base, "models", "loras", "sd15_inplace.safetensors")
    from safetensors import safe_open

    with safe_open(lora, framework="pt") as fh:
        meta = fh.metadata()
    assert meta["ss_trained_in_place"] == "comfyui" and meta["ss_comfyui_model"] == "SD15", meta
    kind, msgs = run_prompt(s, _sample_prompt(SD15_NAME, "inplace_after0", "sd15_inplace.safetensors", 0.0))
    assert kind == "execution_success", error_text(msgs)
    after0 = _latents(s, _executed(msgs, "7"))
    kind, msgs = run_prompt(s, _sample_prompt(SD15_NAME, "inplace_lora", "sd15_inplace.safetensors", 1.0))
    assert kind == "execution_success", error_text(msgs)
    with_lora = _latents(s, _executed(msgs, "7"))
    bad = [ln for ln in s.log().splitlines() if "lora key not loaded" in ln or "NOT LOADED" in ln]
    print(f"sd15 /prompt: train {t_train:.0f} s; latents after training (strength 0) - before: "
          f"{float((after0 - before).abs().max()):.3g}; with the LoRA - before: "
          f"{float((with_lora - before).abs().max()):.3g} (scale {float(before.abs().max()):.3g}); "
          f"'lora key not loaded' lines: {len(bad)}; {time.time() - t0:.0f} s")
    assert torch.equal(after0, before)  # the graph's MODEL as it was
    assert float((with_lora - before).abs().max()) > 0 and not bad
    http_json(s.url + "/free", {"unload_models": True, "free_memory": True})
    data = os.path.join(s.base, "input", "lora_train_dataset")
    ckpt = os.path.join(COMFY, "models", "checkpoints", SD15_NAME)
    res = comfy({"kind": "sd15", "model": ckpt, "dtype": "float32", "clip": {"type": "checkpoint"},
                 "vae": {"type": "checkpoint"}, "data": data, "base": str(tmp_path / "verify"), "lora": lora},
                tmp_path)
    print(summary("sd15 (verify)", res, res["model_params"], time.time() - t0))
    check(res, "SD15")
    assert res["lora_modules"] == int(m.group(2))

"""Run INSIDE a real Forge (its python, cwd = the Forge checkout, PYTHONPATH = it; started by
tests/test_forge_flux_real.py): Forge detects a small Flux-architecture file and loads it with its own loader, and
its own LoRA code applies a Flux LoRA file we wrote.

    python forge_flux_lora_check.py make OUT.safetensors
        A random Flux-architecture transformer in the BFL layout Forge reads (double_blocks / single_blocks):
        Forge's own IntegratedFluxTransformer2DModel with the sizes huggingface_guess assumes for Flux (hidden
        3072, 24 heads, rope 16/56/56, CLIP-L 768 pooled, T5 4096 context, guidance) but 1 double + 1 single block,
        bf16 (~0.5 B parameters). Forge cannot sample it: huggingface_guess fixes depth 19 + 38, so the other
        blocks' Linear layers stay without weights (Forge's operations create them when loading).
    python forge_flux_lora_check.py check SPEC.json OUT.json
        SPEC: {"model": the file from make, "lora": our LoRA file, "expected": .safetensors of the fused deltas
               per kohya module name, in Forge's weight layout (made by the test from our trained weights), "strength": float}
        huggingface_guess.guess detects the file; backend.loader.load_huggingface_component builds the transformer
        as Forge does (its operations, its storage dtype); KModel wraps it; backend.patcher.lora's
        model_lora_keys_unet + load_lora map our file (Forge's "[LORA]" path in networks.py does the same) and
        merge_lora_to_weight merges each patch: unmatched keys, patched keys and |merged - weight - expected|.
OUT: JSON.
"""
import json
import os
import sys

MODE = sys.argv[1]
ARGV = sys.argv[2:]
sys.argv = [sys.argv[0], "--always-cpu"]  # backend.args parses sys.argv at import
import torch  # noqa: E402


def make(out):
    from safetensors.torch import save_file
    from backend.nn.flux import IntegratedFluxTransformer2DModel

    torch.manual_seed(0)
    m = IntegratedFluxTransformer2DModel(in_channels=16, vec_in_dim=768, context_in_dim=4096, hidden_size=3072,
                                         mlp_ratio=4.0, num_heads=24, depth=1, depth_single_blocks=1,
                                         axes_dim=[16, 56, 56], theta=10000, qkv_bias=True, guidance_embed=True)
    sd = {}
    for k, v in m.state_dict().items():
        if v.dim() > 1:  # nn defaults are fine; norms' scales stay 1
            v = torch.randn_like(v) / v[0].numel() ** 0.5
        sd[k] = v.to(torch.bfloat16).contiguous()
    save_file(sd, out)
    print("wrote", out, len(sd), "tensors", sum(v.numel() for v in sd.values()) / 1e9, "B parameters")


def check(spec_path, out_path):
    from safetensors.torch import load_file

    spec = json.load(open(spec_path))
    import huggingface_guess
    from backend import loader
    from backend.modules.k_model import KModel
    from backend.modules.k_prediction import PredictionFlux
    from backend.patcher import lora as forge_lora

    from backend.state_dict import try_filter_state_dict

    sd = loader.preprocess_state_dict(load_file(spec["model"]))  # as split_state_dict: a bare transformer file
    guess = huggingface_guess.guess(sd)
    sd = try_filter_state_dict(sd, guess.unet_key_prefix)
    res = {"guess": type(guess).__name__, "huggingface_repo": guess.huggingface_repo}
    local = os.path.join(os.path.dirname(loader.__file__), "huggingface", guess.huggingface_repo)
    transformer = loader.load_huggingface_component(guess, "transformer", "diffusers", "FluxTransformer2DModel",
                                                    local, sd)
    res["storage_dtype"] = str(transformer.storage_dtype)
    km = KModel(model=transformer, diffusers_scheduler=None, k_predictor=PredictionFlux(mu=1.0), config=guess)
    key_map = forge_lora.model_lora_keys_unet(km, {})
    lora_sd = load_file(spec["lora"])
    patches, remaining = forge_lora.load_lora(lora_sd, key_map)
    res["lora_tensors"] = len(lora_sd)
    res["unmatched"] = sorted(remaining)
    res["patched"] = len(patches)
    expected = load_file(spec["expected"])
    res["expected"] = len(expected)
    weights = dict(km.named_parameters())
    worst, missing, scale = 0.0, [], 0.0
    targets = {}
    for name, exp in expected.items():  # expected: kohya module name -> fused delta (Forge's weight layout)
        key = key_map.get(name)
        targets[name] = key
        if key is None or key not in patches:
            missing.append(name)
            continue
        w = weights[key].detach()
        patch = [(spec["strength"], patches[key], 1.0, None, None)]  # (strength_patch, value, strength_model, ...)
        merged = forge_lora.merge_lora_to_weight(patch, w.clone(), key=key, computation_dtype=torch.float32)
        got = merged.float() - w.float()
        want = spec["strength"] * exp.float()
        worst = max(worst, float((got - want).abs().max()))
        scale = max(scale, float(want.abs().max()))
    res["missing_expected"] = missing
    res["max_abs_diff"] = worst
    res["max_abs_delta"] = scale
    res["targets"] = targets
    res["bf16_eps_weight"] = max(float(weights[k].detach().float().abs().max()) for k in targets.values() if k) * 2 ** -8
    json.dump(res, open(out_path, "w"), indent=1)
    print(json.dumps(res, indent=1)[:3000])


if MODE == "make":
    make(*ARGV)
else:
    check(*ARGV)

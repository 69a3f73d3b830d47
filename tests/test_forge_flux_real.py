"""A Flux LoRA we write, applied by a real Forge's own LoRA code to a Flux model Forge detected and built (run when
FORGE_DIR points at a Forge checkout with its venv; skipped otherwise). The Forge side is
tests/forge_flux_lora_check.py, run with Forge's python ($FORGE_PYTHON, else $FORGE_DIR/venv/bin/python).

A full Flux.1 (12 B) does not fit the test machines, and Forge's Flux detection (repositories/huggingface_guess)
fixes depth 19 + 38 whatever the file holds, so Forge cannot sample a small Flux: this is a script-level check.
Forge makes a random Flux-architecture transformer in its BFL layout (hidden 3072 as Forge's detection assumes,
1 double + 1 single block, bf16); we load that file with our own Flux loader (models/flow_single_file.py, BFL ->
diffusers), train-like random LoRA weights on the split diffusers modules (one part of a fused group with another
rank and alpha), write the kohya file with our exporter (lora.save_kohya, fused BFL names); Forge's
huggingface_guess detects Flux, backend.loader builds the transformer, backend.patcher.lora maps and merges our
file: 0 unmatched keys, every module patched, each patched weight changes by our trained delta x strength.
"""
import json
import os
import subprocess
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

import test_flow_names as T
from lora_train.models.flow_single_file import flux_transformer, read_file
from lora_train.networks import flow_names as F
from lora_train.networks import lora as L

FORGE = os.environ.get("FORGE_DIR", "")
CHECK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "forge_flux_lora_check.py")
pytestmark = [pytest.mark.skipif(not FORGE, reason="set FORGE_DIR to a Forge checkout with its venv to run")]


def _forge(*args, timeout=1800):
    py = os.environ.get("FORGE_PYTHON") or os.path.join(FORGE, "venv", "bin", "python")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # Forge puts packages_3rdparty (gguf) and repositories/huggingface_guess on sys.path at start
    path = [FORGE, os.path.join(FORGE, "packages_3rdparty"), os.path.join(FORGE, "repositories", "huggingface_guess")]
    env.update(PYTHONPATH=os.pathsep.join(path), OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"), HF_HUB_OFFLINE="1")
    r = subprocess.run([py, CHECK, *args], cwd=FORGE, env=env, capture_output=True, text=True, timeout=timeout)
    print(r.stdout[-4000:], r.stderr[-4000:])
    assert r.returncode == 0, r.stderr[-4000:]
    return r.stdout


def test_forge_applies_our_flux_lora(tmp_path):
    model_file = str(tmp_path / "flux_small_bfl.safetensors")
    _forge("make", model_file)
    unet = flux_transformer(read_file(model_file, "Flux transformer")).float().eval()  # our BFL -> diffusers loader
    assert (unet.config.num_layers, unet.config.num_single_layers) == (1, 1)
    model = SimpleNamespace(kind="flux", unet=unet, text_encoder=None, text_encoder_2=None, text_encoder_3=None)
    lw = T.trained_split_lora(model, rank=4, mixed=True)
    lw.modules = {k: (d * 0.05, u * 0.05, a) for k, (d, u, a) in lw.modules.items()}  # training-sized deltas
    lora_file = L.save_kohya(lw, str(tmp_path / "flux_lora.safetensors"), "flux")
    ours = T.deltas(lw)
    expected = {}
    for name, grp in F.unet_groups("flux", unet, extras=False).items():
        expected[name] = torch.cat([ours[("unet", p)] for p in grp.paths]).float().contiguous()
    exp_file = str(tmp_path / "expected.safetensors")
    save_file(expected, exp_file)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"model": model_file, "lora": lora_file, "expected": exp_file, "strength": 0.8}))
    out = tmp_path / "out.json"
    _forge("check", str(spec), str(out))
    res = json.loads(out.read_text())
    print("[forge-flux]", {k: v for k, v in res.items() if k != "targets"})
    assert res["guess"] == "Flux" and res["huggingface_repo"] == "black-forest-labs/FLUX.1-dev"
    assert res["unmatched"] == [] and res["missing_expected"] == []
    assert res["patched"] == res["expected"] == len(expected) == 13
    for name, key in res["targets"].items():  # each module lands on the fused weight it came from
        assert key[:-len(".weight")].replace(".", "_") == "diffusion_model_" + name[len("lora_unet_"):], (name, key)
    # Forge keeps the file's weights in its storage dtype (fp32 on a CPU, bf16 or fp8 on GPUs): the merged weight
    # is rounded to it, at most a bf16 step of the weight's size
    assert res["max_abs_delta"] > 20 * res["bf16_eps_weight"]
    assert res["max_abs_diff"] <= 2 * res["bf16_eps_weight"], res


def test_forge_applies_our_flux_network_types(tmp_path):
    """Issue 17 on Flux in Forge: our LoHa / LoKr / DoRA files (one adapter per module of the file, fused q/k/v)
    merged by Forge's own LoRA code into the fused weights: 0 unmatched, every module patched, each patched weight
    changes by our delta x strength."""
    import test_networks_flow as NF

    model_file = str(tmp_path / "flux_small_bfl.safetensors")
    _forge("make", model_file)
    for typ in ("loha", "lokr", "dora"):
        unet = flux_transformer(read_file(model_file, "Flux transformer")).float().eval()
        model = SimpleNamespace(kind="flux", unet=unet, text_encoder=None, text_encoder_2=None, text_encoder_3=None)
        NF.randomized_network(unet, typ)
        lora_file = L.save_kohya(L.extract(model), str(tmp_path / f"flux_{typ}.safetensors"), "flux")
        parts = NF._part_deltas(unet)
        expected = {name: NF._fused_delta(grp, parts).float().contiguous()
                    for name, grp in F.unet_groups("flux", unet, extras=False).items()}
        exp_file = str(tmp_path / f"expected_{typ}.safetensors")
        save_file(expected, exp_file)
        spec = tmp_path / f"spec_{typ}.json"
        spec.write_text(json.dumps({"model": model_file, "lora": lora_file, "expected": exp_file, "strength": 0.8}))
        out = tmp_path / f"out_{typ}.json"
        _forge("check", str(spec), str(out))
        res = json.loads(out.read_text())
        print(f"[forge-flux {typ}]", {k: v for k, v in res.items() if k != "targets"})
        assert res["unmatched"] == [] and res["missing_expected"] == []
        assert res["patched"] == res["expected"] == len(expected) == 13
        if res["storage_dtype"] == "torch.float32":  # a CPU: merged in fp32, so exact up to float rounding
            assert res["max_abs_delta"] > 0 and res["max_abs_diff"] <= 1e-4 * res["max_abs_delta"], (typ, res)
        else:  # rounded to the storage dtype: at most a bf16 step of the weight
            assert res["max_abs_delta"] > 20 * res["bf16_eps_weight"]
            assert res["max_abs_diff"] <= 2 * res["bf16_eps_weight"], (typ, res)

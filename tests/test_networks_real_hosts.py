"""LoCon / LoHa / LoKr / DoRA files in the real hosts' own LoRA code (issue 17), on the SD1.5 architecture.

Run when COMFYUI_DIR (a ComfyUI checkout; python $COMFYUI_PYTHON or its .venv) and / or A1111_DIR (an AUTOMATIC1111
1.10.1 checkout; python $A1111_PYTHON or its venv) are set; skipped otherwise. No server is started: a subprocess
in the host's python imports the host's own modules and runs them on our files and the SD1.5-architecture random
checkpoint (tests/real_hosts.py):
  ComfyUI  comfy.sd.load_checkpoint_guess_config, comfy.sd.load_lora_for_models (its key map and loaders;
           "lora key not loaded" warnings are counted) and comfy.lora.calculate_weight on the patches the model
           got (what ModelPatcher applies);
  A1111    extensions-builtin/Lora networks.load_network (its key conversion and module types; keys that fail to
           match are read from its DEBUG log) on a layer mapping named as assign_network_names_to_compvis_modules
           names the LDM model, then each module's calc_updown at <lora:name:w>.
Our side: the network of each type on our diffusers model of the same checkpoint, its adapter tensors given
random trained-like values (the zero-started ones too), exported with lora.save_kohya; the delta our model applies
is compared module by module (a sample of attention, ResNet conv 3x3 / 1x1 / linear, down/upsampler layers) at
strength 1.0 and 0.5: relative error <= 1e-4, and 0 unmatched keys in the whole file.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from real_hosts import SD15_NAME, sd15_checkpoint  # noqa: E402

COMFY = os.environ.get("COMFYUI_DIR", "")
A1111 = os.environ.get("A1111_DIR", "")
pytestmark = pytest.mark.skipif(not (COMFY or A1111), reason="set COMFYUI_DIR and/or A1111_DIR to run")

SPECS = {"locon": dict(type="locon", rank=4, alpha=2.0, conv_rank=4, conv_alpha=1.0),
         "loha": dict(type="loha", rank=4, alpha=2.0, conv_rank=4, conv_alpha=4.0),
         "lokr": dict(type="lokr", rank=4, alpha=2.0, conv_rank=4, conv_alpha=4.0, factor=8),
         "lokr_full": dict(type="lokr", rank=4, alpha=4.0, conv_rank=4, conv_alpha=4.0, factor=16, full_matrix=True),
         "dora": dict(type="dora", rank=4, alpha=2.0, conv_rank=4, conv_alpha=2.0)}
SAMPLE = ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
          "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
          "down_blocks.0.attentions.0.proj_in",
          "down_blocks.1.attentions.1.transformer_blocks.0.ff.net.0.proj",
          "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0",
          "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_v",
          "down_blocks.0.resnets.0.conv1", "down_blocks.1.resnets.0.conv_shortcut",
          "down_blocks.2.resnets.1.time_emb_proj", "down_blocks.0.downsamplers.0.conv",
          "mid_block.resnets.1.conv2", "up_blocks.0.resnets.2.conv1", "up_blocks.1.upsamplers.0.conv",
          "up_blocks.3.resnets.2.conv_shortcut"]
STRENGTHS = (1.0, 0.5)


def _ckpt():
    for d in (A1111 and os.path.join(A1111, "models", "Stable-diffusion"), COMFY and os.path.join(COMFY, "models", "checkpoints")):
        if d and os.path.isfile(os.path.join(d, SD15_NAME)):
            return os.path.join(d, SD15_NAME)
    return sd15_checkpoint(os.path.join(A1111 or COMFY, "models", "Stable-diffusion" if A1111 else "checkpoints",
                                        SD15_NAME))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Our files (one per type) and our deltas of the sampled modules at each strength."""
    from lora_train.models.loading import load_base_model
    from lora_train.networks import delta as D
    from lora_train.networks import lora as L
    from lora_train.networks import network as N

    out = tmp_path_factory.mktemp("nets")
    ckpt = _ckpt()
    model = load_base_model(ckpt)
    model.unet.float()
    unet = model.unet
    ours, paths = {}, {}
    g = torch.Generator().manual_seed(7)
    for name, kw in SPECS.items():
        spec = N.NetworkSpec(**kw)
        params = N.inject(unet, "unet", spec, adapter=name)
        with torch.no_grad():  # trained-like values, the zero-started tensors too
            for p in params:
                noise = torch.randn(p.shape, generator=g)
                if name == "dora" and p.dim() >= 2 and p.shape[0] == 1:  # dora_scale: a few % off the base norm
                    p.mul_(1 + 0.05 * noise)
                elif not p.any():
                    p.copy_(noise * (0.01 if name != "loha" else 0.05))
        lw = L.extract(model, name)
        named = dict(unet.named_modules())
        meta = {"ss_base_model_version": "sd_v1", "ss_v2": "False", **N.metadata(spec)}
        paths[name] = L.save_kohya(lw, str(out / f"{name}.safetensors"), "sd1", meta)
        for path in SAMPLE:
            layer = named[path]
            kname = L.kohya_name("unet", path)
            for s in STRENGTHS:
                if hasattr(layer, "lora_A") and name in layer.lora_A:
                    L.set_strength(unet, s, name)
                    d = layer.get_delta_weight(name)
                else:
                    base = getattr(layer, "base_layer", layer)
                    d = [m for p, m in D.modules(unet, name) if p == path][0].delta(D.base_weight(base).float()) * s
                ours[f"{name}|{s:g}|{kname}"] = d.detach().float().contiguous()
        L.set_strength(unet, 1.0, name)
        L.remove_adapter(unet, name)
    save_file(ours, str(out / "ours.safetensors"))
    return {"dir": str(out), "ckpt": ckpt, "paths": paths, "ours": str(out / "ours.safetensors")}


COMFY_SCRIPT = r'''
import json, logging, sys
sys.path.insert(0, sys.argv[1])
job = json.loads(sys.argv[2])
import torch
from safetensors.torch import save_file
import comfy.options
comfy.options.enable_args_parsing()
sys.argv = ["main.py", "--cpu"]  # as `python main.py --cpu`: no GPU needed
import comfy.sd, comfy.lora, comfy.utils
not_loaded = []
class H(logging.Handler):
    def emit(self, r):
        m = r.getMessage()
        if "lora key not loaded" in m or "ERROR lora" in m or m.startswith("ERROR "):
            not_loaded.append(m)
logging.getLogger().addHandler(H())
model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(job["ckpt"], output_vae=False, output_clip=True)
key_map = comfy.lora.model_lora_keys_unet(model.model, {})
sd = model.model.state_dict()
out, report = {}, {}
for name, path in job["paths"].items():
    lora = comfy.utils.load_torch_file(path, safe_load=True)
    for s in job["strengths"]:
        n0 = len(not_loaded)
        m2, c2 = comfy.sd.load_lora_for_models(model, clip, lora, s, s)
        report[f"{name}|{s:g}"] = {"not_loaded": not_loaded[n0:], "patched": len(m2.patches)}
        for kname in job["sample"]:
            key = key_map[kname]
            w = sd[key].float().clone()
            new = comfy.lora.calculate_weight(m2.patches[key], w.clone(), key)
            out[f"{name}|{s:g}|{kname}"] = (new - w).contiguous()
save_file(out, job["out"])
print("REPORT" + json.dumps(report))
'''

A1111_SCRIPT = r'''
import json, logging, os, sys
webui = sys.argv[1]
job = json.loads(sys.argv[2])
os.chdir(webui)
# as the WebUI runs on a CPU (--no-half --precision full); with fp16 (a GPU's default) it rounds the LoRA tensors
# to fp16 itself (devices.dtype in network_lora.create_module), whoever made the file
sys.argv = ["webui.py", "--skip-torch-cuda-test", "--no-half", "--precision", "full", "--data-dir", job["data"]]
sys.path[:0] = [webui, os.path.join(webui, "extensions-builtin", "Lora")]
import modules.paths
from modules import shared_init
shared_init.initialize()
import torch
from types import SimpleNamespace
from safetensors import safe_open
from safetensors.torch import save_file
from modules import shared
import network, networks
failed = []
class H(logging.Handler):
    def emit(self, r):
        m = r.getMessage()
        if "didn't match keys" in m:
            failed.append(m)
logging.getLogger().addHandler(H())
logging.getLogger().setLevel(logging.DEBUG)
# the layer mapping assign_network_names_to_compvis_modules makes: LDM module path with _ -> module
mapping = {}
with safe_open(job["ckpt"], "pt") as fh:
    for k in fh.keys():
        if not k.startswith("model.diffusion_model.") or not k.endswith(".weight"):
            continue
        w = fh.get_tensor(k).float()
        path = k[len("model."):-len(".weight")]
        if w.dim() == 2:
            mod = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
        elif w.dim() == 4:
            kh = w.shape[2]
            mod = torch.nn.Conv2d(w.shape[1], w.shape[0], kh, stride=2 if path.endswith(".op") else 1,
                                  padding=kh // 2, bias=False)
        else:
            continue
        with torch.no_grad():
            mod.weight.copy_(w)
        mapping[path.replace(".", "_")] = mod
shared.sd_model = SimpleNamespace(network_layer_mapping=mapping, is_sdxl=False)
out, report = {}, {}
for name, path in job["paths"].items():
    n0 = len(failed)
    nod = network.NetworkOnDisk(name, path)
    net = networks.load_network(name, nod)
    groups = {k.split(".")[0] for k in safe_open(path, "pt").keys()}
    for s in job["strengths"]:
        net.unet_multiplier = s
        net.te_multiplier = s
        for kname in job["sample"]:
            key = networks.convert_diffusers_name_to_compvis(kname, False)
            mod = net.modules[key]
            updown, _ = mod.calc_updown(mapping[key].weight)
            out[f"{name}|{s:g}|{kname}"] = updown.float().reshape(mapping[key].weight.shape).contiguous()
    report[name] = {"failed": failed[n0:], "modules": len(net.modules), "groups": len(groups),
                    "types": sorted({type(m).__name__ for m in net.modules.values()}), "version": nod.sd_version.name}
save_file(out, job["out"])
print("REPORT" + json.dumps(report))
'''


def _run(py, script, cwd, job, timeout=1800):
    r = subprocess.run([py, "-c", script, cwd, json.dumps(job)], cwd=cwd, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    line = [x for x in r.stdout.splitlines() if x.startswith("REPORT")][-1]
    return json.loads(line[len("REPORT"):])


def _compare(ours_path, host_path, host):
    ours, theirs = load_file(ours_path), load_file(host_path)
    assert ours.keys() == theirs.keys()
    worst = {}
    for k, d in ours.items():
        rel = float((theirs[k].reshape(d.shape) - d).norm() / d.norm())
        t = k.split("|")[0]
        worst[t] = max(worst.get(t, 0.0), rel)
    print(host, "worst relative error per type:", json.dumps(worst))
    assert max(worst.values()) <= 1e-4, worst


def _sample_names():
    from lora_train.networks import lora as L

    return [L.kohya_name("unet", p) for p in SAMPLE]


@pytest.mark.skipif(not COMFY, reason="set COMFYUI_DIR")
def test_real_comfyui_applies_every_type_exactly(files):
    py = os.environ.get("COMFYUI_PYTHON") or os.path.join(COMFY, ".venv", "bin", "python")
    job = {"ckpt": files["ckpt"], "paths": files["paths"], "strengths": list(STRENGTHS), "sample": _sample_names(),
           "out": os.path.join(files["dir"], "comfy.safetensors")}
    report = _run(py, COMFY_SCRIPT, COMFY, job)
    print("ComfyUI:", json.dumps({k: {"not_loaded": len(v["not_loaded"]), "patched": v["patched"]}
                                  for k, v in report.items()}))
    for k, v in report.items():
        assert v["not_loaded"] == [], (k, v["not_loaded"][:3])
        name = k.split("|")[0]
        groups = {x.split(".")[0] for x in load_file(files["paths"][name])}
        assert v["patched"] == len(groups), (k, v["patched"], len(groups))
    _compare(files["ours"], job["out"], "ComfyUI")


@pytest.mark.skipif(not A1111, reason="set A1111_DIR")
def test_real_a1111_applies_every_type_exactly(files, tmp_path):
    py = os.environ.get("A1111_PYTHON") or os.path.join(A1111, "venv", "bin", "python")
    job = {"ckpt": files["ckpt"], "paths": files["paths"], "strengths": list(STRENGTHS), "sample": _sample_names(),
           "out": os.path.join(files["dir"], "a1111.safetensors"), "data": str(tmp_path / "data")}
    report = _run(py, A1111_SCRIPT, A1111, job)
    print("A1111:", json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "failed"} | {"failed": len(v["failed"])}
                                for k, v in report.items()}))
    expected_types = {"locon": "NetworkModuleLora", "loha": "NetworkModuleHada", "lokr": "NetworkModuleLokr",
                      "lokr_full": "NetworkModuleLokr", "dora": "NetworkModuleLora"}
    for name, v in report.items():
        assert v["failed"] == [] and v["modules"] == v["groups"], (name, v)
        assert v["types"] == [expected_types[name]] and v["version"] == "SD1"
    _compare(files["ours"], job["out"], "A1111")

"""What the real-host tests share (tests/test_*_real.py): ports, JSON over HTTP, headless Chromium's flags, and
the cached random-weight SD1.5 checkpoint every real host loads. Uses only the standard library at import."""
import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM = os.environ.get("LORA_TRAIN_CHROMIUM", "/usr/bin/chromium")
#: headless Chromium on these machines: no sandbox as root, no GPU, no calls out
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
SD15_NAME = "lora_train_sd15_random_fp16.safetensors"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url, data=None, timeout=60):
    """GET (or POST `data` as JSON) and the decoded JSON answer; an HTTP error fails the test with its body."""
    body = json.dumps(data).encode() if data is not None else None
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"} if body else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
    except urllib.error.HTTPError as e:
        raise AssertionError(f"{url}: HTTP {e.code}: {e.read().decode(errors='replace')[:2000]}") from None
    return json.loads(raw) if raw else None


def sd15_checkpoint(path):
    """SD1.5 architecture with random weights, original layout, fp16 (ComfyUI detects it as SD15)."""
    if os.path.isfile(path):
        return path
    code = f"""
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel
from lora_train.models.single_file import bundled_config_dir, clip_tokenizer
from ldm_writers import write_original_checkpoint
from lora_train.models.base import BaseModel
import os
d = bundled_config_dir("sd15")
torch.manual_seed(0)
unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(os.path.join(d, "unet")))
vae = AutoencoderKL.from_config(AutoencoderKL.load_config(os.path.join(d, "vae")))
te = CLIPTextModel(CLIPTextConfig.from_pretrained(os.path.join(d, "text_encoder"), local_files_only=True))
sched = DDPMScheduler.from_config(DDPMScheduler.load_config(os.path.join(d, "scheduler")))
m = BaseModel(unet=unet, vae=vae, text_encoder=te, tokenizer=clip_tokenizer(), noise_scheduler=sched, kind="sd1",
              name="sd15_random")
write_original_checkpoint(m, {path!r}, dtype=torch.float16)
print("wrote", {path!r})
"""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.path.join(ROOT, "tests")),
                   timeout=1800)
    return path
SDXL_NAME = "lora_train_sdxl_random_fp16.safetensors"


def sdxl_checkpoint(path):
    """SDXL base architecture (2.6 B UNet, CLIP-L + OpenCLIP-bigG) with random weights, original layout, fp16
    (6.9 GB). Built in fp16 and written tensor by tensor, so it needs ~7 GB of memory, not the ~14 GB of fp32."""
    if os.path.isfile(path):
        return path
    code = f"""
import json, math, os, struct
import torch
from lora_train.models.single_file import meta_model
from ldm_writers import to_original_state_dict
m = meta_model("sdxl_base")
g = torch.Generator().manual_seed(0)
for mod in (m.unet, m.vae, m.text_encoder, m.text_encoder_2):
    mod.to_empty(device="cpu")
    mod.to(torch.float16)
    with torch.no_grad():
        for n, p in mod.named_parameters():
            if p.dim() > 1:  # variance-keeping random weights (fan-in), so activations stay finite in fp16
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
            elif n.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()
        for n, b in mod.named_buffers():  # position ids etc. come from the config, not random
            if n.endswith("position_ids"):
                b.copy_(torch.arange(b.shape[-1]).expand_as(b))
sd = to_original_state_dict(m)
names = {{torch.float16: "F16", torch.float32: "F32", torch.int64: "I64", torch.bfloat16: "BF16"}}
header, off = {{"__metadata__": {{"format": "pt"}}}}, 0
for k, v in sd.items():
    n = v.numel() * v.element_size()
    header[k] = {{"dtype": names[v.dtype], "shape": list(v.shape), "data_offsets": [off, off + n]}}
    off += n
hb = json.dumps(header).encode()
hb += b" " * (-len(hb) % 8)
tmp = {path!r} + ".tmp"
with open(tmp, "wb") as fh:  # the safetensors layout, one tensor at a time (no second copy in memory)
    fh.write(struct.pack("<Q", len(hb)))
    fh.write(hb)
    for k, v in sd.items():
        fh.write(v.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
os.replace(tmp, {path!r})
print("wrote", {path!r}, len(sd), "tensors")
"""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.path.join(ROOT, "tests")),
                   timeout=3600)
    return path

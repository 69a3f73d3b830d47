"""The nodes inside a real ComfyUI (run when COMFYUI_DIR points at a ComfyUI checkout; skipped otherwise).

Seen with ComfyUI 0.8.0 (`fetch pollockjj/ComfyUI`) and a venv beside it (torch 2.14.1, torchvision 0.29.1, its
requirements.txt, and ours). The python is $COMFYUI_PYTHON, else $COMFYUI_DIR/.venv/bin/python. ComfyUI runs
headless on the CPU in a temporary --base-directory (our repo symlinked into its custom_nodes/), so nothing is
written into the checkout except the cached random-weight SD1.5 checkpoint (models/checkpoints/, made once).

What it checks, through ComfyUI's own HTTP/websocket API:
  /object_info lists our seven nodes; the example workflow, converted with the real node definitions, runs
  through /prompt (train + sweep) with progress events over the websocket; /interrupt stops a training with a
  saved file; ComfyUI's own LoraLoader + KSampler apply our file with no "lora key not loaded" in the log.
Set LORA_TRAIN_REAL_KEEP=1 to keep the base directory and log for inspection.
"""
import base64
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import uuid

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMFY = os.environ.get("COMFYUI_DIR", "")
sys.path.insert(0, os.path.join(ROOT, "tests"))
from real_hosts import SD15_NAME  # noqa: E402  (shared by the real-host tests)
from real_hosts import free_port as _free_port, http_json as _http, sd15_checkpoint as _sd15_checkpoint  # noqa: E402
import comfy_workflow  # noqa: E402

pytestmark = [pytest.mark.frontend,
              pytest.mark.skipif(not COMFY, reason="set COMFYUI_DIR to a ComfyUI checkout with its venv to run")]
OURS = ("LoraTrainDatasetFromFolder", "LoraTrainCaptionDataset", "LoraTrainSuggestSettings", "LoraTrainTrain",
        "LoraTrainApplyLora", "LoraTrainPromptWithTags", "LoraTrainStrengthSweep")


def say(*a):
    print("[real-comfyui]", *a, flush=True)


# ----------------------------------------------------------------------------- minimal websocket client
class WS:
    """Enough of RFC 6455 for ComfyUI's /ws: client handshake, unmasked server frames, text/binary/ping/close."""

    def __init__(self, host, port, path):
        self.sock = socket.create_connection((host, port), timeout=30)
        key = base64.b64encode(os.urandom(16)).decode()
        req = (f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
        self.sock.sendall(req.encode())
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("websocket handshake failed")
            buf += chunk
        head, self.buf = buf.split(b"\r\n\r\n", 1)
        assert b" 101 " in head.split(b"\r\n")[0], head

    def _read(self, n):
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("websocket closed")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def _send(self, opcode, payload=b""):
        mask = os.urandom(4)
        hdr = bytes([0x80 | opcode, 0x80 | len(payload)]) + mask
        self.sock.sendall(hdr + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def recv(self, timeout):
        """Next text message as JSON (binary preview frames skipped); None on timeout."""
        self.sock.settimeout(timeout)
        try:
            while True:
                b0, b1 = self._read(2)
                n = b1 & 0x7F
                if n == 126:
                    n = struct.unpack(">H", self._read(2))[0]
                elif n == 127:
                    n = struct.unpack(">Q", self._read(8))[0]
                data = self._read(n)
                op = b0 & 0x0F
                if op == 1:
                    return json.loads(data.decode())
                if op == 9:
                    self._send(10, data)
                if op == 8:
                    raise ConnectionError("websocket closed by server")
        except socket.timeout:
            return None

    def close(self):
        try:
            self._send(8)
        except OSError:
            pass
        self.sock.close()


# ----------------------------------------------------------------------------- server
@pytest.fixture(scope="module")
def server():
    py = os.environ.get("COMFYUI_PYTHON") or os.path.join(COMFY, ".venv", "bin", "python")
    assert os.path.isfile(os.path.join(COMFY, "main.py")), f"{COMFY} is not a ComfyUI checkout"
    assert os.path.isfile(py), f"no python for ComfyUI at {py}: set COMFYUI_PYTHON"
    t0 = time.time()
    ckpt = _sd15_checkpoint(os.path.join(COMFY, "models", "checkpoints", SD15_NAME))
    say(f"SD1.5-architecture random checkpoint: {ckpt} ({os.path.getsize(ckpt) / 1e9:.2f} GB, {time.time() - t0:.0f} s)")
    base = tempfile.mkdtemp(prefix="comfy_base_")
    for d in ("custom_nodes", "models/checkpoints", "models/loras", "input", "output", "temp", "user"):
        os.makedirs(os.path.join(base, d), exist_ok=True)
    os.symlink(ROOT, os.path.join(base, "custom_nodes", "lora_train"))
    os.symlink(ckpt, os.path.join(base, "models", "checkpoints", SD15_NAME))
    from ldm_writers import write_original_checkpoint
    from lora_train.data.demo import write_demo_dataset
    from lora_train.models.tiny import build_tiny

    write_original_checkpoint(build_tiny(), os.path.join(base, "models", "checkpoints", "lora_train_tiny.safetensors"))
    write_demo_dataset(os.path.join(base, "input", "lora_train_dataset"), n=2, size=64)
    port = _free_port()
    log_path = os.path.join(base, "comfyui.log")
    log = open(log_path, "w")
    # fp16 weights (computed in fp32 by ComfyUI's manual cast on the CPU), as on most GPUs; halves the RAM
    extra = os.environ.get("COMFYUI_ARGS", "--fp16-unet --fp16-vae --fp16-text-enc").split()
    cmd = [py, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--base-directory", base] + extra
    say("starting:", " ".join(cmd))
    proc = subprocess.Popen(cmd, cwd=COMFY, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    t0 = time.time()
    while True:
        if proc.poll() is not None:
            log.close()
            raise AssertionError("ComfyUI exited at start:\n" + open(log_path).read()[-5000:])
        try:
            _http(url + "/system_stats", timeout=5)
            break
        except Exception:  # noqa: BLE001 - not up yet
            if time.time() - t0 > 900:
                proc.kill()
                raise AssertionError("ComfyUI did not start in 900 s:\n" + open(log_path).read()[-5000:])
            time.sleep(2)
    say(f"ComfyUI up on port {port} after {time.time() - t0:.0f} s")

    class Srv:
        pass

    s = Srv()
    s.url, s.port, s.base, s.log_path, s.proc = url, port, base, log_path, proc
    s.log = lambda: open(log_path, encoding="utf-8", errors="replace").read()
    yield s
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()
    if os.environ.get("LORA_TRAIN_REAL_KEEP"):
        say("kept", base)
    else:
        shutil.rmtree(base, ignore_errors=True)


def run_prompt(s, prompt, timeout=1800, on_message=None):
    """POST a prompt and follow its websocket messages until it ends; returns (final message type, messages)."""
    cid = uuid.uuid4().hex
    ws = WS("127.0.0.1", s.port, f"/ws?clientId={cid}")
    try:
        r = _http(s.url + "/prompt", {"prompt": prompt, "client_id": cid})
        pid = r["prompt_id"]
        msgs, t0 = [], time.time()
        while time.time() - t0 < timeout:
            m = ws.recv(timeout=10)
            if m is None:
                continue
            d = m.get("data") or {}
            if d.get("prompt_id") not in (None, pid):
                continue
            msgs.append(m)
            if on_message:
                on_message(m)
            if m["type"] in ("execution_success", "execution_error", "execution_interrupted"):
                return m["type"], msgs
        raise AssertionError(f"prompt did not finish in {timeout} s")
    finally:
        ws.close()


def progress_of(msgs, node):
    return [(m["data"]["value"], m["data"]["max"]) for m in msgs if m["type"] == "progress" and m["data"].get("node") == node]


def error_text(msgs):
    return "; ".join(f"{m['data'].get('exception_type')}: {m['data'].get('exception_message')}"
                     for m in msgs if m["type"] == "execution_error")


def test_real_comfyui_train_sweep_interrupt_and_loader(server):
    from safetensors import safe_open

    s = server
    info = _http(s.url + "/object_info", timeout=120)
    for k in OURS:
        assert k in info, f"{k} missing from /object_info"
        assert info[k]["category"] == "LoRA Train" and "unavailable" not in info[k]["display_name"], info[k]
    say("/object_info:", ", ".join(f"{k} ({info[k]['display_name']})" for k in OURS))
    assert "lora_train: " not in s.log(), s.log()[-3000:]

    # 1. the tiny demo model: can ComfyUI's own loader take it?
    tiny = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "lora_train_tiny.safetensors"}},
            "2": {"class_type": "LoraTrainDatasetFromFolder",
                  "inputs": {"folder": "lora_train_dataset", "trigger_word": "zq", "resolution": 64, "repeats": 1}},
            "3": {"class_type": "LoraTrainTrain", "inputs": dict(
                model=["1", 0], clip=["1", 1], vae=["1", 2], dataset=["2", 0], lora_name="tiny_try", learning_rate=1e-3,
                rank=4, alpha=4.0, batch_size=1, gradient_accumulation=1, epochs=1, max_steps=1, lr_scheduler="constant",
                warmup_steps=0, optimizer="AdamW", train_text_encoder=False, training_seed=1, save_every_n_epochs=0,
                mixed_precision="auto")}}
    kind, msgs = run_prompt(s, tiny, timeout=600)
    say(f"tiny model through CheckpointLoaderSimple: {kind} {error_text(msgs)[:300]}")

    # 2. the example workflow, converted with the real node definitions, made small for the CPU
    with open(os.path.join(ROOT, "example_workflows", "train_and_sweep.json"), encoding="utf-8") as fh:
        wf = json.load(fh)
    defs = {k: {"input": v["input"], "output": v["output"]} for k, v in info.items()}
    defs["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0] = [SD15_NAME]  # any list: the value is ours
    api = comfy_workflow.to_api(wf, defs)
    by = {v["class_type"]: k for k, v in api.items()}
    api[by["CheckpointLoaderSimple"]]["inputs"]["ckpt_name"] = SD15_NAME
    api[by["LoraTrainDatasetFromFolder"]]["inputs"].update(resolution=64)
    tr = api[by["LoraTrainTrain"]]["inputs"]
    tr.update(lora_name="real_lora", learning_rate=1e-4, rank=4, alpha=4.0, batch_size=1, gradient_accumulation=1,
              epochs=1, max_steps=2, warmup_steps=0, lr_scheduler="constant", train_text_encoder=True,
              save_every_n_epochs=0)
    api[by["LoraTrainStrengthSweep"]]["inputs"].update(strengths="1.0", seeds="1", steps=2, width=64, height=64,
                                                       epochs_axis=False)
    t0 = time.time()
    kind, msgs = run_prompt(s, api)
    assert kind == "execution_success", error_text(msgs) + s.log()[-4000:]
    train_id = by["LoraTrainTrain"]
    prog = progress_of(msgs, train_id)
    say(f"train+sweep graph: {kind} in {time.time() - t0:.0f} s; progress events of Train LoRA: {prog}")
    assert prog and prog[-1] == (2, 2)
    lora = os.path.join(s.base, "models", "loras", "real_lora.safetensors")
    assert os.path.isfile(lora)
    with safe_open(lora, framework="pt") as fh:
        keys, meta = list(fh.keys()), fh.metadata()
    say(f"saved {lora}: {len(keys)} tensors, ss_steps={meta.get('ss_steps')}, "
        f"unet modules {sum(k.startswith('lora_unet_') and k.endswith('.alpha') for k in keys)}, "
        f"te modules {sum(k.startswith('lora_te_') and k.endswith('.alpha') for k in keys)}")
    saved = [m["data"]["output"] for m in msgs if m["type"] == "executed" and m["data"]["node"] == by["SaveImage"]]
    assert saved and saved[0]["images"], msgs
    grid_file = os.path.join(s.base, "output", saved[0]["images"][0]["filename"])
    from PIL import Image

    with Image.open(grid_file) as im:
        say(f"sweep grid: {grid_file} {im.size}")

    # 2b. queued again unchanged: ComfyUI's cache answers, nothing is retrained (no new real_lora_v2)
    t0 = time.time()
    kind, msgs = run_prompt(s, api)
    cached = [m["data"].get("nodes") for m in msgs if m["type"] == "execution_cached"]
    say(f"same graph queued again: {kind} in {time.time() - t0:.1f} s, cached nodes {cached}, "
        f"Train progress events {progress_of(msgs, train_id)}")
    assert kind == "execution_success" and not progress_of(msgs, train_id)
    assert not os.path.exists(os.path.join(s.base, "models", "loras", "real_lora_v2.safetensors"))

    # 3. /interrupt during training: stops, keeps a file
    long = json.loads(json.dumps(api))
    long[by["LoraTrainTrain"]]["inputs"].update(lora_name="interrupted", max_steps=200, train_text_encoder=False)
    sent = []

    def interrupt_after_first_step(m):
        if m["type"] == "progress" and m["data"].get("node") == train_id and m["data"]["value"] >= 1 and not sent:
            _http(s.url + "/interrupt", {})
            sent.append(time.time())

    kind, msgs = run_prompt(s, long, on_message=interrupt_after_first_step)
    stopped = os.path.join(s.base, "models", "loras", "interrupted.safetensors")
    assert sent and kind == "execution_interrupted", (kind, error_text(msgs))
    assert os.path.isfile(stopped)
    with safe_open(stopped, framework="pt") as fh:
        steps = int(fh.metadata()["ss_steps"])
    say(f"/interrupt after step 1: {kind}; saved {stopped} with ss_steps={steps} (of 200)")
    assert 1 <= steps < 200

    # 4. ComfyUI's own LoraLoader + KSampler with our file
    loader = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": SD15_NAME}},
              "2": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1],
                                                          "lora_name": "real_lora.safetensors",
                                                          "strength_model": 1.0, "strength_clip": 1.0}},
              "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1], "text": "zq, a house"}},
              "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1], "text": ""}},
              "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
              "6": {"class_type": "KSampler", "inputs": {"model": ["2", 0], "seed": 1, "steps": 1, "cfg": 5.0,
                                                        "sampler_name": "euler", "scheduler": "normal",
                                                        "positive": ["3", 0], "negative": ["4", 0],
                                                        "latent_image": ["5", 0], "denoise": 1.0}},
              "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
              "8": {"class_type": "PreviewImage", "inputs": {"images": ["7", 0]}}}
    kind, msgs = run_prompt(s, loader)
    log = s.log()
    bad = [ln for ln in log.splitlines() if "lora key not loaded" in ln or "NOT LOADED" in ln]
    say(f"LoraLoader + KSampler with real_lora.safetensors: {kind}; 'lora key not loaded' lines in the log: {len(bad)}")
    assert kind == "execution_success", error_text(msgs)
    assert not bad, bad[:10]

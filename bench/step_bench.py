"""Step benchmark: our Trainer's training step against a minimal reference loop, in one process.

For a model size (`tiny`, `tiny-sdxl`: the demo models; `sd15` / `sdxl`: full-size UNets with random weights
built from the real diffusers configs in lora_train/configs), a resolution, batch, precision, gradient
checkpointing, attention backend and optimizer, it measures two things on the same device, in this process,
one after the other:

  ours       the real `lora_train.training.trainer.Trainer` on a small synthetic dataset (written to a temp folder,
             latents and text embeddings cached by the Trainer before the loop, as in real use). Only the
             steady-state steps count: the time from the "step" event of the last warm-up step to the "step"
             event of the last step (on CUDA with a synchronize at both ends), divided by the steps between.
  reference  the floor: a bare diffusers UNet with a peft LoRA on the same targets and rank, AdamW, gradient
             clipping as configured, forward / backward / step on fixed tensors; no data loading, no events.

and reports seconds/step, images/s, peak RSS (of the steady-state steps; Linux `clear_refs` resets the
high-water mark) and peak VRAM (CUDA: torch.cuda.max_memory_allocated over the steady-state steps, and over
the whole run for ours), plus the ratios ours / reference (`ratio_step_time`, `ratio_images_per_s`,
`ratio_peak_rss`, `ratio_peak_vram`). The process CPU time per step (`cpu_s_per_step`, `ratio_cpu_time`) is
also reported: on a shared CPU it is steadier than wall time (use --threads 1 there). With --repeats R both are
measured R times, alternating, and the best (lowest seconds/step) of each is kept.

    python bench/step_bench.py --smoke --json out.json                  # tiny model, 3 steps, CPU is fine
    python bench/step_bench.py --model tiny --batch 4 --steps 30 --repeats 3
    python bench/step_bench.py --model sd15 --resolution 512 --precision bf16 --device cuda
    python bench/step_bench.py --model sd15 --batch 1 --precision fp16 --gradient-checkpointing --device cuda
    python bench/step_bench.py --model sdxl --resolution 1024 --precision bf16 --gradient-checkpointing \\
        --optimizer AdamW8bit --device cuda

For sd15 / sdxl the VAE is a cheap stand-in (8x average pool + 1x1 conv: the latents are cached before the
loop, so the VAE never runs inside a step) unless --vae real; the text encoders are the real architectures
with random weights. Nothing is downloaded.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import math
import os
import platform
import re
import resource
import statistics
import sys
import tempfile
import time
import warnings
from types import SimpleNamespace
from typing import Any, Dict, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

SIZES = {"tiny": ("tiny", 64), "tiny-sdxl": ("tiny-sdxl", 64), "sd15": ("sd15", 512), "sdxl": ("sdxl_base", 1024)}
REF_ADAPTER = "bench_ref"
MODEL_SEED = 1234


# ----------------------------------------------------------------------------- memory
def _vm_kb(field_name: str) -> Optional[float]:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            m = re.search(rf"{field_name}:\s+(\d+) kB", fh.read())
        return float(m.group(1)) if m else None
    except OSError:
        return None


def reset_peak_rss() -> bool:
    """Release freed heap to the OS and reset the peak-RSS high-water mark (Linux >= 4.0)."""
    gc.collect()
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    kb = _vm_kb("VmHWM")
    if kb is not None:
        return kb / 1024
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # whole-process peak (no reset possible)
    return kb / (1024 * 1024) if sys.platform == "darwin" else kb / 1024


def cuda_sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_vram(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_vram_mb(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2 ** 20


class SyncCounter:
    """Host-device synchronisations between start() and stop(), counted with
    torch.cuda.set_sync_debug_mode("warn") (CUDA only; `count` stays None elsewhere or when off)."""

    def __init__(self, device: torch.device, enabled: bool):
        self.on = bool(enabled) and device.type == "cuda"
        self.count: Optional[int] = None
        self._cm: Any = None
        self._rec: List[Any] = []

    def start(self) -> None:
        if not self.on:
            return
        self._cm = warnings.catch_warnings(record=True)
        self._rec = self._cm.__enter__()
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")

    def stop(self) -> None:
        if not self.on or self._cm is None:
            return
        torch.cuda.set_sync_debug_mode("default")
        self._cm.__exit__(None, None, None)
        self._cm = None
        self.count = sum(1 for w in self._rec if "synchroniz" in str(w.message).lower())


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- models
class PoolVAE(torch.nn.Module):
    """Stand-in VAE for the full-size benchmarks: 8x average pool + 1x1 conv to 4 latent channels. Only used
    to cache the latents before the loop (the VAE never runs inside a training step)."""

    def __init__(self, channels: int = 4):
        super().__init__()
        self.proj = torch.nn.Conv2d(3, channels, 1)
        self.config = SimpleNamespace(scaling_factor=1.0, latent_channels=channels, block_out_channels=(1, 1, 1, 1))

    @property
    def dtype(self) -> torch.dtype:
        return self.proj.weight.dtype

    def encode(self, px: torch.Tensor):
        lat = self.proj(F.avg_pool2d(px, 8))
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=lat, sample=lambda generator=None: lat))


def build_unet(size: str):
    """A fresh UNet of the size, random weights from MODEL_SEED (identical every call), fp32 on the CPU."""
    from diffusers import UNet2DConditionModel

    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(MODEL_SEED)
        if size == "tiny":
            from lora_train.models.tiny import TINY_UNET

            unet = UNet2DConditionModel(**TINY_UNET)
        elif size == "tiny-sdxl":
            from lora_train.models.tiny import TINY_SEED
            from lora_train.models.tiny import TINY_SDXL_UNET

            torch.manual_seed(TINY_SEED + 200)  # the seed build_tiny_sdxl uses
            unet = UNet2DConditionModel(**TINY_SDXL_UNET)
        else:
            from lora_train.models.single_file import bundled_config_dir

            cfg = UNet2DConditionModel.load_config(os.path.join(bundled_config_dir(SIZES[size][0]), "unet"))
            unet = UNet2DConditionModel.from_config(cfg)
    finally:
        torch.random.set_rng_state(state)
    unet.eval().requires_grad_(False)
    return unet


def build_base_model(size: str, vae_mode: str):
    """The BaseModel our Trainer gets: the tiny demo model, or full-size parts with random weights."""
    if size == "tiny":
        from lora_train.models.tiny import build_tiny

        return build_tiny()
    if size == "tiny-sdxl":
        from lora_train.models.tiny import build_tiny_sdxl

        return build_tiny_sdxl()
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from lora_train.models.single_file import meta_model

    meta = meta_model(SIZES[size][0])  # configs, tokenizers and scheduler; weights on the meta device
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(MODEL_SEED + 1)
        te = CLIPTextModel(meta.text_encoder.config)
        te2 = CLIPTextModelWithProjection(meta.text_encoder_2.config) if meta.text_encoder_2 is not None else None
        if vae_mode == "real":
            from diffusers import AutoencoderKL

            vae = AutoencoderKL.from_config(meta.vae.config)
        else:
            vae = PoolVAE(meta.vae.config.latent_channels)
    finally:
        torch.random.set_rng_state(state)
    for m in (te, te2, vae):
        if m is not None:
            m.eval().requires_grad_(False)
    meta.unet, meta.text_encoder, meta.text_encoder_2, meta.vae = build_unet(size), te, te2, vae
    meta.name = f"bench-{size}"
    return meta


def latent_factor(size: str) -> int:
    """Pixels per latent pixel: 8 for the SD VAEs, 4 for the tiny demo VAE (three blocks)."""
    if size in ("tiny", "tiny-sdxl"):
        from lora_train.models.tiny import TINY_VAE

        return 2 ** (len(TINY_VAE["block_out_channels"]) - 1)
    return 8


def set_attention(unet, backend: str) -> None:
    if backend == "xformers":
        unet.enable_xformers_memory_efficient_attention()
    elif backend in ("sdpa", "math"):
        from diffusers.models.attention_processor import AttnProcessor2_0

        unet.set_attn_processor(AttnProcessor2_0())
    else:
        raise ValueError(f"attention backend {backend!r}: use sdpa, math or xformers")


def attention_context(backend: str):
    """`math`: SDPA restricted to its plain math kernel (what runs where no fused kernel applies)."""
    if backend != "math":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def added_cond(unet_config, batch: int, resolution: int, device, dtype) -> Optional[Dict[str, torch.Tensor]]:
    """SDXL's extra conditioning (pooled text embeds + 6 micro-conditioning numbers), None for SD1/SD2."""
    if getattr(unet_config, "addition_embed_type", None) != "text_time":
        return None
    pooled = unet_config.projection_class_embeddings_input_dim - 6 * unet_config.addition_time_embed_dim
    g = torch.Generator().manual_seed(7)
    time_ids = torch.tensor([resolution, resolution, 0, 0, resolution, resolution], dtype=torch.float32)
    return {"text_embeds": torch.randn(batch, pooled, generator=g).to(device, dtype),
            "time_ids": time_ids.repeat(batch, 1).to(device, dtype)}


# ----------------------------------------------------------------------------- reference loop
class ReferenceLoop:
    """Bare diffusers UNet + peft LoRA + AdamW on fixed tensors: the floor. `step()` runs one training step."""

    def __init__(self, a, device: torch.device):
        from peft import LoraConfig, inject_adapter_in_model

        from lora_train.networks.lora import unet_target_modules

        self.device = device
        base_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(a.precision) if device.type != "cpu" else None
        self.amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(a.precision)
        self.max_grad_norm = a.max_grad_norm
        unet = build_unet(a.model)
        set_attention(unet, a.attention)
        targets = unet_target_modules(unet)
        torch.manual_seed(0)
        inject_adapter_in_model(LoraConfig(r=a.rank, lora_alpha=a.rank, target_modules=targets, lora_dropout=0.0),
                                unet, adapter_name=REF_ADAPTER)
        unet.to(device, dtype=base_dtype) if base_dtype else unet.to(device)
        params = [p for n, p in unet.named_parameters() if (".lora_A." in n or ".lora_B." in n) and REF_ADAPTER in n]
        for p in params:
            p.data = p.data.float()
            p.requires_grad_(True)
        if a.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        if a.channels_last:
            unet.to(memory_format=torch.channels_last)
        unet.train()
        self.unet, self.params, self.n_targets = unet, params, len(targets)
        self.fwd = torch.compile(unet) if a.compile else unet
        if a.optimizer == "AdamW8bit":
            import bitsandbytes as bnb

            self.opt = bnb.optim.AdamW8bit(params, lr=a.lr, weight_decay=0.01)
        else:
            kw = {"fused": True} if device.type == "cuda" else {}
            self.opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.01, **kw)
        self.scaler = torch.amp.GradScaler("cuda") if (a.precision == "fp16" and device.type == "cuda") else None

        # fixed tensors: latents, noise, timesteps, text embeddings (what a step of ours sees after its data prep)
        g = torch.Generator().manual_seed(11)
        h = a.resolution // latent_factor(a.model)
        cross = unet.config.cross_attention_dim
        in_dtype = base_dtype or torch.float32
        self.noisy = torch.randn(a.batch, unet.config.in_channels, h, h, generator=g).to(device, in_dtype)
        if a.channels_last:
            self.noisy = self.noisy.contiguous(memory_format=torch.channels_last)
        self.target = torch.randn(a.batch, unet.config.out_channels, h, h, generator=g).to(device)
        self.t = torch.randint(0, 1000, (a.batch,), generator=g).to(device)
        self.ehs = torch.randn(a.batch, 77, cross, generator=g).to(device, in_dtype)
        self.added = added_cond(unet.config, a.batch, a.resolution, device, in_dtype)

    def step(self, check: bool = False) -> torch.Tensor:
        amp = self.amp_dtype
        with torch.autocast(self.device.type, dtype=amp or torch.float32, enabled=amp is not None):
            pred = self.fwd(self.noisy, self.t, self.ehs, added_cond_kwargs=self.added).sample
        loss = F.mse_loss(pred.float(), self.target.float())
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.opt)
        else:
            loss.backward()
        if check and any(p.grad is None for p in self.params):
            raise RuntimeError("reference loop: some LoRA weights got no gradient")
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss

    def info(self) -> Dict[str, Any]:
        return dict(lora_modules=self.n_targets, trainable_params=sum(p.numel() for p in self.params))

    def close(self) -> None:
        for k in ("unet", "fwd", "opt", "params", "noisy", "target", "ehs", "added", "scaler"):
            setattr(self, k, None)
        free_memory(self.device)


def run_reference(a, device: torch.device) -> Dict[str, Any]:
    ref = ReferenceLoop(a, device)
    times: List[float] = []
    with attention_context(a.attention):
        for i in range(a.warmup):
            ref.step(check=i == 0)
        cuda_sync(device)
        reset_peak_rss()
        reset_peak_vram(device)
        syncs = SyncCounter(device, a.count_syncs)
        syncs.start()
        c0 = time.process_time()
        t0 = last = time.perf_counter()
        for _ in range(a.steps):
            ref.step()
            if device.type != "cuda":  # per-step times only where they do not need a sync
                now = time.perf_counter()
                times.append(now - last)
                last = now
        syncs.stop()
        cuda_sync(device)
        total = time.perf_counter() - t0
        cpu = time.process_time() - c0
    out = dict(steps=a.steps, seconds=total, cpu_s_per_step=cpu / a.steps, peak_rss_mb=peak_rss_mb(),
               syncs_per_step=None if syncs.count is None else syncs.count / a.steps,
               peak_vram_mb=peak_vram_mb(device), **ref.info())
    out.update(_rates(total, a.steps, a.batch, times))
    ref.close()
    return out


def _rates(total: float, steps: int, batch: int, times: List[float]) -> Dict[str, Any]:
    sps = total / steps
    return dict(s_per_step=sps, images_per_s=batch / sps,
                s_per_step_median=statistics.median(times) if times else None)


# ----------------------------------------------------------------------------- ours
def make_dataset(folder: str, n_images: int, repeats: int, resolution: int) -> str:
    """`n_images` distinct images in a kohya `N_name` folder repeated so one epoch covers every step."""
    from PIL import Image

    sub = os.path.join(folder, f"{repeats}_bench")
    os.makedirs(sub, exist_ok=True)
    for i in range(n_images):
        im = Image.new("RGB", (resolution, resolution), ((i * 67) % 256, (i * 29 + 80) % 256, (i * 151) % 256))
        im.putpixel((i % resolution, 0), (255, 255, 255))
        im.save(os.path.join(sub, f"img_{i:03d}.png"))
        with open(os.path.join(sub, f"img_{i:03d}.txt"), "w", encoding="utf-8") as fh:
            fh.write(f"benchtok, a synthetic image number {i}")
    return folder


def _ours_config(a, device: torch.device, tmp: str, run_no: int):
    """(TrainConfig, BaseModel) of a bench run of our Trainer."""
    from lora_train.config import TrainConfig

    total_steps = a.warmup + a.steps
    data = make_dataset(os.path.join(tmp, f"data{run_no}"), n_images=a.batch, repeats=total_steps + 1,
                        resolution=a.resolution)
    model = build_base_model(a.model, a.vae)
    set_attention(model.unet, a.attention)
    if a.channels_last:
        model.unet.to(memory_format=torch.channels_last)
    kw = dict(train_data_dir=data, base_model="tiny", output_dir=os.path.join(tmp, f"out{run_no}"),
              output_name="bench", resolution=a.resolution, lora_rank=a.rank, learning_rate=a.lr,
              optimizer=a.optimizer, max_grad_norm=a.max_grad_norm, lr_scheduler="constant", lr_warmup_steps=0,
              batch_size=a.batch, epochs=1, max_train_steps=total_steps, mixed_precision=a.precision,
              device=str(device), gradient_checkpointing=a.gradient_checkpointing, save_every_n_epochs=0,
              save_state_every_n_epochs=0, seed=42)
    if a.log_every:
        kw["log_every_n_steps"] = a.log_every
    if a.interleave:
        kw["log_every_n_steps"] = 1  # a reference step after every step of ours
    return TrainConfig(**kw), model


def run_ours(a, device: torch.device, tmp: str, run_no: int) -> Dict[str, Any]:
    from lora_train.training.trainer import Trainer

    total_steps = a.warmup + a.steps
    cfg, model = _ours_config(a, device, tmp, run_no)
    marks: List[tuple] = []  # (step, perf_counter) of every "step" event
    state = {"t0": None, "s0": None, "rss": None, "vram": None}

    def on_event(ev):
        if ev["kind"] != "step":
            return
        s = ev["step"]
        if state["t0"] is None and s >= a.warmup:
            cuda_sync(device)
            state["run_vram"] = peak_vram_mb(device)
            reset_peak_rss()
            reset_peak_vram(device)
            syncs.start()
            state["c0"] = time.process_time()
            state["t0"], state["s0"] = time.perf_counter(), s
        elif state["t0"] is not None and s == total_steps:
            syncs.stop()
            cuda_sync(device)
        marks.append((s, time.perf_counter()))
        if s == total_steps:
            state["cpu"] = time.process_time() - state["c0"]
            state["rss"], state["vram"] = peak_rss_mb(), peak_vram_mb(device)

    syncs = SyncCounter(device, a.count_syncs)
    reset_peak_vram(device)
    try:
        with attention_context(a.attention):
            res = Trainer(cfg, model=model, callback=on_event).run()
    finally:
        syncs.stop()
    if res.steps != total_steps or state["t0"] is None or not marks or marks[-1][0] != total_steps:
        raise RuntimeError(f"the Trainer ran {res.steps} of {total_steps} steps (stopped={res.stopped}, "
                           f"{res.message or 'no message'}); cannot time it")
    steps = total_steps - state["s0"]
    if steps < 1:
        raise RuntimeError(f"no step event between step {a.warmup} and {total_steps} (log_every_n_steps too large "
                           f"for --steps): lower --log-every or raise --steps")
    total = marks[-1][1] - state["t0"]
    times = []
    if device.type != "cuda":
        seq = [(s, t) for s, t in marks if s >= state["s0"]]
        if all(s2 == s1 + 1 for (s1, _), (s2, _) in zip(seq, seq[1:])):
            times = [t2 - t1 for (_, t1), (_, t2) in zip(seq, seq[1:])]
    out = dict(steps=steps, seconds=total, cpu_s_per_step=state["cpu"] / steps, peak_rss_mb=state["rss"],
               syncs_per_step=None if syncs.count is None else syncs.count / steps,
               peak_vram_mb=state["vram"],
               peak_vram_run_mb=max(v for v in (state.get("run_vram"), state["vram"]) if v is not None)
               if device.type == "cuda" else None,
               final_loss=res.losses[-1] if res.losses else None)
    out.update(_rates(total, steps, a.batch, times))
    del model, res
    free_memory(device)
    return out


def run_interleaved(a, device: torch.device, tmp: str, run_no: int) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Both loops in turn, step by step: one reference step inside each "step" event of ours, so both see the
    same machine conditions (a shared CPU). Timing only: peak memory is not separable here (both models live)."""
    from lora_train.training.trainer import Trainer

    total_steps = a.warmup + a.steps
    ref = ReferenceLoop(a, device)
    cfg, model = _ours_config(a, device, tmp, run_no)
    ours_t: List[float] = []
    ours_c: List[float] = []
    ref_t: List[float] = []
    ref_c: List[float] = []
    prev: Dict[str, Any] = {"t": None, "c": None}

    def on_event(ev):
        if ev["kind"] != "step":
            return
        cuda_sync(device)
        t, c, s = time.perf_counter(), time.process_time(), ev["step"]
        if prev["t"] is not None and s > a.warmup:
            ours_t.append(t - prev["t"])
            ours_c.append(c - prev["c"])
        if s < total_steps:
            t1, c1 = time.perf_counter(), time.process_time()
            ref.step(check=s == 1)
            cuda_sync(device)
            if s >= a.warmup:
                ref_t.append(time.perf_counter() - t1)
                ref_c.append(time.process_time() - c1)
        prev["t"], prev["c"] = time.perf_counter(), time.process_time()

    with attention_context(a.attention):
        res = Trainer(cfg, model=model, callback=on_event).run()
    info = ref.info()
    ref.close()
    del model
    free_memory(device)
    if res.steps != total_steps or len(ours_t) != a.steps or len(ref_t) != a.steps:
        raise RuntimeError(f"interleaved run: {res.steps} of {total_steps} steps, {len(ours_t)} / {len(ref_t)} "
                           f"timed (stopped={res.stopped}, {res.message or 'no message'})")

    def summary(ts, cs, **extra):
        out = dict(steps=len(ts), seconds=sum(ts), cpu_s_per_step=sum(cs) / len(cs), peak_rss_mb=None,
                   peak_vram_mb=None, syncs_per_step=None, **extra)
        out.update(_rates(sum(ts), len(ts), a.batch, ts))
        return out

    return (summary(ours_t, ours_c, final_loss=res.losses[-1] if res.losses else None, peak_vram_run_mb=None),
            summary(ref_t, ref_c, **info))


# ----------------------------------------------------------------------------- main
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or b is None or not b or not math.isfinite(a) or not math.isfinite(b):
        return None
    return a / b


def env_info(device: torch.device) -> Dict[str, Any]:
    import diffusers
    import peft

    info = dict(python=platform.python_version(), torch=torch.__version__, diffusers=diffusers.__version__,
                peft=peft.__version__, device=str(device), threads=torch.get_num_threads(),
                cpu=platform.processor() or platform.machine())
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def check_args(a, device: torch.device) -> None:
    if a.optimizer == "AdamW8bit":
        if device.type != "cuda":
            sys.exit("--optimizer AdamW8bit needs CUDA (bitsandbytes); use --optimizer AdamW")
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            sys.exit("--optimizer AdamW8bit needs the bitsandbytes package")
    if a.attention == "xformers":
        try:
            import xformers  # noqa: F401
        except ImportError:
            sys.exit("--attention xformers: xformers is not installed; use sdpa or math")
    if a.precision == "fp16" and device.type == "cpu":
        sys.exit("--precision fp16 needs a GPU; on the CPU use no or bf16")
    if a.resolution % 8:
        sys.exit("--resolution must be a multiple of 8")


def fmt(v, spec: str = ".4g") -> str:
    return "-" if v is None else format(v, spec)


def print_table(result: Dict[str, Any]) -> None:
    o, r = result.get("ours") or {}, result.get("reference") or {}
    rows = [("seconds/step", "s_per_step", ".4g"), ("median s/step", "s_per_step_median", ".4g"),
            ("CPU s/step", "cpu_s_per_step", ".4g"),
            ("images/s", "images_per_s", ".4g"), ("peak RSS MB", "peak_rss_mb", ".1f"),
            ("peak VRAM MB", "peak_vram_mb", ".1f"), ("host syncs/step", "syncs_per_step", ".3g")]
    c = result["config"]
    print(f"\nstep bench: {c['model']} {c['resolution']}px batch {c['batch']} precision {c['precision']} "
          f"gc {c['gradient_checkpointing']} attention {c['attention']} {c['optimizer']} rank {c['rank']} "
          f"on {result['env']['device']} ({result['env']['threads']} threads); {c['steps']} measured steps after "
          f"{c['warmup']} warm-up, best of {c['repeats']}")
    print(f"{'':16s}{'ours':>12s}{'reference':>12s}{'ratio':>9s}")
    for label, key, spec in rows:
        rk = {"s_per_step": "ratio_step_time", "images_per_s": "ratio_images_per_s", "peak_rss_mb": "ratio_peak_rss",
              "peak_vram_mb": "ratio_peak_vram", "s_per_step_median": "ratio_step_time_median",
              "cpu_s_per_step": "ratio_cpu_time", "syncs_per_step": "-"}[key]
        print(f"{label:16s}{fmt(o.get(key), spec):>12s}{fmt(r.get(key), spec):>12s}{fmt(result.get(rk), '.3f'):>9s}")
    if o.get("peak_vram_run_mb") is not None:
        print(f"ours: peak VRAM over the whole run (caching included) {o['peak_vram_run_mb']:.1f} MB")
    if result.get("ours_error"):
        print(f"ours: not measured: {result['ours_error']}")


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=list(SIZES), default="tiny")
    ap.add_argument("--resolution", type=int, help="pixels (default: tiny 64, sd15 512, sdxl 1024)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--precision", choices=["no", "fp16", "bf16"], default="no")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--attention", choices=["sdpa", "math", "xformers"], default="sdpa")
    ap.add_argument("--channels-last", action="store_true", help="UNet weights (and reference input) channels_last")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile the REFERENCE UNet only (the Trainer has no compile option yet): shows what "
                         "compiling would gain")
    ap.add_argument("--optimizer", choices=["AdamW", "AdamW8bit"], default="AdamW")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping in both loops (0: off)")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    ap.add_argument("--steps", type=int, default=20, help="measured steps")
    ap.add_argument("--warmup", type=int, default=3, help="steps run before the measurement starts")
    ap.add_argument("--repeats", type=int, default=1, help="measure both R times, alternating; keep the best")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--vae", choices=["stub", "real"], default="stub",
                    help="sd15/sdxl: the VAE that caches the latents (stub: pool + 1x1 conv)")
    ap.add_argument("--log-every", type=int, help="the Trainer's log_every_n_steps (default: the config default)")
    ap.add_argument("--only", choices=["both", "ours", "reference"], default="both")
    ap.add_argument("--interleave", action="store_true",
                    help="one reference step after each step of ours, in one run (steadier timing on a shared "
                         "machine; no peak memory figures)")
    ap.add_argument("--count-syncs", action="store_true",
                    help="CUDA: count host-device synchronisations per step (torch.cuda.set_sync_debug_mode)")
    ap.add_argument("--json", metavar="FILE", help="also write the result as JSON")
    ap.add_argument("--smoke", action="store_true", help="tiny model, 3 measured steps after 1 warm-up")
    a = ap.parse_args(argv)
    if a.smoke:
        a.model, a.steps, a.warmup, a.repeats = "tiny", 3, 1, 1
    a.resolution = a.resolution or SIZES[a.model][1]
    if a.threads:
        torch.set_num_threads(a.threads)
    device = resolve_device(a.device)
    check_args(a, device)
    if a.steps < 1 or a.warmup < 1:
        sys.exit("--steps and --warmup must be >= 1")

    best: Dict[str, Optional[Dict[str, Any]]] = {"ours": None, "reference": None}
    ours_error = None
    with tempfile.TemporaryDirectory(prefix="step_bench_") as tmp:
        for rep in range(a.repeats):
            if a.interleave:
                o, r = run_interleaved(a, device, tmp, rep)
                if best["ours"] is None or o["s_per_step"] < best["ours"]["s_per_step"]:
                    best["ours"] = o
                if best["reference"] is None or r["s_per_step"] < best["reference"]["s_per_step"]:
                    best["reference"] = r
                continue
            if a.only in ("both", "reference"):
                r = run_reference(a, device)
                if best["reference"] is None or r["s_per_step"] < best["reference"]["s_per_step"]:
                    best["reference"] = r
            if a.only in ("both", "ours") and ours_error is None:
                try:
                    o = run_ours(a, device, tmp, rep)
                except Exception as exc:  # e.g. a model size the Trainer does not train yet
                    import traceback

                    traceback.print_exc()
                    ours_error = f"the Trainer could not train this model: {type(exc).__name__}: {exc}"
                    free_memory(device)
                else:
                    if best["ours"] is None or o["s_per_step"] < best["ours"]["s_per_step"]:
                        best["ours"] = o
    o, r = best["ours"] or {}, best["reference"] or {}
    result: Dict[str, Any] = {
        "config": dict(model=a.model, resolution=a.resolution, batch=a.batch, precision=a.precision,
                       gradient_checkpointing=a.gradient_checkpointing, attention=a.attention,
                       channels_last=a.channels_last, compile_reference=a.compile, count_syncs=a.count_syncs,
                       interleave=a.interleave,
                       optimizer=a.optimizer, rank=a.rank, steps=a.steps, warmup=a.warmup, repeats=a.repeats,
                       latent_size=a.resolution // latent_factor(a.model),
                       vae=a.vae if a.model in ("sd15", "sdxl") else "tiny", max_grad_norm=a.max_grad_norm,
                       smoke=a.smoke),
        "env": env_info(device),
        "ours": best["ours"], "reference": best["reference"], "ours_error": ours_error,
        "ratio_step_time": ratio(o.get("s_per_step"), r.get("s_per_step")),
        "ratio_cpu_time": ratio(o.get("cpu_s_per_step"), r.get("cpu_s_per_step")),
        "ratio_step_time_median": ratio(o.get("s_per_step_median"), r.get("s_per_step_median")),
        "ratio_images_per_s": ratio(o.get("images_per_s"), r.get("images_per_s")),
        "ratio_peak_rss": ratio(o.get("peak_rss_mb"), r.get("peak_rss_mb")),
        "ratio_peak_vram": ratio(o.get("peak_vram_mb"), r.get("peak_vram_mb")),
    }
    print_table(result)
    if a.json:
        with open(a.json, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=2)
        print(f"wrote {a.json}")
    if ours_error and a.only != "reference":
        print("ours failed; the reference figures stand alone", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()

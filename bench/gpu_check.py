"""The GPU check in one command (run by bench/gpu_check.sh): correctness against fp32, peak VRAM and images/s,
ours against the bare diffusers + peft loop and against kohya sd-scripts at equal settings.

    python bench/gpu_check.py --out DIR [--budget 480]     # on the GPU machine
    python bench/gpu_check.py --out DIR --dry-run          # on a CPU: tiny models, the same phases and code

Phases, in this order, each in its own process with its own time limit, so one that fails or runs long leaves
the others' figures (whatever finished is in DIR/gpu_check.json when the budget runs out):
  env          GPU, driver (nvidia-smi), versions
  correctness  tests/test_gpu.py: fp16 + loss scaling, bf16, 8-bit AdamW, checkpointing, compile, fp8 base,
               block swap, each a mean loss within tolerance of the fp32 run on the same batches
  speed        bench/step_bench.py (ours vs the bare loop, peak VRAM): SD1.5 512 b1 / b4, SDXL 1024 b1, with
               and without gradient checkpointing; bench/flow_bench.py: Flux.1-dev 1024 b1 fp8 base
  kohya        sd-scripts' train_network.py against `python -m lora_train train` on the same random SD1.5
               checkpoint and folder (512 px, batch 1, rank 8, AdamW, bf16, cached latents, UNet only): each
               at S1 and S2 steps, run kohya, ours, ours, kohya (both orders). Seconds/step: each tool's own
               tqdm bar (its moving average, the same measure on both sides), and (T(S2) - T(S1)) / (S2 - S1)
               of the wall times, which leaves out loading. Needs bench/vendor/sd-scripts (see
               bench/gpu_prepare.sh); without it the phase says so.
Targets (the issue's; stated as met / not met, never tuned): SD1.5 512 b1 <= 3 GB, SDXL 1024 b1 <= 8 GB,
Flux.1-dev 1024 b1 fp8 <= 16 GB without block swap, images/s >= 1.2x sd-scripts, ours / floor >= 0.95.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SD_SCRIPTS = os.path.join(HERE, "vendor", "sd-scripts")
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

#: name, step_bench arguments (GPU run), checks (field, op, limit)
SPEED = [
    ("sd15_512_b1", ["--model", "sd15", "--batch", "1", "--precision", "bf16"], [("ratio_images_per_s", ">=", 0.95)]),
    ("sd15_512_b1_gc", ["--model", "sd15", "--batch", "1", "--precision", "bf16", "--gradient-checkpointing"],
     [("ours.peak_vram_run_mb", "<=", 3072.0)]),
    ("sd15_512_b4", ["--model", "sd15", "--batch", "4", "--precision", "bf16"], [("ratio_images_per_s", ">=", 0.95)]),
    ("sd15_512_b4_gc", ["--model", "sd15", "--batch", "4", "--precision", "bf16", "--gradient-checkpointing"], []),
    ("sdxl_1024_b1_gc", ["--model", "sdxl", "--batch", "1", "--precision", "bf16", "--gradient-checkpointing"],
     [("ours.peak_vram_run_mb", "<=", 8192.0)]),
    ("sdxl_1024_b1", ["--model", "sdxl", "--batch", "1", "--precision", "bf16"], []),
]
FLOW = [
    ("flux_dev_1024_fp8_gc", ["--model", "flux-dev", "--fp8-base", "--gradient-checkpointing"],
     [("peak_vram_mb", "<=", 16384.0)]),
    ("flux_dev_1024_fp8", ["--model", "flux-dev", "--fp8-base"], [("peak_vram_mb", "<=", 16384.0)]),
]
KOHYA_STEPS = (10, 40)
#: the dry run: the tiny model of each kind, one case per code path (batch, checkpointing), fewer steps
DRY_SPEED = ("sd15_512_b1", "sd15_512_b4_gc", "sdxl_1024_b1_gc")
DRY_KOHYA_STEPS = (2, 6)


def log(msg: str) -> None:
    print(f"[gpu-check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(cmd: List[str], timeout: float, env: Optional[Dict[str, str]] = None, cwd: str = ROOT) -> Dict[str, Any]:
    """Run a command with a time limit; its output goes to our log; returns rc, seconds and the output's tail."""
    t0 = time.time()
    try:
        p = subprocess.run(cmd, cwd=cwd, env=dict(os.environ, **(env or {})), capture_output=True, text=True,
                           timeout=max(timeout, 1))
        rc, out = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as exc:
        rc, out = 124, ((exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes)
                        else (exc.stdout or "")) + f"\n(killed after {timeout:.0f} s)"
    secs = time.time() - t0
    print(out[-6000:], flush=True)
    return {"cmd": " ".join(cmd), "rc": rc, "seconds": round(secs, 2), "tail": out[-1500:],
            "tqdm_steps_per_s": tqdm_rate(out)}


_TQDM = re.compile(r"(\d+)/(\d+) \[[\d:]+<[\d:?]+,\s*([\d.]+)\s*(s/)?([A-Za-z]+)(/s)?")


def tqdm_rate(text: str) -> Optional[float]:
    """Steps per second from the last finished tqdm bar in `text` (its rate is tqdm's moving average, so the
    loading before the first step hardly counts): '40/40 [00:05<00:00, 7.5step/s]' or '... 1.3s/it'."""
    rate = None
    for m in _TQDM.finditer(text.replace("\r", "\n")):
        n, total, value, per, _unit, per_s = m.groups()
        if n == total and float(value) > 0 and (per or per_s):
            rate = 1.0 / float(value) if per else float(value)
    return rate


def check(res: Dict[str, Any], checks) -> List[Dict[str, Any]]:
    out = []
    for path, op, limit in checks:
        cur: Any = res
        for part in path.split("."):
            cur = cur.get(part) if isinstance(cur, dict) else None
        ok = None if cur is None else (cur >= limit if op == ">=" else cur <= limit)
        out.append({"field": path, "value": cur, "target": f"{op} {limit}",
                    "met": "not measured" if ok is None else ("met" if ok else "not met")})
    return out


class Check:
    def __init__(self, out: str, budget: float, dry: bool):
        self.out, self.dry, self.t_end = out, dry, time.time() + budget
        self.result: Dict[str, Any] = {"dry_run": dry, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                                       "phases": {}}

    def left(self) -> float:
        return self.t_end - time.time()

    def save(self) -> None:
        tmp = os.path.join(self.out, "gpu_check.json.tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(self.result, fh, indent=2, default=str)
        os.replace(tmp, os.path.join(self.out, "gpu_check.json"))

    def phase(self, name: str, data: Any) -> None:
        self.result["phases"][name] = data
        self.save()

    # ------------------------------------------------------------------ phases
    def env(self) -> None:
        info: Dict[str, Any] = {}
        smi = shutil.which("nvidia-smi")
        if smi:
            q = run([smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"], 30)
            info["nvidia_smi"] = q["tail"].strip()
        code = ("import json, torch, platform\nimport importlib.metadata as md\n"
                "v = {p: (md.version(p) if p in {d.metadata['Name'].lower() for d in md.distributions()} else None)"
                " for p in ('torch', 'diffusers', 'peft', 'transformers', 'accelerate', 'bitsandbytes')}\n"
                "v['python'] = platform.python_version(); v['cuda'] = torch.version.cuda\n"
                "v['gpu'] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None\n"
                "print('ENV ' + json.dumps(v))")
        r = run([sys.executable, "-c", code], 60)
        m = re.search(r"^ENV (.*)$", r["tail"], re.M)
        info.update(json.loads(m.group(1)) if m else {"error": r["tail"]})
        self.phase("env", info)

    def correctness(self) -> None:
        junit = os.path.join(self.out, "test_gpu.xml")
        env = {"LORA_TRAIN_GPU_TEST_DEVICE": "cpu"} if self.dry else {}
        r = run([sys.executable, "-m", "pytest", "-q", "-s", "-m", "gpu", "tests/test_gpu.py", f"--junitxml={junit}",
                 "-p", "no:cacheprovider"], min(240, self.left()), env)
        cases = re.findall(r"\[gpu-check\] (\S+) on \S+: mean loss ([\d.]+) vs fp32 ([\d.]+)", r["tail"])
        summary = re.findall(r"(\d+) (passed|failed|skipped|error)", r["tail"])
        r.update(summary={k: int(v) for v, k in summary},
                 cases=[{"case": c, "loss": float(a), "fp32": float(b)} for c, a, b in cases])
        self.phase("correctness", r)

    def speed(self) -> None:
        out: Dict[str, Any] = {}
        for name, args, checks in SPEED:
            if self.left() < 60:
                out[name] = {"skipped": "time budget spent"}
                continue
            if self.dry and name not in DRY_SPEED:
                continue
            js = os.path.join(self.out, f"speed_{name}.json")
            args = _dry_speed_args(args) if self.dry else args + ["--device", "cuda", "--steps", "10", "--warmup", "3"]
            r = run([sys.executable, os.path.join(HERE, "step_bench.py"), *args, "--json", js], min(150, self.left()))
            res = json.load(open(js)) if os.path.isfile(js) else {}
            out[name] = {"rc": r["rc"], "seconds": r["seconds"], "result": _speed_summary(res),
                         "targets": check(res, checks), **({} if r["rc"] == 0 else {"tail": r["tail"]})}
            self.phase("speed", out)
        for name, args, checks in FLOW:
            if self.left() < 60:
                out[name] = {"skipped": "time budget spent"}
                continue
            js = os.path.join(self.out, f"speed_{name}.json")
            args = args + (["--dry-run"] if self.dry else ["--device", "cuda", "--steps", "4", "--warmup", "2"])
            r = run([sys.executable, os.path.join(HERE, "flow_bench.py"), *args, "--json", js], min(180, self.left()))
            res = json.load(open(js)) if os.path.isfile(js) else {}
            out[name] = {"rc": r["rc"], "seconds": r["seconds"], "result": res, "targets": check(res, checks),
                         **({} if r["rc"] == 0 else {"tail": r["tail"]})}
        self.phase("speed", out)

    def kohya(self) -> None:
        res: Dict[str, Any] = {"settings": "SD1.5 random weights, 512 px, batch 1, rank 8, AdamW lr 1e-4, bf16, "
                                           "cached latents, UNet only, sdpa"}
        script = os.path.join(SD_SCRIPTS, "train_network.py")
        if not os.path.isfile(script):
            res["skipped"] = f"sd-scripts is not carried ({script} missing): run bench/gpu_prepare.sh first"
            self.phase("kohya", res)
            return
        work = tempfile.mkdtemp(prefix="gpu_check_kohya_")
        size = 64 if self.dry else 512
        ds = _kohya_folder(os.path.join(work, "data"), size)
        if self.dry:  # the tiny demo model has no original-layout file kohya could load: build the commands only
            res["commands"] = {"kohya": _kohya_cmd(script, "CKPT", ds, work, KOHYA_STEPS[0], size),
                               "ours": [sys.executable, "-m", "lora_train", "train", "CONFIG.yaml"]}
            res.update(_ours_timed(work, ds, "tiny", size, DRY_KOHYA_STEPS, self.left))
            res["skipped"] = "dry run: kohya needs a full-size checkpoint; our side ran on the tiny model"
            self.phase("kohya", res)
            return
        sys.path.insert(0, os.path.join(ROOT, "tests"))
        from real_hosts import sd15_checkpoint  # noqa: E402  (the random SD1.5 file the real-host tests use)

        ckpt = sd15_checkpoint(os.path.join(work, "sd15_random.safetensors"))
        times: Dict[str, Dict[int, float]] = {"kohya": {}, "ours": {}}
        rates: Dict[str, List[float]] = {}
        tok = _tokenizer_cache(work)
        s1, s2 = KOHYA_STEPS
        for who, steps in (("kohya", s1), ("ours", s1), ("ours", s2), ("kohya", s2)):
            if self.left() < 45:
                res.setdefault("skipped_runs", []).append(f"{who} {steps} steps: time budget spent")
                continue
            if who == "kohya":
                r = run(_kohya_cmd(script, ckpt, ds, work, steps, size) + ["--tokenizer_cache_dir", tok],
                        min(240, self.left()), cwd=SD_SCRIPTS)
            else:
                r = _ours_run(work, ds, ckpt, size, steps, min(240, self.left()))
            res[f"{who}_{steps}"] = ({k: r[k] for k in ("rc", "seconds", "tqdm_steps_per_s")}
                                     | ({} if r["rc"] == 0 else {"tail": r["tail"]}))
            if r["rc"] == 0:
                times[who][steps] = r["seconds"]
                if r["tqdm_steps_per_s"]:
                    rates.setdefault(who, []).append(r["tqdm_steps_per_s"])
        for who in times:
            if len(times[who]) == 2:  # wall time of S2 - S1 steps: loading cancels out
                res[f"{who}_s_per_step_by_difference"] = (times[who][s2] - times[who][s1]) / (s2 - s1)
            if rates.get(who):  # each tool's own progress bar (the same tqdm measure on both sides)
                res[f"{who}_s_per_step"] = 1.0 / max(rates[who])
        if res.get("kohya_s_per_step") and res.get("ours_s_per_step"):
            ratio = res["kohya_s_per_step"] / res["ours_s_per_step"]
            res["ours_images_per_s_over_kohya"] = ratio
            res["target"] = {"target": ">= 1.2", "value": ratio, "met": "met" if ratio >= 1.2 else "not met"}
        self.phase("kohya", res)


def _dry_speed_args(args: List[str]) -> List[str]:
    """A GPU case's step_bench arguments for the CPU: the tiny model of the same kind, 2 steps, no mixed precision."""
    tiny = "tiny-sdxl" if args[args.index("--model") + 1] == "sdxl" else "tiny"
    out = ["--model", tiny, "--device", "cpu", "--steps", "2", "--warmup", "1", "--batch",
           args[args.index("--batch") + 1]]
    return out + (["--gradient-checkpointing"] if "--gradient-checkpointing" in args else [])


def _speed_summary(res: Dict[str, Any]) -> Dict[str, Any]:
    o, r = res.get("ours") or {}, res.get("reference") or {}
    return {"ours_images_per_s": o.get("images_per_s"), "floor_images_per_s": r.get("images_per_s"),
            "ratio_images_per_s": res.get("ratio_images_per_s"), "ours_peak_vram_run_mb": o.get("peak_vram_run_mb"),
            "ours_peak_vram_mb": o.get("peak_vram_mb"), "floor_peak_vram_mb": r.get("peak_vram_mb"),
            "ours_error": res.get("ours_error")}


def _kohya_folder(folder: str, size: int) -> str:
    """The demo images in kohya's '<repeats>_<name>' layout (captions as .txt beside them); ours reads it too."""
    from lora_train.data.demo import write_demo_dataset

    write_demo_dataset(os.path.join(folder, "1_lrtdemo"), n=8, size=size)
    return folder


def _kohya_cmd(script: str, ckpt: str, ds: str, work: str, steps: int, size: int) -> List[str]:
    return [sys.executable, script, "--pretrained_model_name_or_path", ckpt, "--train_data_dir", ds,
            "--resolution", str(size), "--train_batch_size", "1", "--max_train_steps", str(steps),
            "--network_module", "networks.lora", "--network_dim", "8", "--network_alpha", "8",
            "--learning_rate", "1e-4", "--optimizer_type", "AdamW", "--mixed_precision", "bf16",
            "--cache_latents", "--sdpa", "--network_train_unet_only", "--seed", "1", "--caption_extension", ".txt",
            "--max_data_loader_n_workers", "0", "--output_dir", os.path.join(work, "kohya_out"),
            "--output_name", f"k{steps}", "--save_model_as", "safetensors", "--lr_scheduler", "constant"]


def _ours_config(work: str, ds: str, base: str, size: int, steps: int) -> str:
    from lora_train.config import TrainConfig

    cfg = TrainConfig(train_data_dir=ds, base_model=base, output_dir=os.path.join(work, f"ours_{steps}"),
                      output_name=f"o{steps}", resolution=size, batch_size=1, lora_rank=8, lora_alpha=8,
                      learning_rate=1e-4, optimizer="AdamW", lr_scheduler="constant", lr_warmup_steps=0,
                      max_train_steps=steps, train_text_encoder=False, save_every_n_epochs=0, seed=1,
                      mixed_precision="bf16" if base != "tiny" else "no").validate()
    path = os.path.join(work, f"ours_{steps}.yaml")
    cfg.save(path)
    return path


def _ours_run(work: str, ds: str, base: str, size: int, steps: int, timeout: float) -> Dict[str, Any]:
    return run([sys.executable, "-m", "lora_train", "train", _ours_config(work, ds, base, size, steps)], timeout)


def _ours_timed(work, ds, base, size, steps, left) -> Dict[str, Any]:
    t, rates = {}, []
    for s in steps:
        r = _ours_run(work, ds, base, size, s, min(240, left()))
        t[s] = r["seconds"] if r["rc"] == 0 else None
        rates.append(r["tqdm_steps_per_s"] or 0.0)
    return {"ours_seconds": t, "ours_s_per_step": 1.0 / max(rates) if max(rates) > 0 else None}


def _tokenizer_cache(work: str) -> str:
    """sd-scripts' --tokenizer_cache_dir with our bundled CLIP tokenizer under the name it looks for (no hub)."""
    from lora_train.models.single_file import clip_tokenizer

    cache = os.path.join(work, "tokenizers")
    clip_tokenizer().save_pretrained(os.path.join(cache, "openai_clip-vit-large-patch14"))
    return cache


def results_md(res: Dict[str, Any]) -> str:
    """The figures as a bench/RESULTS.md section."""
    env = res["phases"].get("env", {})
    lines = [f"## GPU check {res['started']}{' (DRY RUN on the CPU: not figures)' if res['dry_run'] else ''}", "",
             f"GPU {env.get('gpu')} / nvidia-smi `{env.get('nvidia_smi')}`; torch {env.get('torch')} (CUDA "
             f"{env.get('cuda')}), diffusers {env.get('diffusers')}, peft {env.get('peft')}, transformers "
             f"{env.get('transformers')}, bitsandbytes {env.get('bitsandbytes')}", ""]
    c = res["phases"].get("correctness", {})
    lines.append(f"Correctness (tests/test_gpu.py): {c.get('summary')}")
    for case in c.get("cases", []):
        lines.append(f"- {case['case']}: mean loss {case['loss']:.6f} vs fp32 {case['fp32']:.6f}")
    lines += ["", "| case | ours img/s | floor img/s | ours/floor | ours peak VRAM MB | target |", "|---|---|---|---|---|---|"]
    for name, v in (res["phases"].get("speed") or {}).items():
        s = v.get("result") or {}
        tg = "; ".join(f"{t['field']} {t['target']}: {t['met']} ({t['value']})" for t in v.get("targets", []))
        vram = s.get("ours_peak_vram_run_mb", s.get("peak_vram_mb"))
        lines.append(f"| {name} | {s.get('ours_images_per_s', s.get('images_per_s'))} | "
                     f"{s.get('floor_images_per_s')} | {s.get('ratio_images_per_s')} | {vram} | "
                     f"{tg or v.get('skipped', '')} |")
    k = res["phases"].get("kohya", {})
    lines += ["", f"kohya sd-scripts: {k.get('skipped') or k.get('target')}; s/step ours "
                  f"{k.get('ours_s_per_step')}, kohya {k.get('kohya_s_per_step')}", ""]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget", type=float, default=480, help="seconds for all phases (the device call's limit "
                                                                "should leave a minute more)")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--only", nargs="*", choices=["env", "correctness", "speed", "kohya"])
    a = ap.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    c = Check(a.out, a.budget, a.dry_run)
    for name in ("env", "correctness", "speed", "kohya"):
        if a.only and name not in a.only:
            continue
        if c.left() < 20:
            c.phase(name, {"skipped": "time budget spent"})
            continue
        log(f"phase {name} ({c.left():.0f} s left)")
        try:
            getattr(c, name)()
        except Exception as exc:  # one phase's failure keeps the others' figures
            import traceback

            traceback.print_exc()
            c.phase(name, {"error": f"{type(exc).__name__}: {exc}"})
    c.result["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    c.save()
    md = results_md(c.result)
    with open(os.path.join(a.out, "RESULTS_section.md"), "w", encoding="utf-8") as fh:
        fh.write(md + "\n")
    print(md)
    corr = c.result["phases"].get("correctness", {})
    return 0 if corr.get("rc") == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

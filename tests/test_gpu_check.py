"""bench/gpu_check.sh --dry-run: the GPU check's phases on the CPU with tiny models (the same script and code the
GPU machine runs), so the prepared device command cannot rot between GPU runs."""
import json
import os
import subprocess
import sys

import pytest

from conftest import _flow_training_importable

pytestmark = [pytest.mark.slow, pytest.mark.current_releases]  # starts processes; the GPU machine has current releases

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_dry_run_runs_every_phase(tmp_path):
    out = tmp_path / "out"
    r = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_check.sh"), "--dry-run", "--out", str(out),
                        "--budget", "600"], cwd=ROOT, env=dict(os.environ, PYTHON=sys.executable),
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    res = json.loads((out / "gpu_check.json").read_text())
    ph = res["phases"]
    assert res["dry_run"] is True and set(ph) == {"env", "correctness", "speed", "kohya"}
    assert ph["env"]["torch"] and ph["env"]["python"]
    # correctness: the CPU cases of tests/test_gpu.py ran and compared with fp32
    # (the Flux cases where diffusers.training_utils imports: not at AUTOMATIC1111's transformers 4.30.2)
    want = {"bf16", "checkpointing"} | ({"flux_fp8_base", "flux_block_swap"} if _flow_training_importable() else set())
    c = ph["correctness"]
    assert c["rc"] == 0 and c["summary"].get("passed", 0) >= len(want) and not c["summary"].get("failed"), c
    assert {x["case"] for x in c["cases"]} >= want, c
    # speed: ours and the floor measured for each dry case; the Flux size math ran
    for name in ("sd15_512_b1", "sd15_512_b4_gc", "sdxl_1024_b1_gc"):
        s = ph["speed"][name]
        assert s["rc"] == 0 and s["result"]["ours_images_per_s"] > 0 and s["result"]["floor_images_per_s"] > 0, s
        assert s["result"]["ours_error"] is None
    assert ph["speed"]["flux_dev_1024_fp8_gc"]["rc"] == 0
    # kohya: our side timed at two step counts; sd-scripts itself needs the full-size file (GPU run only)
    k = ph["kohya"]
    if "commands" in k:
        assert k["ours_s_per_step"] is not None and k["ours_s_per_step"] > 0, k
        assert "--network_module" in k["commands"]["kohya"]
    else:
        assert "gpu_prepare.sh" in k["skipped"], k
    md = (out / "RESULTS_section.md").read_text()
    assert "DRY RUN" in md and "sd15_512_b1" in md
    assert (out / "gpu_check.log").stat().st_size > 0


def test_gpu_scripts_parse():
    for name in ("gpu_check.sh", "gpu_prepare.sh"):
        r = subprocess.run(["bash", "-n", os.path.join(ROOT, "bench", name)], capture_output=True, text=True)
        assert r.returncode == 0, (name, r.stderr)

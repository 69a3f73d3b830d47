"""The step benchmark runs in smoke mode (tiny model, 3 measured steps) and writes valid JSON."""
import pytest
import json
import math
import os
import subprocess
import sys

pytestmark = pytest.mark.slow  # trains for more than a few steps, or starts processes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _positive(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def test_step_bench_smoke_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "step_bench.py"), "--smoke", "--device", "cpu",
                           "--threads", "1", "--json", str(out)],
                          cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ratio" in proc.stdout and "reference" in proc.stdout  # the table
    res = json.loads(out.read_text(encoding="utf-8"))

    cfg = res["config"]
    assert cfg["smoke"] is True and cfg["model"] == "tiny" and cfg["steps"] == 3
    assert res["ours_error"] is None
    for side in ("ours", "reference"):
        r = res[side]
        assert r["steps"] == 3, side
        for key in ("s_per_step", "images_per_s", "cpu_s_per_step", "peak_rss_mb", "seconds"):
            assert _positive(r[key]), (side, key, r[key])
        assert math.isclose(r["images_per_s"] * r["s_per_step"], cfg["batch"], rel_tol=1e-6)
        assert r["peak_vram_mb"] is None  # CPU run
    assert math.isfinite(res["ours"]["final_loss"])

    ratios = {k: v for k, v in res.items() if k.startswith("ratio")}
    for key in ("ratio_step_time", "ratio_images_per_s", "ratio_peak_rss", "ratio_cpu_time", "ratio_peak_vram"):
        assert key in ratios, key
    for key in ("ratio_step_time", "ratio_images_per_s", "ratio_peak_rss", "ratio_cpu_time"):
        assert _positive(ratios[key]), (key, ratios[key])
    assert math.isclose(ratios["ratio_step_time"], res["ours"]["s_per_step"] / res["reference"]["s_per_step"])
    assert math.isclose(ratios["ratio_images_per_s"] * ratios["ratio_step_time"], 1.0, rel_tol=1e-6)
    assert ratios["ratio_peak_vram"] is None

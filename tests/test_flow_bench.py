"""bench/flow_bench.py (issue #16): the Flux.1-dev / SD3.5 Medium size math on the meta device (the GPU runs and
their targets are in the script's docstring, for a device run)."""
import pytest
import importlib.util
import json
import os

pytestmark = pytest.mark.slow  # trains for more than a few steps, or starts processes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench():
    spec = importlib.util.spec_from_file_location("flow_bench", os.path.join(ROOT, "bench", "flow_bench.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_flux_dev_size_math_on_meta(tmp_path):
    b = _bench()
    out = tmp_path / "f.json"
    assert b.main(["--model", "flux-dev", "--dry-run", "--fp8-base", "--blocks-to-swap", "36", "--json", str(out)]) == 0
    s = json.loads(out.read_text())["size"]
    assert 11.8e9 < s["params"] < 12.0e9  # Flux.1-dev: 11.9 B
    assert s["blocks"] == 57 and s["lora_targets"] == 19 * 14 + 38 * 6
    assert s["fp8_weight_gb"] > 10.5 and s["weights_gb"] < 11.5  # fp8 base: ~1 byte per block weight
    assert s["resident_weights_gb"] < 7.0  # 36 single blocks in CPU memory, one at a time on the GPU
    assert s["lora_train_state_gb"] < 1.5  # rank 16: weights + grads + AdamW states in fp32
    assert {t[0] for t in b.TARGETS} == {"flux_dev_fp8_gc", "flux_dev_fp8_gc_swap", "sd35_medium_gc"}

"""ComfyUI: the Auto LoRA node on the fake graph, and several Train nodes run one after another (ComfyUI's own
queue) without leaking memory. Uses the fakes and fixtures of test_nodes.py."""
import gc
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_nodes import (TRAIN_KW, check_returns, comfy, comfy_loaded, graph, result_of, run_node,  # noqa: E402,F401
                        tiny_parts)

pytestmark = [pytest.mark.slow, pytest.mark.frontend]


def _rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def test_auto_node_publishes_the_best_epoch_and_returns_the_report(comfy, graph, tmp_path):
    from lora_train.data.demo import write_demo_dataset

    data = write_demo_dataset(str(tmp_path / "data"), n=4, size=64, captions=False)
    cls = comfy.pack.NODE_CLASS_MAPPINGS["LoraTrainAuto"]
    out = run_node(cls().auto, *graph, data, "auto lora", "style", "sd1", 0.0, "", 1e-3, 2, 3, False, "1", "1",
                   resolution=64, unique_id="9")
    name, path, grid, report = check_returns(cls, out)
    loras = comfy.fp.get_folder_paths("loras")[0]
    assert name == "auto_lora.safetensors" and path == os.path.join(loras, name) and os.path.isfile(path)
    assert os.path.isfile(os.path.join(loras, "auto_lora-000003.safetensors"))
    assert "# Auto LoRA report: auto_lora" in report and "<lora:auto_lora:" in report
    assert "| settings | `learning_rate` | 0.001 | your choice |" in report
    assert sorted(f for f in os.listdir(data) if f.endswith(".txt"))  # captions were written
    assert grid.shape[1] > 64


def test_queued_train_nodes_do_not_leak(comfy, graph, tmp_path):
    """ComfyUI runs queued prompts one after another in one process: after a warm-up run, 3 more Train runs must
    not keep models or grow RSS run by run."""
    from diffusers import UNet2DConditionModel

    from lora_train.data.demo import write_demo_dataset

    maps = comfy.pack.NODE_CLASS_MAPPINGS
    data = write_demo_dataset(str(tmp_path / "q"), n=2, size=64)
    ref = result_of(maps["LoraTrainDatasetFromFolder"]().load(data, "zq", 64, 1))[0]
    kw = dict(TRAIN_KW, epochs=1, max_steps=2, save_every_n_epochs=0, train_text_encoder=False)

    def unets():
        gc.collect()
        return sum(isinstance(o, UNet2DConditionModel) for o in gc.get_objects())

    run_node(maps["LoraTrainTrain"]().train, *graph, ref, "queued", **kw)  # warm-up: imports, caches
    gc.collect()
    rss0, unets0 = _rss_mb(), unets()
    rss = []
    for _ in range(3):
        run_node(maps["LoraTrainTrain"]().train, *graph, ref, "queued", **kw)
        gc.collect()
        rss.append(_rss_mb())
    assert unets() == unets0  # no model copy outlives its run
    growth = rss[-1] - rss0
    print(f"RSS after the warm-up run {rss0:.0f} MB, after 3 more runs {rss[-1]:.0f} MB (growth {growth:+.0f} MB; "
          f"per run {', '.join(f'{r:.0f}' for r in rss)})")
    assert growth < 60, rss

"""LR range test on the tiny model: a finite suggestion inside the sweep, a plot, and no side effects (weights,
module tree, requires_grad, modes, a caller's optimizer, RNG); plus the pure helpers and `lr-find`."""
import math
import os
import random
import threading

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from lora_train.networks import lora as L
from lora_train.cli.main import main
from lora_train.config import TrainConfig
from lora_train.data.demo import write_demo_dataset
from lora_train.tuning.lr_finder import centred_average, lr_range_test, lr_schedule, smooth, suggest_lr
from lora_train.models.tiny import build_tiny

pytestmark = pytest.mark.slow  # trains for more than a few steps, or starts processes


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lrf")
    data = write_demo_dataset(str(root / "data"), n=8, size=64)
    cfg = TrainConfig(train_data_dir=data, base_model="tiny", resolution=64, output_dir=str(root / "out"),
                      output_name="lrf", batch_size=2, lora_rank=4, seed=3)
    return cfg.validate(), build_tiny(), root


def rng_snapshot():
    return random.getstate(), np.random.get_state(), torch.get_rng_state()


def assert_rng_equal(a, b):
    assert a[0] == b[0]
    assert a[1][0] == b[1][0] and np.array_equal(a[1][1], b[1][1]) and a[1][2:] == b[1][2:]
    assert torch.equal(a[2], b[2])


def model_snapshot(m):
    u = m.unet
    return {
        "state": {k: v.detach().clone() for k, v in u.state_dict().items()},
        "tree": [(n, type(x).__name__) for n, x in u.named_modules()],
        "grad": {n: p.requires_grad for n, p in u.named_parameters()},
        "training": {n: x.training for n, x in u.named_modules()},
        "vars": sorted(vars(u)),
        "te": {k: v.detach().clone() for k, v in m.text_encoder.state_dict().items()},
        "vae": {k: v.detach().clone() for k, v in m.vae.state_dict().items()},
    }


def assert_same_model(a, b):
    assert a["tree"] == b["tree"] and a["grad"] == b["grad"] and a["training"] == b["training"]
    assert a["vars"] == b["vars"]
    for part in ("state", "te", "vae"):
        assert a[part].keys() == b[part].keys()
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part


def test_range_test_on_tiny_model_suggests_inside_the_sweep_and_leaves_no_trace(setup):
    cfg, model, _ = setup
    random.seed(11)
    np.random.seed(11)
    torch.manual_seed(11)
    before_rng = rng_snapshot()
    before = model_snapshot(model)
    events = []
    res = lr_range_test(cfg, model=model, lr_min=1e-6, lr_max=1e-1, steps=16, probe_samples=2,
                        callback=events.append)
    assert_rng_equal(before_rng, rng_snapshot())
    assert_same_model(before, model_snapshot(model))
    assert not list(L.lora_layers(model.unet, "lr_finder"))
    # the result
    assert math.isfinite(res.suggested_lr) and 1e-6 <= res.suggested_lr <= 1e-1
    assert res.heuristic in ("steepest descent", "minimum / 10")
    assert 2 <= len(res.lrs) == len(res.losses) == len(res.smoothed) <= 16
    assert res.lrs == sorted(res.lrs) and res.lrs[0] == pytest.approx(1e-6)
    if not res.stopped_early:
        assert res.lrs[-1] == pytest.approx(1e-1)
    assert all(math.isfinite(v) for v in res.losses[:-1])
    assert res.ema == pytest.approx(smooth(res.losses, 0.98))  # the stop rule's EMA (fastai's smoothing)
    assert res.smoothed == pytest.approx(centred_average(res.losses, 1))  # zero-lag curve of the suggestion
    assert isinstance(res.plot, Image.Image) and res.plot.size[0] > 100
    assert [e["step"] for e in events] == list(range(1, len(res.lrs) + 1))
    assert events[0]["kind"] == "lr_find" and events[0]["lr"] == pytest.approx(1e-6)
    assert "suggested learning_rate" in res.summary()
    # the sweep learns something on the tiny model: the probe loss falls somewhere in the sweep
    assert min(res.losses) < res.losses[0]


def test_bad_arguments(setup):
    cfg, model, _ = setup
    for kw in (dict(lr_min=1e-2, lr_max=1e-3), dict(steps=1), dict(smoothing=1.0), dict(probe="random")):
        with pytest.raises(ValueError):
            lr_range_test(cfg, model=model, **kw)


# ----------------------------------------------------------------------------- pure parts
def test_schedule_is_exponential():
    lrs = lr_schedule(1e-6, 1e-1, 6)
    assert lrs[0] == pytest.approx(1e-6) and lrs[-1] == pytest.approx(1e-1)
    ratios = [b / a for a, b in zip(lrs, lrs[1:])]
    assert all(r == pytest.approx(10.0) for r in ratios)


def test_smoothing_is_bias_corrected():
    assert smooth([2.0, 2.0, 2.0], 0.98) == pytest.approx([2.0, 2.0, 2.0])
    s = smooth([1.0, float("nan"), 3.0], 0.5)
    assert s[0] == 1.0 and math.isnan(s[1])


def test_centred_average_has_no_lag():
    ramp = [float(i) for i in range(10)]
    assert centred_average(ramp, 2)[2:8] == pytest.approx(ramp[2:8])
    assert centred_average([1.0, 3.0, float("nan")], 1)[:2] == [2.0, 2.0]


def test_suggestion_heuristics():
    lrs = lr_schedule(1e-6, 1e-1, 50)
    # a classic curve: flat, steep fall around 1e-4, minimum near 3e-3, then explosion
    x = np.log10(lrs)
    loss = 1.0 - 0.5 / (1 + np.exp(-(x + 4) * 4)) + np.where(x > -2.5, (x + 2.5) ** 2 * 2, 0)
    lr, how = suggest_lr(lrs, list(loss))
    assert how == "steepest descent" and 3e-5 < lr < 3e-4
    # no descent at all: the minimum / 10, clamped to the sweep
    flat_then_up = [1.0] * 30 + [1.0 + i for i in range(20)]
    lr, how = suggest_lr(lrs, flat_then_up, 1e-6, 1e-1)
    assert how == "minimum / 10" and 1e-6 <= lr <= 1e-1
    lr, how = suggest_lr([1e-6, 1e-5], [float("nan"), float("nan")], 1e-6, 1e-1)
    assert how == "minimum / 10" and lr == 1e-6


# ----------------------------------------------------------------------------- CLI
def test_cli_lr_find_writes_a_plot_and_never_overwrites(setup, tmp_path, capsys, monkeypatch):
    cfg, model, _ = setup
    conf = {"train_data_dir": cfg.train_data_dir, "base_model": "tiny", "resolution": 64,
            "output_dir": str(tmp_path / "out"), "output_name": "mine", "batch_size": 1, "lora_rank": 8}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(conf))
    taken = tmp_path / "out" / "mine_lr_find.png"  # a plot from an earlier run: never overwritten
    taken.parent.mkdir()
    taken.write_bytes(b"earlier")
    args = ["lr-find", str(path), "--lora_rank", "2", "--steps", "4", "--probe-samples", "2", "--lr-max", "1e-2"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "suggested learning_rate" in out and "heuristic:" in out
    assert "from 1e-06 to 0.01" in out  # --lr-max after the config reached the sweep
    png = tmp_path / "out" / "mine_lr_find_2.png"
    assert png.is_file() and Image.open(png).size[0] > 100 and str(png) in out
    assert taken.read_bytes() == b"earlier"
    # a bad override is a one-line error
    assert main(["lr-find", str(path), "--lerning_rate", "1"]) == 2
    assert "learning_rate" in capsys.readouterr().err


def test_existing_adapters_optimizer_and_stop(setup):
    """A model that already carries a LoRA being trained: that adapter, its optimizer state and the RNG come
    back untouched, and a stop request ends the sweep early with a result."""
    cfg, model, _ = setup  # the last test of the file: the shared model keeps the "user" adapter
    L.inject(model.unet, L.unet_target_modules(model.unet), 2, 2.0, "user")
    params = L.lora_parameters(model.unet, "user")
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-3)
    x = torch.randn(1, 4, 16, 16)
    ehs = torch.randn(1, 77, 32)
    model.unet(x, torch.tensor([10]), ehs).sample.pow(2).mean().backward()
    opt.step()
    opt.zero_grad()
    opt_before = {k: v.clone() for k, v in opt.state[params[0]].items()}
    before = model_snapshot(model)
    before_rng = rng_snapshot()
    stop = threading.Event()

    def cb(ev):
        if ev["step"] == 2:
            stop.set()

    res = lr_range_test(cfg, model=model, steps=10, probe_samples=2, optimizer=opt, callback=cb, stop_event=stop)
    assert res.stopped_early and "stopped" in res.stop_reason and len(res.lrs) == 2
    assert math.isfinite(res.suggested_lr) and 1e-6 <= res.suggested_lr <= 1e-1
    assert_same_model(before, model_snapshot(model))
    assert_rng_equal(before_rng, rng_snapshot())
    assert all(torch.equal(opt_before[k], opt.state[params[0]][k]) for k in opt_before)
    assert [n for n, _ in L.lora_layers(model.unet, "user")] and not list(L.lora_layers(model.unet, "lr_finder"))


@pytest.mark.parametrize("network_type", ["lokr", "dora"])
def test_range_test_with_the_runs_network_type(setup, network_type):
    """The finder trains the network the run will train (issue 17) and takes it out again."""
    cfg, model, _ = setup
    cfg = cfg.replace(network_type=network_type, loraplus_lr_ratio=4.0)
    before = model_snapshot(model)
    res = lr_range_test(cfg, model=model, lr_min=1e-5, lr_max=1e-1, steps=8, probe_samples=2)
    assert_same_model(before, model_snapshot(model))
    assert len(res.lrs) >= 2 and all(math.isfinite(v) for v in res.losses[:-1])


def test_the_sweep_is_the_run_it_advises(tmp_path):
    """The LR finder drives the Trainer: with clip_skip 2, Huber loss, a mask folder, reg images and block-wise lr,
    its first training loss is the run's first-step loss for the same seed (both draw the same batch, noise and
    timesteps and apply the same options), and the finder names none of those options itself."""
    import inspect

    import lora_train.tuning.lr_finder as finder
    from conftest import small_cfg
    from lora_train.training.trainer import Trainer

    data = write_demo_dataset(str(tmp_path / "data"), n=4, size=64)
    masks = tmp_path / "masks"
    masks.mkdir()
    for f in os.listdir(data):
        if f.endswith(".png"):
            g = np.zeros((64, 64), np.uint8)
            g[:40] = 255
            Image.fromarray(g, "L").save(masks / f)
    reg = write_demo_dataset(str(tmp_path / "reg" / "1_shape"), n=2, size=64, seed=7, captions=False)
    cfg = small_cfg(data, tmp_path / "o", max_train_steps=3, clip_skip=2, loss_type="huber", huber_schedule="snr",
                    masked_loss=True, mask_dir=str(masks), reg_data_dir=os.path.dirname(reg), prior_loss_weight=0.5,
                    down_lr_weight="1,0,1,0.5,1,1,1,1,1,1,1,1", mid_lr_weight="2", up_lr_weight="zeros+0.25",
                    learning_rate=1e-4, lr_warmup_steps=0)
    run = Trainer(cfg, model=build_tiny()).run()
    sweep = lr_range_test(cfg, model=build_tiny(), steps=3, probe="train", lr_min=1e-4, lr_max=1e-2)
    assert sweep.losses[0] == pytest.approx(run.losses[0], rel=1e-5), (sweep.losses, run.losses)
    # and the options change the loss (the equality is not two defaults agreeing)
    plain = lr_range_test(small_cfg(data, tmp_path / "p", max_train_steps=3), model=build_tiny(), steps=3,
                          probe="train", lr_min=1e-4, lr_max=1e-2)
    assert abs(plain.losses[0] - sweep.losses[0]) > 1e-4
    src = inspect.getsource(finder)
    for option in ("clip_skip", "loss_type", "huber", "mask_dir", "reg_data_dir", "lr_weight", "noise_offset",
                   "diffusion_loss", "text_chunks"):
        assert option not in src.split('"""', 2)[2], option  # only the module docstring may name them

"""A/B grids: base column identical to the no-LoRA image, labels, dimensions, PNG parameters."""
import os

import numpy as np
import pytest
from PIL import Image

from lora_train.models.tiny import build_tiny
from lora_train.sampler import GenParams, Generator, build_grid, epoch_axis
from lora_train.training.trainer import Trainer

pytestmark = pytest.mark.slow  # trains for more than a few steps, or starts processes

STEPS = 3


@pytest.fixture
def lora_dir(ab_lora_dir):
    return ab_lora_dir  # the session's shared trained LoRA (conftest)


def _arr(im):
    return np.asarray(im)


def test_base_column_bitwise_and_strength_differs(lora_dir):
    gen = Generator(build_tiny(), lora_dirs=[lora_dir])
    base = GenParams(prompt="lrtdemo, a red circle <lora:ab:0.8>", steps=STEPS, cfg_scale=3.0, width=64, height=64,
                     seed=3)
    res = build_grid(gen, base, "ab", [0.4, 0.8, 1.0], seeds=[3, 4])
    plain = Generator(build_tiny())  # never saw a LoRA
    for r, seed in enumerate([3, 4]):
        ref = plain(GenParams(prompt="lrtdemo, a red circle", steps=STEPS, cfg_scale=3.0, width=64, height=64,
                              seed=seed))
        cell0 = next(c for c in res.cells if c.row == r and c.col == 0)
        cell1 = next(c for c in res.cells if c.row == r and c.col == 3)
        assert np.array_equal(_arr(cell0.image), _arr(ref))
        assert not np.array_equal(_arr(cell1.image), _arr(ref))
    # after the grid, a tag-free prompt on the same generator still gives the exact base image
    again = gen(GenParams(prompt="lrtdemo, a red circle", steps=STEPS, cfg_scale=3.0, width=64, height=64, seed=3))
    assert np.array_equal(_arr(again), _arr(res.cells[0].image))


def test_grid_dims_strengths_x_seeds(lora_dir):
    gen = Generator(build_tiny(), lora_dirs=[lora_dir])
    base = GenParams(prompt="a square", steps=2, cfg_scale=1.0, width=64, height=64)
    res = build_grid(gen, base, "ab", [0, 0.4, 0.8, 1], seeds=[1, 2], cell_size=64)
    assert (res.rows, res.cols) == (2, 4)
    assert res.col_labels == ["base (0)", "0.4", "0.8", "1"] and res.row_labels == ["seed 1", "seed 2"]
    assert len(res.cells) == 8
    w, h = res.image.size
    assert w >= 4 * 64 and h >= 2 * 64
    assert "a square" in res.title and "steps 2" in res.title and "DDIM" in res.title


def test_grid_epochs_x_strengths(lora_dir, tmp_path):
    gen = Generator(build_tiny(), lora_dirs=[lora_dir])
    axis = epoch_axis(gen.library, "ab")
    assert axis == [("epoch 1", "ab-000001"), ("epoch 2", "ab-000002"), ("final", "ab")]
    base = GenParams(prompt="a dot <lora:ab:1>", steps=2, cfg_scale=1.0, width=64, height=64, seed=5)
    res = build_grid(gen, base, "ab", [0.5, 1.0], epochs=axis)
    assert (res.rows, res.cols) == (3, 3)
    assert res.row_labels == ["epoch 1", "epoch 2", "final"]
    # each epoch's strength-1 cell used its own file
    prompts = [c.params.prompt for c in res.cells if c.col == 2]
    assert prompts == ["a dot <lora:ab-000001:1>", "a dot <lora:ab-000002:1>", "a dot <lora:ab:1>"]
    imgs = [_arr(c.image) for c in res.cells if c.col == 2]
    assert not np.array_equal(imgs[0], imgs[2])
    bases = [_arr(c.image) for c in res.cells if c.col == 0]
    assert all(np.array_equal(b, bases[0]) for b in bases)
    paths = res.save(str(tmp_path / "g"), "ab")
    assert len(paths) == 1 + 9 and all(os.path.isfile(p) for p in paths)
    assert res.save(str(tmp_path / "g"), "ab")[0].endswith("ab_grid-2.png")  # never overwrites


def test_png_parameters_chunk(lora_dir, tmp_path):
    gen = Generator(build_tiny(), lora_dirs=[lora_dir])
    base = GenParams(prompt="a cat <lora:ab:0.8>", negative_prompt="blurry", steps=2, cfg_scale=4.5, width=64,
                     height=64, seed=77, sampler="Euler")
    res = build_grid(gen, base, "ab", [0.8], seeds=[77])
    paths = res.save(str(tmp_path), "ab")
    cell = Image.open([p for p in paths if p.endswith("_r0_c1.png")][0])
    text = cell.info["parameters"]
    first, neg, rest = text.split("\n")
    assert first == "a cat <lora:ab:0.8>"
    assert neg == "Negative prompt: blurry"
    for part in ("Steps: 2", "Sampler: Euler", "CFG scale: 4.5", "Seed: 77", "Size: 64x64", 'Lora hashes: "ab: '):
        assert part in rest
    assert "<lora:" not in Image.open([p for p in paths if p.endswith("_r0_c0.png")][0]).info["parameters"]


def test_overwritten_file_is_reloaded(lora_dir, tmp_path):
    import shutil

    d = tmp_path / "l"
    d.mkdir()
    shutil.copy(os.path.join(lora_dir, "ab-000001.safetensors"), d / "x.safetensors")
    gen = Generator(build_tiny(), lora_dirs=[str(d)])
    p = GenParams(prompt="a <lora:x:1>", steps=2, cfg_scale=1.0, width=64, height=64, seed=1)
    a = _arr(gen(p))
    shutil.copy(os.path.join(lora_dir, "ab.safetensors"), d / "x.safetensors")
    os.utime(d / "x.safetensors", (1, 1))  # a different stamp even on coarse clocks
    b = _arr(gen(GenParams(prompt="a <lora:x:1>", steps=2, cfg_scale=1.0, width=64, height=64, seed=1)))
    fresh = _arr(Generator(build_tiny(), lora_dirs=[str(d)])(
        GenParams(prompt="a <lora:x:1>", steps=2, cfg_scale=1.0, width=64, height=64, seed=1)))
    assert not np.array_equal(a, b) and np.array_equal(b, fresh)


def test_sample_cli(lora_dir, tmp_path):
    from lora_train.cli.main import main

    rc = main(["sample", "--base_model", "tiny", "--prompt", "a <lora:ab:0.8>", "--strengths", "0,0.5,1",
               "--seeds", "1,2", "--lora-dir", lora_dir, "--out", str(tmp_path), "--steps", "2"])
    assert rc == 0 and os.path.isfile(tmp_path / "ab_grid.png")
    rc = main(["sample", "--base_model", "tiny", "--prompt", "a <lora:ab:0.8>", "--epochs", "all",
               "--lora-dir", lora_dir, "--out", str(tmp_path / "e"), "--steps", "1"])
    assert rc == 0
    assert main(["sample", "--base_model", "tiny", "--prompt", "a <lora:abc:0.8>", "--lora-dir", lora_dir]) == 2
    # --lora as the path of the file (what a user copies from the training's last line), run from elsewhere
    rc = main(["sample", "--base_model", "tiny", "--prompt", "a cat", "--lora", os.path.join(lora_dir, "ab.safetensors"),
               "--strengths", "0,1", "--out", str(tmp_path / "p"), "--steps", "1"])
    assert rc == 0 and os.path.isfile(tmp_path / "p" / "ab_grid.png")


def test_samples_during_training_keep_run_identical(tmp_path, demo_data):
    from safetensors.torch import load_file

    from conftest import small_cfg

    events = []
    cfg = small_cfg(demo_data, tmp_path / "a", max_train_steps=4, sample_every_n_steps=2,
                    sample_prompts=["lrtdemo, a red circle"], sample_steps=2)
    res = Trainer(cfg, callback=events.append).run()
    samples = [e["path"] for e in events if e["kind"] == "sample"]
    assert len(samples) == 2 and all(os.path.isfile(p) for p in samples)
    assert os.path.dirname(samples[0]) == os.path.join(str(tmp_path / "a"), "samples")
    plain = Trainer(small_cfg(demo_data, tmp_path / "b", max_train_steps=4)).run()
    a, b = load_file(res.lora_path), load_file(plain.lora_path)
    assert all(torch_equal(a[k], b[k]) for k in a)  # sampling does not disturb training


def torch_equal(x, y):
    import torch

    return torch.equal(x, y)

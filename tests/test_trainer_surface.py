"""The Trainer's public surface: prepare() / step(lr) / probe_loss() drive a run step by step (the LR finder uses
them), and extensions take part through the named HOOKS, never by writing the Trainer's attributes."""
import ast
import os

import pytest
import torch

from conftest import small_cfg
from lora_train.models.tiny import build_tiny
from lora_train.training.trainer import HOOKS, Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_step_by_step_is_the_run(demo_data, tmp_path):
    """prepare() + step() x N gives the losses run() gives with the same config; step(lr) sets that lr."""
    cfg = small_cfg(demo_data, tmp_path / "a", max_train_steps=3, lr_scheduler="constant")
    run = Trainer(cfg, model=build_tiny()).run()
    tr = Trainer(cfg.replace(output_dir=str(tmp_path / "b")), model=build_tiny())
    assert tr.prepare()
    losses = [tr.step() for _ in range(3)]
    assert losses == pytest.approx(run.losses, rel=1e-6)
    tr.step(lr=5e-3)
    assert tr.last_lrs[0] == pytest.approx(5e-3)  # the lr the update used
    # a fixed-noise measure does not move the weights and repeats exactly
    items, noise, t = [0, 1], torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)), \
        torch.tensor([100, 700])
    a = tr.probe_loss(items, noise, t)
    assert a == tr.probe_loss(items, noise, t) and a > 0
    tr.release()


class Recorder:
    """An extension that records the hooks it sees and weights the loss of every sample by 0.5."""

    def __init__(self):
        self.calls = []

    def after_dataset(self, tr):
        self.calls.append("after_dataset")

    def after_split(self, tr, train_idx, val_idx):
        self.calls.append("after_split")
        return train_idx, val_idx

    def shape_network(self, tr, groups, names):
        self.calls.append("shape_network")
        return groups, names

    def loss_kwargs(self, tr, idx, flips, t, in_noise, shape):
        self.calls.append("loss_kwargs")
        return {"weights": torch.full((len(idx),), 0.5, device=tr.device)}

    def after_optimizer_step(self, tr):
        self.calls.append("after_optimizer_step")

    def metadata(self, tr):
        return {"ss_recorder": "yes"}


def test_extensions_take_part_through_the_named_hooks(demo_data, tmp_path):
    from safetensors import safe_open

    cfg = small_cfg(demo_data, tmp_path / "a", max_train_steps=2)
    plain = Trainer(cfg, model=build_tiny()).run()
    rec = Recorder()
    tr = Trainer(cfg.replace(output_dir=str(tmp_path / "b")), model=build_tiny(), extensions=[rec])
    res = tr.run()
    first = [rec.calls.index(h) for h in ("after_dataset", "after_split", "shape_network", "loss_kwargs",
                                          "after_optimizer_step")]
    assert first == sorted(first) and rec.calls.count("after_optimizer_step") == 2
    assert res.losses[0] == pytest.approx(0.5 * plain.losses[0], rel=1e-5)  # its loss weights applied
    with safe_open(res.lora_path, "pt") as fh:
        assert fh.metadata()["ss_recorder"] == "yes"
    assert set(n for n in dir(Recorder) if not n.startswith("_")) - {"calls"} <= set(HOOKS)


def test_no_module_writes_the_trainers_attributes():
    """Outside trainer.py nothing assigns `tr.x = ...` / `trainer.x = ...` (extensions keep their own state)."""
    bad = []
    for dp, _dn, fn in os.walk(os.path.join(ROOT, "lora_train")):
        for f in fn:
            p = os.path.join(dp, f)
            if not f.endswith(".py") or p.endswith(os.path.join("training", "trainer.py")):
                continue
            for node in ast.walk(ast.parse(open(p, encoding="utf-8").read())):
                targets = node.targets if isinstance(node, ast.Assign) else \
                    [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
                for t in targets:
                    if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and \
                            t.value.id in ("tr", "trainer"):
                        bad.append(f"{os.path.relpath(p, ROOT)}:{node.lineno} {t.value.id}.{t.attr}")
    assert bad == [], bad

"""Settings advisor (table-driven, one test per rule), lr rescaling, config checks, live diagnosis on synthetic
loss curves, and the `suggest` command."""
import math
import os
import random
import re

import pytest
import yaml

from lora_train.tuning import advisor as A
from lora_train.tuning.advisor import Diagnoser, check_config, diagnose, rescale_lr, suggest
from lora_train.cli.main import main
from lora_train.config import TrainConfig

KEYS = set(TrainConfig.keys())


def approx(x):
    return pytest.approx(x, rel=1e-2)


# ----------------------------------------------------------------------------- image count
@pytest.mark.parametrize("count, vram, batch, lr, lr_lo, lr_hi", [
    (20, 8, None, 1e-4, 1e-4, 1.5e-4),     # under 50 images: 1e-4..1.5e-4
    (49, 24, None, 1.5e-4, 1e-4, 1.5e-4),  # big card, but small set: batch capped at 2
    (30, 16, 4, 1.5e-4, 1e-4, 1.5e-4),     # insisted batch 4 under 50 images: still capped at 1.5e-4
    (50, 16, None, 2e-4, 2e-4, 2e-4),      # 50-200 at batch 4: the 2e-4 default
    (200, 16, None, 2e-4, 2e-4, 2e-4),
])
def test_image_count_sets_the_start_lr(count, vram, batch, lr, lr_lo, lr_hi):
    s = suggest(count, "style", "sd1", vram_gb=vram, batch_size=batch)
    assert s.learning_rate == approx(lr)
    assert lr_lo - 1e-12 <= s.learning_rate <= lr_hi + 1e-12
    if count < 50:
        assert "under 50 images" in s.reason("learning_rate")


def test_small_sets_get_more_epochs():
    epochs = {n: suggest(n, "style", vram_gb=16).epochs for n in (10, 30, 49, 60, 150, 200, 400, 2000)}
    assert epochs[10] >= epochs[30] >= epochs[49] > epochs[60] >= epochs[150] >= epochs[200] >= epochs[400]
    assert all(10 <= epochs[n] <= 100 for n in (10, 30, 49))
    assert all(10 <= epochs[n] <= 30 for n in (60, 150, 200))
    assert all(5 <= epochs[n] <= 10 for n in (400, 2000))
    assert "under 50 images" in suggest(20, "style", vram_gb=16).reason("epochs")


# ----------------------------------------------------------------------------- batch table
@pytest.mark.parametrize("batch, lr", [(1, 1e-4), (2, 1.5e-4), (4, 2e-4)])
def test_batch_table(batch, lr):
    s = suggest(100, "style", vram_gb=24, batch_size=batch)
    assert s.batch_size == batch and s.learning_rate == approx(lr)
    assert A.lr_for_batch(batch)[0] == lr


@pytest.mark.parametrize("batch, scaling, lr", [(8, "sqrt", 2e-4 * math.sqrt(2)), (8, "linear", 4e-4),
                                                (16, "sqrt", 4e-4), (3, "sqrt", 1.5e-4 * math.sqrt(1.5))])
def test_batches_outside_the_table_scale_from_it(batch, scaling, lr):
    assert A.lr_for_batch(batch, scaling)[0] == approx(lr)


def test_demanding_detail_at_rank_16_takes_2_5e_4():
    s = suggest(100, "face", vram_gb=16, detail="demanding")
    assert s.lora_rank == 16 and s.batch_size == 4 and s.learning_rate == approx(2.5e-4)
    assert "2.5e-4" in s.reason("learning_rate")


# ----------------------------------------------------------------------------- accumulation
@pytest.mark.parametrize("batch, accum, scaling, lr", [
    (2, 4, "sqrt", 1.5e-4 * 2), (2, 4, "linear", 1.5e-4 * 4),
    (4, 2, "sqrt", 2e-4 * math.sqrt(2)), (4, 2, "linear", 4e-4),
    (1, 1, "sqrt", 1e-4),
])
def test_accumulation_rescales_lr(batch, accum, scaling, lr):
    s = suggest(100, "style", vram_gb=24, batch_size=batch, gradient_accumulation_steps=accum,
                accumulation_scaling=scaling)
    assert s.gradient_accumulation_steps == accum and s.learning_rate == approx(lr)
    if accum > 1:
        why = s.reason("learning_rate")
        assert f"{batch} x {accum} = {batch * accum}" in why and scaling in why
        assert f"effective batch {batch} x {accum} = {batch * accum}" in s.reason("gradient_accumulation_steps")


@pytest.mark.parametrize("args, lr", [
    ((2e-4, 4, 1, 4, 4, "sqrt"), 4e-4), ((2e-4, 4, 1, 4, 4, "linear"), 8e-4),
    ((2e-4, 4, 1, 2, 1, "sqrt"), 2e-4 / math.sqrt(2)), ((2e-4, 4, 1, 1, 1, "linear"), 5e-5),
    ((1.5e-4, 2, 2, 4, 1, "sqrt"), 1.5e-4), ((1e-4, 1, 1, 2, 8, "sqrt"), 4e-4),
])
def test_rescale_lr(args, lr):
    new, why = rescale_lr(*args)
    assert new == approx(lr)
    assert args[5] in why or "unchanged" in why
    assert "effective batch" in why


def test_rescale_lr_rejects_nonsense():
    with pytest.raises(ValueError):
        rescale_lr(2e-4, 0, 1, 2, 1)
    with pytest.raises(ValueError):
        rescale_lr(2e-4, 1, 1, 2, 1, "cubic")


# ----------------------------------------------------------------------------- VRAM tiers
@pytest.mark.parametrize("base, vram, lo, hi", [
    ("sd1", 6, 1, 2), ("sd1", 8, 1, 2), ("sd1", 10, 2, 4), ("sd1", 12, 4, 8), ("sd1", 16, 4, 8),
    ("sd1", 20, 4, 8), ("sd1", 24, 8, 16), ("sd1", 80, 8, 16),
    ("sdxl", 8, 1, 1), ("sdxl", 12, 2, 4), ("sdxl", 16, 2, 4), ("sdxl", 24, 4, 8), ("sdxl", 80, 4, 8),
])
def test_vram_tiers(base, vram, lo, hi):
    assert A.vram_batch_range(vram, base)[:2] == (lo, hi)
    s = suggest(150, "style", base, vram_gb=vram)
    assert s.batch_size == lo  # the lower end of the tier
    assert f"{lo}-{hi}" in s.reason("batch_size")
    if base == "sdxl":
        assert "SDXL halves" in s.reason("batch_size") and s.resolution == 1024


def test_short_vram_turns_on_checkpointing():
    assert suggest(100, "style", vram_gb=8).gradient_checkpointing is True
    assert suggest(100, "style", vram_gb=24).gradient_checkpointing is False
    assert suggest(100, "style", "sdxl", vram_gb=16).gradient_checkpointing is True


def test_unknown_vram_on_cpu_is_said(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    s = suggest(100, "style")
    assert any("VRAM unknown" in n for n in s.notes) and "unknown" in s.reason("batch_size")
    assert s.mixed_precision == "no" and s.batch_size == 1


# ----------------------------------------------------------------------------- task -> rank
@pytest.mark.parametrize("task, detail, lo, hi", [
    ("style", "simple", 4, 6), ("style", "normal", 8, 12), ("style", "demanding", 8, 12),
    ("face", "simple", 8, 12), ("face", "normal", 8, 12), ("face", "demanding", 16, 16),
    ("character", "normal", 8, 12), ("object", "demanding", 16, 16), ("concept", "normal", 4, 8),
    ("other", "normal", 8, 8),
])
def test_task_sets_rank(task, detail, lo, hi):
    s = suggest(100, task, vram_gb=24, detail=detail)
    assert lo <= s.lora_rank <= hi <= A.RANK_UPPER
    assert s.lora_alpha == s.lora_rank
    assert task in s.reason("lora_rank")


def test_short_vram_lowers_rank_before_batch():
    s = suggest(100, "face", vram_gb=8, detail="demanding")
    assert s.lora_rank == 8 and s.batch_size == 1
    assert "before touching the batch" in s.reason("lora_rank")
    # an insisted batch above the tier: kept, rank lowered and checkpointing on first
    s = suggest(100, "face", vram_gb=8, batch_size=4, detail="demanding")
    assert s.batch_size == 4 and s.lora_rank <= 4 and s.gradient_checkpointing is True
    assert "your choice" in s.reason("batch_size") and s.notes


def test_user_insisted_batch_is_kept():
    s = suggest(100, "style", vram_gb=24, batch_size=3)
    assert s.batch_size == 3 and "your choice" in s.reason("batch_size")
    assert s.learning_rate == approx(1.5e-4 * math.sqrt(1.5))


@pytest.mark.parametrize("rank, flagged", [(8, False), (16, False), (32, False), (33, True), (64, True)])
def test_rank_over_32_is_flagged(rank, flagged):
    cfg = TrainConfig(base_model="/models/sd15", lora_rank=rank, learning_rate=1e-4, batch_size=1)
    warns = check_config(cfg, samples_per_epoch=100)
    assert any("lora_rank" in w and "32" in w for w in warns) == flagged


def test_check_config_flags_lr_far_off_and_long_warmup():
    base = dict(base_model="/models/sd15", lora_rank=8, batch_size=4)
    assert check_config(TrainConfig(learning_rate=2e-4, **base), samples_per_epoch=100) == []
    assert any("learning_rate" in w for w in check_config(TrainConfig(learning_rate=2e-3, **base), 100))
    assert any("learning_rate" in w for w in check_config(TrainConfig(learning_rate=1e-5, **base), 100))
    # accumulation x4 with sqrt scaling puts 4e-4 on the table again
    assert check_config(TrainConfig(learning_rate=4e-4, gradient_accumulation_steps=4, **base), 1000) == []
    warns = check_config(TrainConfig(learning_rate=2e-4, epochs=2, lr_warmup_steps=100, **base), 100)
    assert any("lr_warmup_steps" in w and "50 total steps" in w for w in warns)
    assert check_config(TrainConfig(learning_rate=2e-4, epochs=2, lr_warmup_steps=100, lr_scheduler="constant",
                                    **base), 100) == []


# ----------------------------------------------------------------------------- warmup, scheduler, config dict
@pytest.mark.parametrize("count, vram, total, warmup", [(30, 8, 2010, 200), (60, 8, 1500, 100), (100, 16, 375, 38)])
def test_cosine_with_100_to_200_warmup(count, vram, total, warmup):
    s = suggest(count, "style", vram_gb=vram)
    assert s.lr_scheduler == "cosine" and s.total_steps == total and s.lr_warmup_steps == warmup
    assert s.lr_warmup_steps < s.total_steps


def test_every_setting_has_a_one_line_reason_and_config_dict_loads():
    s = suggest(120, "character", "sd1", vram_gb=12)
    expected = {"learning_rate", "text_encoder_lr", "lora_rank", "lora_alpha", "batch_size",
                "gradient_accumulation_steps", "epochs", "lr_scheduler", "lr_warmup_steps", "mixed_precision",
                "gradient_checkpointing", "cache_latents", "cache_text_embeddings"}
    assert expected <= set(s.settings)
    for key, value, reason in s.rows():
        assert reason and "\n" not in reason, key
    d = s.to_config_dict()
    assert set(d) <= KEYS and "cache_latents" not in d and d["learning_rate"] == s.learning_rate
    cfg = TrainConfig.from_dict(d)
    assert cfg.lora_rank == s.lora_rank and cfg.text_encoder_lr == s.text_encoder_lr
    assert "learning_rate" in s.table() and "why" in s.table()


def test_bad_inputs_are_rejected():
    for kw in (dict(image_count=0), dict(image_count=10, task="portrait"), dict(image_count=10, base="pixart"),
               dict(image_count=10, accumulation_scaling="cubic"), dict(image_count=10, batch_size=0)):
        with pytest.raises(ValueError):
            suggest(**kw)


# ----------------------------------------------------------------------------- diagnosis
def knobs_named(text):
    return {k for k in KEYS if re.search(rf"\b{re.escape(k)}\b", text)}


def check_one_knob(f):
    assert f.knob in KEYS
    assert knobs_named(f.suggestion) == {f.knob}, (f.suggestion, knobs_named(f.suggestion))
    assert f.severity in ("info", "warning", "error") and f.message and f.numbers


def decreasing(n, seed, noise=0.15):
    rng = random.Random(seed)
    return [(0.3 + 0.7 * math.exp(-s / 150)) * (1 + rng.gauss(0, noise)) for s in range(1, n + 1)]


@pytest.mark.parametrize("seed", range(5))
def test_clean_decreasing_noisy_curve_gives_no_finding(seed):
    assert diagnose(decreasing(800, seed), total_steps=800, learning_rate=2e-4, batch_size=4) == []


def test_clean_curve_with_diffusion_like_noise_gives_no_alarm():
    # per-step loss with the spread of random timesteps (exponential, CV 1): nothing above "info"
    rng = random.Random(0)
    losses = [(0.3 + 0.7 * math.exp(-s / 150)) * rng.expovariate(1.0) for s in range(1, 1001)]
    assert [f for f in diagnose(losses, total_steps=1000, learning_rate=2e-4) if f.severity != "info"] == []


def test_non_finite_loss():
    losses = decreasing(120, 1) + [float("nan")] * 5
    d = Diagnoser(learning_rate=2e-4, lr_warmup_steps=100)
    new = [f for i, l in enumerate(losses) for f in d.update(i + 1, l)]
    assert [f.kind for f in new] == ["non_finite"]  # once, not five times
    f = new[0]
    assert f.severity == "error" and f.knob == "learning_rate" and "halve" in f.suggestion
    assert "last good checkpoint" in f.suggestion and f.numbers["last_finite_step"] == 120
    check_one_knob(f)
    # early, without warmup: add warmup is the one knob
    f = diagnose([0.5] * 10 + [float("inf")], learning_rate=2e-4, lr_warmup_steps=0)[0]
    assert f.kind == "non_finite" and f.knob == "lr_warmup_steps"
    check_one_knob(f)


def test_divergence():
    rng = random.Random(1)
    losses = [(0.3 + 0.7 * math.exp(-s / 60)) * (1 + rng.gauss(0, 0.1)) if s < 200
              else 0.32 * math.exp((s - 200) / 80) * (1 + rng.gauss(0, 0.1)) for s in range(1, 501)]
    found = diagnose(losses, learning_rate=2e-4, batch_size=4)
    assert [f.kind for f in found] == ["divergence"]  # reported once
    f = found[0]
    assert 200 < f.step <= 350 and f.knob == "learning_rate" and "halve" in f.suggestion
    assert f.numbers["rel_change"] > 0.3
    check_one_knob(f)


def test_sudden_jump_is_divergence_at_once():
    losses = decreasing(300, 2) + [5.0] * 10
    f = diagnose(losses, learning_rate=2e-4)[-1]
    assert f.kind == "divergence" and f.step == 310 and f.severity == "error"


@pytest.mark.parametrize("lr, batch, knob", [(2e-4, 4, "learning_rate"), (1e-4, 1, "batch_size")])
def test_oscillation(lr, batch, knob):
    rng = random.Random(3)
    losses = [(0.5 + 0.2 * math.sin(2 * math.pi * s / 60)) * (1 + rng.gauss(0, 0.1)) for s in range(1, 401)]
    found = diagnose(losses, total_steps=2000, learning_rate=lr, batch_size=batch)
    assert [f.kind for f in found] == ["oscillation"]  # no plateau: raising the lr would be wrong here
    f = found[0]
    assert f.knob == knob and f.numbers["relative_spread"] >= 0.2
    check_one_knob(f)


@pytest.mark.parametrize("lr, knob", [(1e-4, "learning_rate"), (3e-4, "epochs")])
def test_early_plateau(lr, knob):
    rng = random.Random(4)
    losses = [0.5 * (1 + rng.gauss(0, 0.1)) for _ in range(300)]
    found = diagnose(losses, total_steps=1000, learning_rate=lr, epochs=10)
    assert [f.kind for f in found] == ["plateau"]
    f = found[0]
    assert f.knob == knob and f.severity == "info"
    assert ("0.5e-4" in f.suggestion) if knob == "learning_rate" else ("10 -> 15" in f.suggestion)
    check_one_knob(f)
    # a late flat stretch is convergence, not an early plateau
    assert diagnose(decreasing(1000, 4, noise=0.05), total_steps=1000, learning_rate=lr) == []


@pytest.mark.parametrize("steps_per_epoch, knob", [(50, "epochs"), (None, "max_train_steps")])
def test_overfitting(steps_per_epoch, knob):
    train = decreasing(600, 5, noise=0.1)
    val = [(s, 0.4 + 0.5 * math.exp(-s / 80) + (0.0006 * (s - 250) if s > 250 else 0)) for s in range(50, 601, 50)]
    found = diagnose(train, val, steps_per_epoch=steps_per_epoch, epochs=12)
    assert [f.kind for f in found] == ["overfitting"]
    f = found[0]
    assert f.knob == knob and f.numbers["val_min_step"] == 250
    assert ("set epochs to 5" in f.suggestion) if knob == "epochs" else ("250" in f.suggestion)
    check_one_knob(f)
    # validation rising while training also rises is not overfitting (that is divergence's business)
    rising_train = [0.3 + s / 1000 for s in range(1, 601)]
    assert not [f for f in diagnose(rising_train, val, steps_per_epoch=50) if f.kind == "overfitting"]


def test_update_returns_only_new_findings_and_summary_all():
    d = Diagnoser(learning_rate=2e-4, lr_warmup_steps=100)
    seen = []
    for i, l in enumerate(decreasing(150, 6) + [float("nan")] + decreasing(150, 7) + [float("inf")]):
        seen += d.update(i + 1, l)
    assert [f.kind for f in seen] == ["non_finite", "non_finite"]  # re-armed by the finite losses between
    assert d.summary() == seen and d.summary() is not d.findings


def test_handle_event_reads_the_trainer_stream():
    d = Diagnoser(learning_rate=2e-4)
    d.handle_event({"kind": "start", "total_steps": 400, "steps_per_epoch": 40})
    assert d.total_steps == 400 and d.steps_per_epoch == 40
    out = []
    for i, l in enumerate(decreasing(100, 8)):
        out += d.handle_event({"kind": "step", "step": i + 1, "loss": l, "lr": 2e-4})
    out += d.handle_event({"kind": "nan", "step": 101, "what": "loss", "value": float("nan")})
    assert [f.kind for f in out] == ["non_finite"]
    assert d.handle_event({"kind": "val_loss", "step": 100, "val_loss": 0.5}) == [] and d.val == [(100, 0.5)]
    assert all(isinstance(f.to_dict(), dict) for f in d.summary())
    assert "non_finite" in A.format_findings(d.summary())


# ----------------------------------------------------------------------------- CLI
def test_cli_suggest_prints_the_table(demo_data, capsys):
    assert main(["suggest", "--images", demo_data, "--task", "style", "--vram", "8"]) == 0
    out = capsys.readouterr().out
    assert "8 images" in out and "learning_rate" in out and "why" in out and "lora_rank" in out
    assert main(["suggest", "--count", "120", "--task", "face", "--base", "sdxl", "--vram", "24", "--batch", "2",
                 "--accumulation", "2", "--scaling", "linear"]) == 0
    out = capsys.readouterr().out
    assert "linear" in out and "0.0003" in out  # 1.5e-4 at batch 2, x2 linear


def test_cli_suggest_writes_a_loadable_config_and_never_overwrites(tmp_path, demo_data, capsys):
    path = tmp_path / "cfg.yaml"
    args = ["suggest", "--images", demo_data, "--task", "face", "--vram", "12", "--write", str(path)]
    assert main(args) == 0
    cfg = TrainConfig.load(str(path))
    s = suggest(8, "face", vram_gb=12)
    assert cfg.learning_rate == s.learning_rate and cfg.lora_rank == s.lora_rank and cfg.epochs == s.epochs
    assert os.path.samefile(cfg.train_data_dir, demo_data)
    text = path.read_text()
    assert "# " in text and "learning_rate" in text
    assert yaml.safe_load(text)["batch_size"] == s.batch_size
    before = path.read_text()
    capsys.readouterr()
    assert main(args) == 2
    assert "exists" in capsys.readouterr().err and path.read_text() == before


def test_cli_suggest_needs_images_or_count(capsys):
    assert main(["suggest", "--task", "style"]) == 2
    assert "--images" in capsys.readouterr().err

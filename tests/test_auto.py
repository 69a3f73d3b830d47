"""Auto mode end to end on the tiny model; refusal before any work; the epoch rule; the CLI queue."""
import os

import pytest
import yaml

from lora_train.auto import choose
from lora_train.auto.pipeline import AutoOptions, AutoRefused, run_auto
from lora_train.cli.main import main
from lora_train.data.demo import write_demo_dataset
from lora_train.hosts.standalone import StandaloneHost

FAST = dict(learning_rate=2e-3, epochs=4, save_every_n_epochs=1, lr_warmup_steps=0, lora_rank=4)


def _folder(tmp_path, n=6, captioned=3):
    data = write_demo_dataset(str(tmp_path / "data"), n=n, size=64, captions=False)
    pngs = sorted(f for f in os.listdir(data) if f.endswith(".png"))
    for f in pngs[:captioned]:
        with open(os.path.join(data, f[:-4] + ".txt"), "w", encoding="utf-8") as fh:
            fh.write("mine, hand written")
    return data, pngs


@pytest.mark.slow
def test_auto_end_to_end_on_the_tiny_model(tmp_path):
    from lora_train.models.tiny import build_tiny
    from lora_train.networks import lora as lora_mod

    data, pngs = _folder(tmp_path)
    host = StandaloneHost("tiny", str(tmp_path / "loras"))
    opts = AutoOptions(folder=data, name="mystyle", base="tiny", overrides=dict(FAST), tolerance=0.0,
                       strengths=[1.0], seeds=[1], sample_steps=2)
    res = run_auto(host, opts)
    # captions written only where missing; the hand-written ones are untouched
    for f in pngs[:3]:
        assert open(os.path.join(data, f[:-4] + ".txt"), encoding="utf-8").read() == "mine, hand written"
    for f in pngs[3:]:
        text = open(os.path.join(data, f[:-4] + ".txt"), encoding="utf-8").read()
        assert text.startswith("mystyle, a red") and "background" in text
    assert sorted(map(os.path.basename, res.captions_written)) == pngs[3:]
    # the chosen epoch is the argmin of the validation losses the trainer recorded (tolerance 0), among the epochs
    # that have a file
    csv_path = os.path.join(res.run_dir, "mystyle_loss.csv")
    recorded = choose.read_val_losses(csv_path)
    assert sorted(recorded) == [1, 2, 3, 4]
    cands = res.epoch_choice.candidates
    assert 4 in cands and set(cands) <= set(recorded)
    assert res.chosen_epoch == min(cands, key=lambda e: (recorded[e], e))
    assert res.runner_up in cands and res.runner_up != res.chosen_epoch
    # the published file is the chosen epoch's, and it loads
    lora_dir = str(tmp_path / "loras")
    assert res.lora_path == os.path.join(lora_dir, "mystyle.safetensors")
    src = os.path.join(res.run_dir, "mystyle.safetensors" if res.chosen_epoch == 4 else
                       f"mystyle-{res.chosen_epoch:06d}.safetensors")
    assert open(res.lora_path, "rb").read() == open(src, "rb").read()
    assert os.path.isfile(os.path.join(lora_dir, "mystyle-000004.safetensors"))  # the last epoch, by number
    lw = lora_mod.load_file(res.lora_path, build_tiny())
    assert lw is not None
    # grid and report
    assert res.grid_path and os.path.isfile(res.grid_path)
    report = open(res.report_path, encoding="utf-8").read()
    assert report == res.report and res.report_path == os.path.join(res.run_dir, "report.md")
    keys = {c.key for c in res.choices}
    assert {"captioner", "learning_rate", "lora_rank", "batch_size", "epochs", "validation_split", "epoch",
            "strength", "trigger_word"} <= keys
    for c in res.choices:
        assert f"`{c.key}`" in report
    assert "your choice" in report  # the overrides are marked
    assert "<lora:mystyle:" in report and "runner-up" in report and "![grid]" in report and "![loss]" in report
    lr = next(c for c in res.choices if c.key == "learning_rate")
    assert lr.user and lr.value == 2e-3 and res.config.learning_rate == 2e-3


def test_epoch_rule_noise_and_ties():
    losses = {1: 1.0, 2: 0.8, 3: 0.70, 4: 0.69, 5: 0.70, 6: 0.71}
    plain = choose.choose_epoch(losses, losses, tolerance=0)
    assert plain.chosen == 4 and plain.runner_up == 3  # exact tie 3 vs 5: the earlier
    noisy = choose.choose_epoch(losses, losses, tolerance=0.02)
    assert noisy.chosen == 3 and noisy.best_loss_epoch == 4
    auto = choose.choose_epoch(losses, losses)
    assert auto.tolerance == pytest.approx(choose.noise_sigma(list(losses.values())))
    assert losses[auto.chosen] <= min(losses.values()) + auto.tolerance
    assert all(losses[e] > min(losses.values()) + auto.tolerance for e in losses if e < auto.chosen)
    only_files = choose.choose_epoch(losses, [2, 6], tolerance=0)
    assert only_files.chosen == 6 and only_files.runner_up == 2
    with pytest.raises(ValueError):
        choose.choose_epoch(losses, [9])


def _nothing_written(tmp_path, data, before):
    assert sorted(os.listdir(data)) == before
    assert not os.path.exists(tmp_path / "loras") and not os.path.exists(tmp_path / "lora_train_runs")


def test_a_folder_that_cannot_train_is_refused_before_any_work(tmp_path, capsys):
    data, _ = _folder(tmp_path, n=2, captioned=0)
    before = sorted(os.listdir(data))
    host = StandaloneHost("tiny", str(tmp_path / "loras"))
    with pytest.raises(AutoRefused, match="at least 3"):
        run_auto(host, AutoOptions(folder=data, name="x", base="tiny"))
    _nothing_written(tmp_path, data, before)
    # an unreadable image: refused, named
    data2, _ = _folder(tmp_path / "b", n=4, captioned=0)
    with open(os.path.join(data2, "broken.png"), "wb") as fh:
        fh.write(b"not a png")
    before = sorted(os.listdir(data2))
    with pytest.raises(AutoRefused, match="broken.png"):
        run_auto(host, AutoOptions(folder=data2, name="x", base="tiny"))
    _nothing_written(tmp_path, data2, before)
    # the CLI says so in one line, exit status 2
    assert main(["auto", str(tmp_path / "nowhere"), "--name", "x", "--lora-dir", str(tmp_path / "loras")]) == 2
    err = capsys.readouterr().err
    assert "cannot train" in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "loras")


@pytest.mark.slow
def test_train_queue_goes_on_past_a_failed_run(tmp_path, demo_data, capsys):
    cfgs = []
    for name, data in (("a", demo_data), ("b", str(tmp_path / "missing")), ("c", demo_data)):
        cfg = {"train_data_dir": data, "base_model": "tiny", "output_dir": str(tmp_path / "out"), "output_name": name,
               "resolution": 64, "lora_rank": 2, "batch_size": 2, "max_train_steps": 2, "lr_warmup_steps": 0,
               "save_every_n_epochs": 0}
        p = tmp_path / f"{name}.yaml"
        p.write_text(yaml.safe_dump(cfg))
        cfgs.append(str(p))
    rc = main(["train"] + cfgs + ["--learning_rate", "1e-3"])
    assert rc == 1
    out = capsys.readouterr().out
    assert os.path.isfile(tmp_path / "out" / "a.safetensors") and os.path.isfile(tmp_path / "out" / "c.safetensors")
    assert not os.path.exists(tmp_path / "out" / "b.safetensors")
    table = out[out.index("#  config"):]
    lines = [ln for ln in table.splitlines() if ln.split()[1:2] and ln.split()[1].endswith(".yaml")]
    assert [ln.split()[2] for ln in lines] == ["done", "failed", "done"]
    assert "does not exist" in lines[1] and "2 of 3 runs succeeded, 1 failed" in table
    # all succeed -> exit status 0
    assert main(["train", cfgs[0], cfgs[2], "--output_dir", str(tmp_path / "out2")]) == 0

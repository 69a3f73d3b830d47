"""The defects a new user met in a real Forge (captioner errors written as captions, Auto failing under a step
cap, the stale Train section during Auto, the Test section ignoring the run, the plot's ticks, no sign of saving,
file-name captions, settings lost on reload, the header's host name), each checked without a WebUI. The fence and
the WebUI interrogator's printed error are in test_webui_host.py; the page script's polling there too."""
import os
import re

import pytest
from PIL import Image

from lora_train.captions import HostCaptioner, TemplateCaptioner, caption_folder
from lora_train.data.demo import write_demo_dataset
from lora_train.hosts.standalone import StandaloneHost
from lora_train.ui import jobs, logic


@pytest.fixture(autouse=True)
def _fresh(fresh_job_slot):
    yield


def _colors(tmp_path, n=3):
    folder = tmp_path / "colors"
    folder.mkdir()
    names = ["red", "blue", "green", "white"][:n]
    for i, c in enumerate(names):
        Image.new("RGB", (16, 16), c).save(folder / f"0{i + 1}_{c}.png")
    return folder


# ------------------------------------------------------------------ 1. the host captioner's error marker
@pytest.mark.parametrize("answer", ["<error>", "a photo of <error>", "", "   "])
def test_a_host_caption_that_is_an_error_or_empty_is_a_failure_and_not_written(tmp_path, answer):
    folder = _colors(tmp_path)
    rep = caption_folder(str(folder), HostCaptioner(lambda im: answer, name="Forge BLIP (interrogate)"),
                         trigger="mycolr")
    assert rep.written == [] and len(rep.failed) == 3 and not list(folder.glob("*.txt"))
    lines = rep.failure_lines()
    assert len(lines) == 1 and "(3 image(s): 01_red.png, 02_blue.png, 03_green.png)" in lines[0]
    assert "Forge BLIP (interrogate)" in lines[0] and "pick another captioner" in lines[0]
    # said once, as a sentence: the backend's name once, no exception class name
    assert lines[0].count("Forge BLIP (interrogate)") == 1 and "CaptionerError" not in lines[0], lines[0]


def test_a_real_caption_from_the_host_is_written(tmp_path):
    folder = _colors(tmp_path, 1)
    rep = caption_folder(str(folder), HostCaptioner(lambda im: "a red square"), trigger="mycolr")
    assert rep.failed == [] and (folder / "01_red.txt").read_text() == "mycolr, a red square"


# ------------------------------------------------------------------ 8. template captions from file names
def test_the_template_captioner_reads_words_not_raw_file_names(tmp_path):
    folder = _colors(tmp_path, 2)
    cap = TemplateCaptioner(trigger="mycolr")
    assert cap.caption(None, str(folder / "01_red.png")) == "mycolr, colors, red"
    assert cap.caption(None, str(folder / "red_dress_01.png")) == "mycolr, colors, red dress"
    assert cap.caption(None, str(folder / "0001.png")) == "mycolr, colors"
    assert TemplateCaptioner("{stem}").caption(None, str(folder / "01_red.png")) == "01_red"
    # the folder reads as words too (seen in Forge: `wlkstyle, walk_dataset, ...`)
    other = tmp_path / "5_walk_data-set"
    other.mkdir()
    assert cap.caption(None, str(other / "01_red.png")) == "mycolr, walk data set, red"


# ------------------------------------------------------------------ 6. the loss plot
def test_loss_plot_step_ticks_are_whole_numbers():
    from lora_train.plots import loss_plot, nice_ticks

    assert nice_ticks(1, 4, 6, integer=True) == [1, 2, 3, 4]
    assert all(t == int(t) for t in nice_ticks(1, 7, 6, integer=True))
    assert nice_ticks(1, 1000, 6, integer=True) == [200, 400, 600, 800, 1000]
    img = loss_plot([1, 2, 3, 4], [0.9, 0.8, 0.85, 0.7])
    assert img.size == (640, 320)  # not stretched to the page for four points


def test_the_tab_gets_loss_rows_for_training_and_auto_jobs():
    job = jobs.claim("auto", "colors_auto")
    job.on_train_event({"kind": "start", "total_steps": 4, "total_epochs": 1})
    for i, loss in enumerate([0.9, 0.8, 0.7, 0.6], 1):
        job.on_train_event({"kind": "step", "step": i, "epoch": 1, "loss": loss})
    job.on_train_event({"kind": "val_loss", "step": 4, "val_loss": 0.65})
    snap = job.snapshot()
    rows = logic.loss_points(snap)
    assert [r["step"] for r in rows if r["series"] == "training"] == [1, 2, 3, 4]
    assert [r["loss"] for r in rows if r["series"] == "validation"] == [0.65]
    assert logic.loss_image(snap) is not None  # 4. Auto shows its own live plot
    assert logic.job_status(snap).startswith("Auto LoRA **colors_auto**: **running** | step 4/4 | epoch 1/1")
    assert logic.job_diagnosis(snap) == "Diagnosis: nothing to report yet."


# ------------------------------------------------------------------ 7. saving is shown, the total time counts it
def test_phases_show_between_the_last_step_and_done(tmp_path, demo_data):
    host = StandaloneHost("tiny", str(tmp_path / "loras"))
    seen = []
    values = logic.default_settings(host)
    values.update(output_name="phases", max_train_steps=2, resolution=64, lora_rank=4, lora_alpha=4,
                  batch_size=2, lr_warmup_steps=0, save_every_n_epochs=0)
    cfg, spec = logic.build_config(host, values, demo_data, "sks")
    job = logic.start_training(host, cfg, spec)
    orig = job.on_train_event

    def spy(ev, h=None):
        orig(ev, h)
        seen.append((ev["kind"], job.message, logic.job_status(job.snapshot())))

    job.on_train_event = spy
    assert jobs.wait(job, 300)
    snap = job.snapshot()
    after_last = [m for k, m, _ in seen if k == "phase"]
    assert "saving the LoRA file and the loss log ..." in after_last
    assert any(m.startswith("publishing into ") for m in after_last)
    at_end = [status for k, _m, status in seen if k == "phase" and "saving" in _m]
    assert at_end and "ETA" not in at_end[0]  # not "step 2/2 | ETA 0:00" while it saves
    assert re.search(r"finished after 2 step\(s\), 1 epoch\(s\) in \d+:\d\d \(training \d+:\d\d, the rest "
                     r"loading, saving and publishing\)", snap["message"]), snap["message"]
    # 5. the Test section follows the run: its trigger word in the prompt, its resolution as the grid size
    test = logic.test_fields(snap)
    assert test == {"name": "phases", "prompt": "sks, a picture <lora:phases:1>", "tag": "<lora:phases:0.8>",
                    "size": 64}


# ------------------------------------------------------------------ 3. Auto with max steps inside the first epoch
def test_auto_with_a_step_cap_inside_the_first_epoch_publishes_what_it_trained(tmp_path):
    from lora_train.auto.pipeline import AutoOptions, run_auto

    data = write_demo_dataset(str(tmp_path / "data"), n=12, size=64, captions=True)
    host = StandaloneHost("tiny", str(tmp_path / "loras"))
    opts = AutoOptions(folder=data, name="capped", base="tiny", strengths=[1.0], seeds=[1], sample_steps=2,
                       overrides={"max_train_steps": 2, "lr_warmup_steps": 0, "batch_size": 1})
    res = run_auto(host, opts)
    assert res.train_result.steps == 2 and res.chosen_epoch == 1
    assert os.path.isfile(res.lora_path) and res.lora_path.endswith("capped.safetensors")
    assert res.config.epochs == 1  # not the advisor's epoch count the cap would never reach
    epochs = next(c for c in res.choices if c.key == "epochs")
    assert "max_train_steps 2 ends the run in epoch 1" in epochs.reason
    assert "at most 2 steps" in res.report or "max_train_steps" in res.report
    assert res.epoch_choice.losses.get(1) is not None  # the final state has its validation loss


def test_the_epoch_choice_says_why_when_no_epoch_can_be_compared():
    from lora_train.auto import choose

    with pytest.raises(choose.NoCandidate):
        choose.choose_epoch({}, [1])
    ec = choose.last_state({}, 1, "the run ended after 4 step(s): the last state is published")
    assert ec.chosen == 1 and ec.runner_up is None and "last state" in ec.why


# ------------------------------------------------------------------ 9. settings survive a page reload
def test_settings_are_remembered_for_the_next_page():
    logic.remember_setting("output_name", "colors_test")
    logic.remember_setting("resolution", 64)
    assert logic.remembered_settings() == {"output_name": "colors_test", "resolution": 64}


def test_the_tab_header_says_the_hosts_name_as_users_say_it(tmp_path):
    pytest.importorskip("gradio")
    from lora_train.ui.tab import build_tab

    host = StandaloneHost("tiny", str(tmp_path / "loras"))
    blocks = build_tab(host)
    texts = [getattr(b, "value", "") for b in blocks.blocks.values() if type(b).__name__ == "Markdown"]
    assert any("Running in **the standalone app**" in str(t) for t in texts)
    assert not any("Host: **standalone**" in str(t) for t in texts)

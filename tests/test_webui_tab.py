"""The LoRA Train tab: built (not launched) under the hosts' gradio versions, its callbacks, its job logic."""
import json
import os
import subprocess
import sys
import threading

import pytest

from lora_train.hosts.base import USED_NAMES, HostError
from lora_train.hosts.standalone import StandaloneHost
from lora_train.run import publish
from lora_train.ui import jobs, logic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIRED_IDS = {"lora_train_folder", "lora_train_gallery", "lora_train_caption", "lora_train_save_caption",
                "lora_train_autocaption", "lora_train_trigger", "lora_train_tags", "lora_train_base",
                "lora_train_lr", "lora_train_rank", "lora_train_alpha", "lora_train_batch", "lora_train_accum",
                "lora_train_epochs", "lora_train_max_steps", "lora_train_scheduler", "lora_train_warmup",
                "lora_train_optimizer", "lora_train_resolution", "lora_train_te", "lora_train_suggest",
                "lora_train_rescale_apply", "lora_train_finder", "lora_train_finder_plot", "lora_train_start",
                "lora_train_stop", "lora_train_loss", "lora_train_status", "lora_train_diagnosis",
                "lora_train_prompt", "lora_train_strengths", "lora_train_seeds", "lora_train_by_epoch",
                "lora_train_grid", "lora_train_grid_img", "lora_train_tag"}


@pytest.fixture(autouse=True)
def _fresh_job_slot(fresh_job_slot):
    yield


class SpyHost(StandaloneHost):
    """StandaloneHost that records the Host calls the tab makes."""

    def __init__(self, *a, interrupt_after=None, **kw):
        super().__init__(*a, **kw)
        self.calls = []
        self.interrupt_after = interrupt_after
        self.progress_seen = 0

    def free_memory(self):
        self.calls.append("free")

    def restore_memory(self):
        self.calls.append("restore")

    def refresh_loras(self):
        self.calls.append("refresh")
        super().refresh_loras()

    def progress(self, done, total, text=""):
        self.progress_seen = done

    def interrupted(self):
        return self.interrupt_after is not None and self.progress_seen >= self.interrupt_after


# ----------------------------------------------------------------------------- hosts' gradio, no torch
@pytest.mark.slow
@pytest.mark.frontend
@pytest.mark.parametrize("version", ["3.41.2", "4.40.0"])
def test_tab_builds_under_host_gradio(version):
    """A1111 1.10 (gradio 3.41.2) and Forge (4.40.0), each in its own cached venv with the host's pins."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import gradio_venvs

    py = gradio_venvs.ensure(version)
    env = dict(os.environ, PYTHONPATH=ROOT, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1")
    proc = subprocess.run([py, os.path.join(ROOT, "tests", "webui_build_check.py"), "a1111", "--launch"],
                          capture_output=True,
                          text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["gradio"] == version
    assert info["heavy_imports"] == [], "the tab must build without torch/diffusers (import them lazily)"
    assert REQUIRED_IDS <= set(info["elem_ids"]), REQUIRED_IDS - set(info["elem_ids"])
    assert "lora_train_send" in info["elem_ids"]
    assert sorted(info["js"]) == ["loraTrainRefreshCards", "loraTrainSendToTxt2img"]
    assert info["dependencies"] >= 20
    # in the WebUI the page's script polls (a hidden button), never a server-side `every=` timer
    assert "lora_train_poll" in info["elem_ids"]
    assert_ui_config_keys(info["ui_config_keys"], info["ui_config_duplicates"])
    # launched with the queue on (as the WebUI does), the page and its config are served
    assert info["served"]["/"][0] == 200 and info["served"]["/config"] == [200, info["served"]["/config"][1], True]


def assert_ui_config_keys(keys, dupes):
    """What the WebUI would freeze into ui-config.json: one key per field (two "Steps" fields used to share a
    key, so the Test section showed the LR finder's 100 steps), no run-to-run values (last LoRA, loaded model)."""
    assert dupes == []
    assert "lora_train/LR finder steps/value" in keys and "lora_train/Sampling steps/value" in keys
    volatile = ("Prompt", "Tag to use", "LoRA/value", "Base model")
    assert not [k for k in keys if any(v in k for v in volatile)], keys


# ----------------------------------------------------------------------------- current gradio, real callbacks
def _fn(blocks, name):
    fns = blocks.fns.values() if isinstance(blocks.fns, dict) else blocks.fns
    found = [f.fn for f in fns if getattr(f.fn, "__name__", "") == name]
    assert found, f"no event handler {name}"
    return found[0]


def _val(u):
    return u.get("value") if isinstance(u, dict) else u


@pytest.mark.slow
@pytest.mark.frontend
def test_tab_current_gradio_builds_and_suggest_fills_fields(tmp_path, demo_data):
    gr = pytest.importorskip("gradio")
    from lora_train.ui import build_tab

    host = StandaloneHost("tiny", str(tmp_path / "loras"))
    blocks = build_tab(host)
    assert isinstance(blocks, gr.Blocks)
    cfg = blocks.get_config_file() if hasattr(blocks, "get_config_file") else blocks.config
    ids = {c["props"].get("elem_id") for c in cfg["components"]}
    assert REQUIRED_IDS <= ids
    assert "lora_train_send" not in ids and "lora_train_send_note" in ids  # no dead button outside the WebUI

    load = _fn(blocks, "do_load")
    out = load(demo_data)
    assert out[0] == os.path.realpath(demo_data) and len(out[1]) == 8 and len(out[2]) == 8
    assert "8 image(s), 8 with a caption" in out[3]

    suggest = _fn(blocks, "do_suggest")
    vals = [logic.default_settings(host)[k] for k in logic.SETTING_KEYS]
    res = suggest(out[0], "", "style", 0, *vals)
    fields = dict(zip(logic.SUGGEST_FIELDS, res[:len(logic.SUGGEST_FIELDS)]))
    from lora_train.tuning.advisor import suggest as advise

    expect = advise(8, task="style", base="sd1", resolution=64)
    assert _val(fields["learning_rate"]) == expect.learning_rate
    assert _val(fields["lora_rank"]) == expect.lora_rank
    assert _val(fields["resolution"]) == 64
    md = res[len(logic.SUGGEST_FIELDS) + 1]
    assert "| learning_rate |" in md and "8 image(s)" in md
    assert res[len(logic.SUGGEST_FIELDS) + 2] == [expect.batch_size, expect.gradient_accumulation_steps]
    # epoch files: about 10 at most (100 epochs saved every epoch would be 100 files)
    every = _val(fields["save_every_n_epochs"])
    assert every == expect.save_every_n_epochs and expect.epochs / every <= 10
    # the note names the tab's VRAM field, not the CLI flag
    assert "--vram" not in md and "VRAM GB for the advice" in md

    # what the WebUI would save into ui-config.json (current gradio here; 3.41 / 4.40 in the test above)
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import webui_build_check

    assert_ui_config_keys(*webui_build_check.ui_config_keys(blocks, "lora_train"))

    # bad input: a message, not an exception
    res = suggest("", "", "style", 0, *vals)
    assert "dataset folder first" in res[len(logic.SUGGEST_FIELDS) + 1]

    offer = _fn(blocks, "do_offer")
    text, btn = offer(1e-4, 4, 2, [1, 1])
    assert "2.83e-4" in text.replace("0.000283", "2.83e-4") and btn["visible"] is True
    apply = _fn(blocks, "do_apply_rescale")
    lr, basis, msg, btn = apply(1e-4, 4, 2, [1, 1])
    assert _val(lr) == pytest.approx(2.83e-4) and basis == [4, 2] and btn["visible"] is False


# ----------------------------------------------------------------------------- logic (no gradio)
def test_rescale_offer_only_when_effective_batch_changes():
    assert logic.rescale_offer(1e-4, [2, 1], 2, 1) == (None, "")
    assert logic.rescale_offer(1e-4, [2, 1], 1, 2)[0] is None  # same effective batch
    new, text = logic.rescale_offer(1e-4, [1, 1], 4, 1)
    assert new == pytest.approx(2e-4) and "batch 1 x accumulation 1" in text


def test_dataset_captions_tags_and_path_checks(tmp_path, demo_data):
    host = StandaloneHost("tiny", str(tmp_path / "loras"), roots=[str(tmp_path)])
    real = logic.dataset_folder(host, demo_data)
    rows = logic.caption_rows(real)
    assert len(rows) == 8 and all(src == "txt" for _p, _c, src in rows)
    first = rows[0][0]
    msg = logic.save_caption(real, first, "  new   caption, blue  ")
    assert "saved" in msg
    with open(os.path.splitext(first)[0] + ".txt", encoding="utf-8") as fh:
        assert fh.read() == "new caption, blue"
    assert not [n for n in os.listdir(real) if n.endswith(".tmp")]
    table = logic.tag_table(real)
    assert "| count | tag |" in table and "| 1 | new caption |" in table
    with pytest.raises(HostError, match="outside the folders"):
        logic.dataset_folder(host, "/")
    with pytest.raises(HostError, match="does not exist"):
        logic.dataset_folder(host, str(tmp_path / "nope"))
    msg = logic.auto_caption(host, real, "template", "", "skip", "zzstyle")
    assert "skipped 8" in msg


def test_build_config_new_name_each_run(tmp_path, demo_data):
    host = StandaloneHost("tiny", str(tmp_path / "loras"))
    values = dict(logic.default_settings(host), output_name="style")
    cfg, spec = logic.build_config(host, values, demo_data, "zz")
    assert spec is None and cfg.base_model == "tiny" and cfg.output_name == "style"
    assert cfg.output_dir == os.path.join(host.runs_dir(), "style")  # logs + state: not in the LoRA folder
    assert cfg.resolution == 64 and cfg.trigger_word == "zz"
    os.makedirs(host.output_dir(), exist_ok=True)
    open(os.path.join(host.output_dir(), "style.safetensors"), "wb").close()
    assert logic.build_config(host, values, demo_data, "")[0].output_name == "style_v2"
    USED_NAMES.add("style_v2")  # written earlier in this process, then deleted: still never reused
    assert logic.build_config(host, values, demo_data, "")[0].output_name == "style_v3"
    with pytest.raises(logic.UserError, match="LoRA name"):
        logic.build_config(host, dict(values, output_name="a/b"), demo_data, "")
    with pytest.raises(logic.UserError, match="learning rate"):
        logic.build_config(host, dict(values, learning_rate=-1), demo_data, "")
    with pytest.raises(logic.UserError, match="dataset folder first"):
        logic.build_config(host, values, "", "")


@pytest.mark.slow
def test_training_job_refuses_second_start_then_grid(tmp_path, demo_data):
    host = SpyHost("tiny", str(tmp_path / "loras"))
    values = dict(logic.default_settings(host), output_name="t", max_train_steps=3, epochs=1, lr_warmup_steps=0,
                  save_every_n_epochs=0, batch_size=2, learning_rate=1e-3, lora_rank=4, lora_alpha=4)
    cfg, spec = logic.build_config(host, values, demo_data, "")
    job = logic.start_training(host, cfg, spec)
    cfg2, _ = logic.build_config(host, values, demo_data, "")
    with pytest.raises(jobs.JobBusy, match="training 't' is running"):
        logic.start_training(host, cfg2, None)
    assert jobs.current() is job  # state in Python: any page polling sees this job
    assert jobs.wait(job, 300)
    snap = job.snapshot()
    assert snap["status"] == "done", snap["error"]
    assert snap["steps"] == [1, 2, 3] and len(snap["losses"]) == 3
    assert os.path.isfile(os.path.join(host.output_dir(), "t.safetensors")) and snap["lora_path"].endswith("t.safetensors")
    assert host.calls == ["free", "restore", "refresh"]
    assert sorted(os.listdir(host.output_dir())) == ["t.safetensors"]  # only LoRA files in the LoRA folder
    assert os.path.isfile(os.path.join(host.runs_dir(), "t", "t.yaml"))
    status = logic.job_status(snap)
    assert "**done**" in status and "step 3/3" in status and "VRAM" in status
    # the diagnosis shown is the Trainer's own (its `diagnosis` events), the same as the result's findings
    from lora_train.tuning.advisor import Finding

    assert snap["findings"] == [str(Finding(**f)) for f in snap["result"].findings]
    diag = logic.job_diagnosis(snap)
    # the demo's captions repeat (3 per caption): the caption checks' warnings show there too
    assert all(f in diag for f in snap["findings"]) and (snap["findings"] or diag == "Diagnosis: no problem found."
                                                         or "same caption" in diag)
    assert logic.loss_image(snap).size[0] > 100
    assert logic.lora_names(host) == ["t"]
    # a second run gets a new name
    assert logic.build_config(host, values, demo_data, "")[0].output_name == "t_v2"

    img, msg = logic.run_grid(host, "a picture", "", "t", "1", "3", False, 2, 7.0, 64)
    assert "1 row(s) x 2 column(s)" in msg and "base (0)" in msg and "seed 3" in msg
    assert img.size[0] >= 128 and img.size[1] >= 64
    with pytest.raises(logic.UserError, match="unknown LoRA"):
        logic.run_grid(host, "a picture", "", "nope", "1", "1", False, 2, 7.0, 64)


@pytest.mark.slow
def test_host_interrupt_stops_and_saves(tmp_path, demo_data):
    host = SpyHost("tiny", str(tmp_path / "loras"), interrupt_after=1)
    values = dict(logic.default_settings(host), output_name="s", max_train_steps=50, epochs=1, lr_warmup_steps=0,
                  save_every_n_epochs=0, batch_size=1, lora_rank=4, lora_alpha=4)
    cfg, spec = logic.build_config(host, values, demo_data, "")
    job = logic.start_training(host, cfg, spec)
    assert jobs.wait(job, 300)
    snap = job.snapshot()
    assert snap["status"] == "stopped", snap
    assert 1 <= snap["step"] < 50
    assert os.listdir(host.output_dir()) == ["s.safetensors"]
    assert os.path.isdir(os.path.join(host.runs_dir(), "s", "state"))  # resumable, outside the LoRA folder
    assert host.calls == ["free", "restore", "refresh"]


@pytest.mark.slow
def test_failed_job_restores_host_memory_and_frees_slot(tmp_path, demo_data):
    class Broken(SpyHost):
        def base_model(self, spec=None):
            raise HostError("no checkpoint loaded")

    host = Broken("tiny", str(tmp_path / "loras"))
    cfg, spec = logic.build_config(host, dict(logic.default_settings(host), output_name="b"), demo_data, "")
    job = logic.start_training(host, cfg, spec)
    assert jobs.wait(job, 60)
    assert job.status == "failed" and "no checkpoint loaded" in job.error
    assert host.calls == ["free", "restore"]
    assert jobs.running() is None
    assert "**Error:** no checkpoint loaded" in logic.job_status(job.snapshot())  # our error: its message alone


def test_job_slot_is_shared_and_threads_see_it():
    job = jobs.claim("grid")
    seen = []
    t = threading.Thread(target=lambda: seen.append(jobs.current()))
    t.start()
    t.join()
    assert seen == [job]
    with pytest.raises(jobs.JobBusy):
        jobs.claim("train", "x")
    jobs.finish(job, "done")
    assert jobs.claim("train", "x").kind == "train"


@pytest.mark.slow
def test_lr_finder_holds_the_slot_and_frees_host_memory(tmp_path, demo_data):
    host = SpyHost("tiny", str(tmp_path / "loras"))
    values = dict(logic.default_settings(host), batch_size=2, lora_rank=4, lora_alpha=4)
    cfg, spec = logic.build_config(host, values, demo_data, "", name_override="lr_finder")
    res = logic.run_lr_finder(host, cfg, spec, 4)
    assert len(res.lrs) == 4 and res.plot.size[0] > 100 and res.suggested_lr > 0
    assert host.calls == ["free", "restore"]
    assert jobs.current().kind == "lr_find" and jobs.running() is None
    assert not os.path.exists(host.output_dir()) or os.listdir(host.output_dir()) == []
    with pytest.raises(logic.UserError, match="whole number >= 2"):
        logic.run_lr_finder(host, cfg, spec, 1)


def test_publish_never_overwrites(tmp_path):
    src = tmp_path / "run" / "x.safetensors"
    src.parent.mkdir()
    src.write_bytes(b"new")
    dest_dir = tmp_path / "loras"
    dest_dir.mkdir()
    (dest_dir / "x.safetensors").write_bytes(b"old")
    written, problems = publish([str(src), None], str(dest_dir))
    assert written == [] and "was not replaced" in problems[0]
    assert (dest_dir / "x.safetensors").read_bytes() == b"old"
    (dest_dir / "x.safetensors").unlink()
    assert publish([str(src)], str(dest_dir))[0] == [str(dest_dir / "x.safetensors")]
    assert (dest_dir / "x.safetensors").read_bytes() == b"new"


def test_suggest_keeps_epoch_files_to_about_ten():
    from lora_train.tuning.advisor import save_every_for, suggest

    for epochs in (1, 5, 10, 11, 30, 100, 400):
        every = save_every_for(epochs)
        assert 1 <= every <= max(1, -(-epochs // 10)) and epochs // every <= 10
    s = suggest(12, task="character", base="sd1", vram_gb=8)
    assert s.save_every_n_epochs == save_every_for(s.epochs) and "epoch file" in s.reason("save_every_n_epochs")
    s = suggest(12, task="style", base="sd1")  # VRAM unknown: the CLI's note names its flag
    assert any("--vram GB" in n for n in s.notes) or s.inputs["vram_gb"] is not None

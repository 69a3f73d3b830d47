"""The tab's Auto button, queue and presets: logic without gradio (queue order, cancel, one at a time, reload
from queue.json, ETA), and the section's handlers in the current gradio."""
import json
import os

import pytest

from lora_train.hosts.standalone import StandaloneHost
from lora_train.ui import autorun, jobs, logic
from lora_train.ui import queue as queue_mod


@pytest.fixture(autouse=True)
def _fresh_job_slot(fresh_job_slot):
    queue_mod._QUEUES.clear()
    yield


def _values(host, **kw):
    return dict(logic.default_settings(host), max_train_steps=2, epochs=1, lr_warmup_steps=0, save_every_n_epochs=0,
                batch_size=2, learning_rate=1e-3, lora_rank=2, lora_alpha=2, **kw)


@pytest.mark.slow
def test_queue_runs_in_order_one_at_a_time_and_survives_a_reload(tmp_path, demo_data):
    host = StandaloneHost("tiny", str(tmp_path / "loras"))
    started = []

    def start(cfg, spec):
        assert jobs.running() is None  # one at a time: the slot is free when the next one starts
        started.append(cfg.output_name)
        return logic.start_training(host, cfg, spec)

    q = queue_mod.queue_for(host, start)
    ids = {}
    for name in ("a", "b", "c", "d"):
        cfg, spec = logic.build_config(host, _values(host, output_name=name), demo_data, "")
        ids[name] = q.add(cfg, spec)["id"]
    q.move(ids["c"], -1)          # a c b d
    q.remove(ids["d"])            # a c b
    q.cancel(ids["b"])            # not run
    assert [e["name"] for e in q.entries] == ["a", "c", "b"]
    # a reloaded page (or a new process) reads the same queue from queue.json
    saved = json.load(open(q.path, encoding="utf-8"))
    assert [e["name"] for e in saved["entries"]] == ["a", "c", "b"] and saved["entries"][2]["status"] == "cancelled"
    q.start()
    q.wait(600)
    assert started == ["a", "c"]
    assert [e["status"] for e in q.entries] == ["done", "done", "cancelled"]
    assert os.path.isfile(os.path.join(host.output_dir(), "a.safetensors"))
    assert os.path.isfile(os.path.join(host.output_dir(), "c.safetensors"))
    assert not os.path.exists(os.path.join(host.output_dir(), "b.safetensors"))
    # ETA of a newly queued run from the speed measured
    cfg, spec = logic.build_config(host, _values(host, output_name="e"), demo_data, "")
    q.add(cfg, spec)
    assert q.eta_seconds() is not None and q.eta_seconds() > 0
    rows = q.table()
    assert [r[2] for r in rows] == ["a", "c", "b", "e"] and rows[3][3] == "queued"
    # an entry that was running when the process ended comes back as interrupted, then runs again on Start
    data = json.load(open(q.path, encoding="utf-8"))
    data["entries"][3]["status"] = "running"
    open(q.path, "w", encoding="utf-8").write(json.dumps(data))
    q2 = queue_mod.RunQueue(q.path, start)
    assert q2.entries[3]["status"] == "interrupted"
    with pytest.raises(KeyError):
        q2.remove("nope")


@pytest.mark.slow
def test_a_failing_queue_entry_does_not_stop_the_queue(tmp_path, demo_data):
    host = StandaloneHost("tiny", str(tmp_path / "loras"))
    q = queue_mod.queue_for(host, lambda cfg, spec: logic.start_training(host, cfg, spec))
    for name, data in (("a", demo_data), ("b", demo_data), ("c", demo_data)):
        cfg, spec = logic.build_config(host, _values(host, output_name=name), data, "")
        q.add(cfg, spec)
    q.entries[1]["config"]["train_data_dir"] = str(tmp_path / "gone")  # its folder vanished since it was added
    q.start()
    q.wait(600)
    assert [e["status"] for e in q.entries] == ["done", "failed", "done"]
    assert "gone" in q.entries[1]["message"]


def test_overrides_are_the_fields_the_user_changed(tmp_path):
    host = StandaloneHost("tiny", str(tmp_path / "loras"))
    vals = dict(logic.default_settings(host), learning_rate=5e-3, epochs=3.0)
    assert autorun.overrides_from_fields(host, vals) == {"learning_rate": 5e-3, "epochs": 3}
    assert autorun.overrides_from_fields(host, logic.default_settings(host)) == {}


@pytest.mark.frontend
def test_auto_section_presets_and_queue_handlers(tmp_path, demo_data):
    pytest.importorskip("gradio")
    from lora_train.ui import build_tab

    host = StandaloneHost("tiny", str(tmp_path / "loras"))
    blocks = build_tab(host)
    cfg = blocks.get_config_file() if hasattr(blocks, "get_config_file") else blocks.config
    ids = {c["props"].get("elem_id") for c in cfg["components"]}
    assert {"lora_train_auto", "lora_train_auto_report", "lora_train_queue", "lora_train_queue_add",
            "lora_train_preset", "lora_train_preset_save"} <= ids

    def fn(name):
        found = [f.fn for f in blocks.fns.values() if getattr(f.fn, "__name__", "") == name] \
            if isinstance(blocks.fns, dict) else [f.fn for f in blocks.fns if getattr(f.fn, "__name__", "") == name]
        assert found, name
        return found[0]

    vals = [_values(host, output_name="p")[k] for k in logic.SETTING_KEYS]
    # presets: save the fields, load them back into the fields
    pick, msg = fn("do_save_preset")("mine", *vals)
    assert "Saved" in msg and "mine" in pick["choices"]
    out = fn("do_load_preset")("mine", *vals)
    loaded = dict(zip(logic.SETTING_KEYS, out[:-1]))
    assert loaded["learning_rate"]["value"] == 1e-3 and loaded["lora_rank"]["value"] == 2
    assert "Loaded" in out[-1]
    out = fn("do_load_preset")("builtin: character / sdxl", *vals)
    assert dict(zip(logic.SETTING_KEYS, out[:-1]))["resolution"]["value"] == 1024
    # queue: add the current settings
    table, msg = fn("do_queue_add")(demo_data, "", *vals)
    assert "Added" in msg and table[0][2] == "p" and table[0][3] == "queued"
    # auto: bad input is a message
    assert "dataset folder first" in fn("do_auto")("", "", "style", 0, False, *vals)

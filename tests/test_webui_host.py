"""WebUIHost / ForgeHost and scripts/lora_train_tab.py against the fake WebUI in tests/fake_webui/ (the API
surface of A1111 1.10.1 and Forge that we use): memory moves and restore on error/stop, in-memory weights,
LoRA folder and list refresh, stale caches, txt2img through processing, interrupt, one job at a time, paths."""
import importlib
import os
import shutil
import sys
import threading
import time
import types

import pytest
import torch

from lora_train.hosts.base import HostError

HERE = os.path.dirname(os.path.abspath(__file__))
FAKE = os.path.join(HERE, "fake_webui")
ROOT = os.path.dirname(HERE)


def _purge():
    for name in list(sys.modules):
        if name in ("modules", "networks", "backend", "fake_model", "forge_sd_models") or \
                name.startswith(("modules.", "backend.")):
            del sys.modules[name]


@pytest.fixture(scope="module")
def tiny_ldm():
    from ldm_writers import to_original_state_dict
    from lora_train.models.tiny import build_tiny

    tiny = build_tiny()
    return tiny, {k: v.detach().clone() for k, v in to_original_state_dict(tiny).items()}


def _make_webui(tmp_path, monkeypatch, tiny_ldm, flavour, hashed=True):
    from ldm_writers import write_original_checkpoint

    tiny, ldm = tiny_ldm
    root = tmp_path / "webui"
    (root / "models" / "Stable-diffusion").mkdir(parents=True)
    monkeypatch.setenv("FAKE_WEBUI_ROOT", str(root))
    monkeypatch.setenv("FAKE_WEBUI_DATA", str(root))
    _purge()
    paths = [os.path.join(FAKE, "common"), os.path.join(FAKE, flavour)]
    for p in reversed(paths):
        sys.path.insert(0, p)
    if flavour == "forge":
        import forge_sd_models
        import modules

        sys.modules["modules.sd_models"] = forge_sd_models
        modules.sd_models = forge_sd_models
    import fake_model
    from modules import sd_models, shared

    ckpt = str(root / "models" / "Stable-diffusion" / "tiny.safetensors")
    write_original_checkpoint(tiny, ckpt)
    info = fake_model.CheckpointInfo(ckpt, hashed=hashed)
    info.register(sd_models.checkpoints_list)
    model = fake_model.FakeForgeEngine(dict(ldm), info) if flavour == "forge" else fake_model.FakeSDModel(dict(ldm), info)
    sd_models.model_data.set_sd_model(model)
    import networks  # noqa: F401  (the WebUI imports the Lora extension at start-up)
    from lora_train.hosts import webui as host_webui

    host = host_webui.make_host()
    host.model_config = tiny  # the fake holds the tiny architecture, not SD1.5's
    return types.SimpleNamespace(root=root, host=host, model=model, info=info, ckpt=ckpt, shared=shared,
                                 sd_models=sd_models, networks=sys.modules["networks"], tiny=tiny, ldm=ldm,
                                 hw=host_webui, paths=paths)


@pytest.fixture(params=["a1111", "forge"])
def webui(request, tmp_path, monkeypatch, tiny_ldm):
    w = _make_webui(tmp_path, monkeypatch, tiny_ldm, request.param)
    yield w
    for p in w.paths:
        sys.path.remove(p)
    _purge()


@pytest.fixture
def a1111(tmp_path, monkeypatch, tiny_ldm):
    w = _make_webui(tmp_path, monkeypatch, tiny_ldm, "a1111")
    yield w
    for p in w.paths:
        sys.path.remove(p)
    _purge()


def _fake_lora(path, value):
    """A file the fake Lora loader reads: its effect is the sum of the lora_up weights (= value)."""
    from safetensors.torch import save_file

    save_file({"lora_unet_x.lora_up.weight": torch.full((1, 1), float(value)),
               "lora_unet_x.lora_down.weight": torch.ones(1, 1), "lora_unet_x.alpha": torch.tensor(1.0)},
              str(path), metadata={"ss_output_name": os.path.splitext(os.path.basename(str(path)))[0]})


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# ------------------------------------------------------------------ detection, folders, checkpoints
def test_detects_the_host_and_its_folders(webui):
    h, root = webui.host, webui.root
    assert type(h).__name__ == ("ForgeHost" if webui.host.name == "forge" else "WebUIHost")
    assert h.lora_dirs()[0] == str(root / "models" / "Lora")
    assert h.loaded_checkpoint() == (webui.info.title, webui.ckpt)
    assert h.checkpoints() == {webui.info.title: webui.ckpt}
    # --lora-dir honoured
    webui.shared.cmd_opts.lora_dir = str(root / "elsewhere")
    assert h.lora_dirs()[0] == str(root / "elsewhere") and h.output_dir() == str(root / "elsewhere")


@pytest.mark.slow
def test_base_model_from_the_loaded_weights(webui):
    """A1111: shared.sd_model.state_dict() (ldm, `.wrapped.` text encoder); Forge: forge_objects' modules."""
    bm = webui.host.base_model(None)
    _same_weights(bm.unet, webui.tiny.unet)
    _same_weights(bm.vae, webui.tiny.vae)
    _same_weights(bm.text_encoder, webui.tiny.text_encoder)
    assert bm.path == webui.ckpt
    # the loaded checkpoint named by its title or file is the same thing
    _same_weights(webui.host.base_model(webui.info.title).unet, webui.tiny.unet)


def test_a1111_weights_are_read_without_a_merged_lora(a1111):
    """A1111 merges a LoRA used in the last generation into the weights; reading them puts the backup back."""
    from lora_train.sampler import GenParams

    _fake_lora(a1111.root / "models" / "Lora" / "style.safetensors", 3.0)
    a1111.host.refresh_loras()
    a1111.host.generate(GenParams(prompt="a cat <lora:style:1>", steps=2, width=64, height=64))
    assert a1111.model.unet_value() == pytest.approx(3.0)
    a1111.host.loaded_state_dict()
    assert a1111.model.unet_value() == 0.0 and a1111.model.probe_unet.network_current_names == ()


def test_forge_reads_the_file_when_a_lora_is_patched_in(tmp_path, monkeypatch, tiny_ldm):
    w = _make_webui(tmp_path, monkeypatch, tiny_ldm, "forge")
    try:
        calls = []
        real = w.host._load_file
        monkeypatch.setattr(w.host, "_load_file", lambda path: calls.append(path) or real(path))
        w.model.current_lora_hash = "[['x.safetensors', 1.0, 1.0]]"
        w.host.base_model(None)
        assert calls == [w.ckpt]
        calls.clear()
        w.model.current_lora_hash = "[]"
        w.host.base_model(None)
        assert calls == []  # from memory
        w.model.forge_objects.unet.model.storage_dtype = "nf4"  # quantized storage: the file again
        w.host.base_model(None)
        assert calls == [w.ckpt]
    finally:
        for p in w.paths:
            sys.path.remove(p)
        _purge()


def test_no_checkpoint_loaded_is_a_clear_error(a1111):
    a1111.sd_models.model_data.sd_model = None
    with pytest.raises(Exception, match="no checkpoint loaded"):
        a1111.host.base_model(None)


# ------------------------------------------------------------------ memory
def test_memory_moves_and_restore_on_error(webui):
    """What the tab's own job code does (`with host.memory_freed(): host.base_model(None) ...`): the WebUI's GPU
    queue is held, its job state shows us, generation is refused, and all is given back on error."""
    from lora_train.sampler import GenParams
    from modules import call_queue

    h = webui.host
    with pytest.raises(RuntimeError, match="boom"):
        with h.memory_freed():
            assert call_queue.held() and webui.shared.state.job == "lora_train"
            with pytest.raises(webui.hw.HostError, match="using the GPU"):
                h.generate(GenParams(prompt="x"))
            raise RuntimeError("boom")
    assert not call_queue.held() and webui.shared.state.history[-1] == ("end", "lora_train")
    h.generate(GenParams(prompt="x", steps=1, width=64, height=64))  # usable again
    if h.name == "forge":
        from backend import memory_management

        assert memory_management.calls[:2] == ["unload_all_models", "soft_empty_cache"]
        assert webui.sd_models.calls[0] == "forge_model_reload"  # the A1111 stubs are never relied on
        assert "send_model_to_device(stub)" not in webui.sd_models.calls
    else:
        assert webui.sd_models.calls[:3] == ["unload_model_weights", "send_model_to_cpu", "send_model_to_device"]
        assert webui.model.moves[:2] == ["cpu", "cpu"]  # to the CPU, then back to shared.device (cpu in the fake)


# ------------------------------------------------------------------ training job (the tab's one path)
def _tab_train(host, data, name, steps, wait=True, **settings):
    """What Start training does in the tab: the Settings fields -> build_config -> start_training (the one
    train-and-publish path, `lora_train.run.train_for_host`), in the job thread; returns the job."""
    from lora_train.ui import jobs, logic

    values = logic.default_settings(host)  # base model: the WebUI's loaded checkpoint, as the field shows it
    values.update(output_name=name, max_train_steps=steps, resolution=64, lora_rank=4, lora_alpha=4,
                  learning_rate=1e-3, batch_size=2, lr_warmup_steps=0, save_every_n_epochs=0, seed=5)
    values.update(settings)
    cfg, spec = logic.build_config(host, values, data, "")
    job = logic.start_training(host, cfg, spec)
    if wait:
        assert jobs.wait(job, 300)
    return job


@pytest.fixture(autouse=True)
def _fresh_job_slot(fresh_job_slot):
    yield


@pytest.mark.slow
def test_training_job_end_to_end(webui, demo_data):
    """Loaded checkpoint (from the WebUI's memory) -> train -> file in the LoRA folder, list refreshed, memory given
    back, progress in shared.state, run folder outside the LoRA folder, a second run gets a new name."""
    from lora_train.sampler import GenParams

    h = webui.host
    job = _tab_train(h, demo_data, "mystyle", 2)
    assert job.status == "done", job.error
    lora_dir = h.lora_dirs()[0]
    assert job.files == [os.path.join(lora_dir, "mystyle.safetensors")] == [job.lora_path]
    assert os.listdir(lora_dir) == ["mystyle.safetensors"]  # only LoRA files there
    assert job.result.output_dir.startswith(str(webui.root / "outputs" / "lora_train"))
    assert "mystyle" in webui.networks.available_networks
    assert ("begin", "lora_train") in webui.shared.state.history and webui.shared.state.history[-1][0] == "end"
    assert webui.shared.state.sampling_steps == 2 and webui.shared.state.sampling_step == 2
    if h.name == "a1111":
        assert webui.sd_models.calls[-1] == "send_model_to_device"
    else:
        assert webui.sd_models.calls[-1] == "forge_model_reload"
    # the WebUI's own txt2img + LoRA loader sees the new file at once, with its real weights
    from safetensors.torch import load_file

    expect = sum(float(v.sum()) for k, v in load_file(job.lora_path).items() if k.endswith("lora_up.weight"))
    assert expect != 0.0
    h.generate(GenParams(prompt="a photo <lora:mystyle:0.8>", seed=3, steps=4, width=64, height=64))
    from modules import processing

    assert processing.last["loras"] == [("mystyle", 0.8)]
    assert processing.last["unet"] == pytest.approx(0.8 * expect, rel=1e-5, abs=1e-7)
    # a second run with the same name is saved under a new one (hosts cache LoRAs by name)
    job2 = _tab_train(h, demo_data, "mystyle", 1)
    assert os.path.basename(job2.lora_path) == "mystyle_v2.safetensors" and job2.name == "mystyle_v2"


@pytest.mark.slow
def test_restore_on_training_error(webui, demo_data, monkeypatch):
    h = webui.host
    import lora_train.run as run_mod

    real = run_mod.Trainer

    class Exploding(real):
        def __init__(self, *a, **k):
            k["loss_hook"] = lambda step, loss: (_ for _ in ()).throw(RuntimeError("CUDA out of memory (simulated)"))
            super().__init__(*a, **k)

    monkeypatch.setattr(run_mod, "Trainer", Exploding)
    job = _tab_train(h, demo_data, "bad", 2)
    assert job.status == "failed" and "simulated" in job.error
    if h.name == "a1111":
        assert webui.sd_models.calls[-1] == "send_model_to_device"
    else:
        assert webui.sd_models.calls[-1] == "forge_model_reload"
    assert webui.shared.state.history[-1][0] == "end"
    from lora_train.ui import jobs

    assert jobs.running() is None  # the slot is free again
    assert os.listdir(h.lora_dirs()[0]) == []  # nothing half-written in the LoRA folder


@pytest.mark.slow
def test_interrupt_button_stops_training_and_saves(a1111, demo_data):
    h = a1111.host
    job = _tab_train(h, demo_data, "stopme", 50, wait=False)
    from lora_train.ui import jobs

    deadline = time.time() + 120
    while job.step < 1 and job.running and time.time() < deadline:
        time.sleep(0.05)
    a1111.shared.state.interrupt()  # the WebUI's Interrupt button
    assert jobs.wait(job, 120)
    assert job.status == "stopped" and job.result.stopped and job.result.steps < 50
    assert job.lora_path and os.path.isfile(job.lora_path)
    assert a1111.sd_models.calls[-1] == "send_model_to_device"


@pytest.mark.slow
def test_one_job_at_a_time(a1111, demo_data, monkeypatch):
    from lora_train.ui import jobs

    h = a1111.host
    gate, release = threading.Event(), threading.Event()
    real = jobs.Job.on_train_event

    def hold(self, ev, host=None):
        real(self, ev, host)
        if ev["kind"] == "step":
            gate.set()
            release.wait(30)

    monkeypatch.setattr(jobs.Job, "on_train_event", hold)
    job = _tab_train(h, demo_data, "first", 3, wait=False)
    assert gate.wait(60), job.error
    assert jobs.current() is job and job.running
    with pytest.raises(jobs.JobBusy, match="training 'first' is running"):
        _tab_train(h, demo_data, "second", 1)
    from lora_train.sampler import GenParams

    with pytest.raises(HostError, match="training run is using the GPU"):
        h.generate(GenParams(prompt="x"))
    from modules import call_queue

    assert call_queue.held()  # a txt2img the user starts now waits for the WebUI's GPU queue
    release.set()
    assert jobs.wait(job, 120) and job.status == "done", job.error
    assert os.path.isfile(os.path.join(h.lora_dirs()[0], "first.safetensors"))


# ------------------------------------------------------------------ stale caches (issue 5 item 6)
def test_stale_lora_cache_is_what_the_host_does_and_invalidate_fixes_it(webui):
    """A file rewritten under the same name: the WebUI shows the old weights at the same name and strength
    (A1111: per-layer names unchanged; Forge: lru_cache by file name) until our invalidation."""
    from lora_train.sampler import GenParams
    from modules import processing

    h = webui.host
    f = webui.root / "models" / "Lora" / "same.safetensors"
    _fake_lora(f, 1.0)
    h.refresh_loras()
    p = GenParams(prompt="a dog <lora:same:1>", steps=2, width=64, height=64)
    h.generate(p)
    assert processing.last["unet"] == pytest.approx(1.0) and processing.last["cond"] == pytest.approx(1.0)
    _fake_lora(f, 5.0)
    st = os.stat(f)
    os.utime(f, (st.st_atime, st.st_mtime + 10))
    h.generate(p)
    assert processing.last["unet"] == pytest.approx(1.0)  # stale: the host's own behaviour, as in the real WebUI
    assert processing.last["cond"] == pytest.approx(1.0)  # and the conditioning cache too
    h.invalidate_lora_caches()
    h.generate(p)
    assert processing.last["unet"] == pytest.approx(5.0) and processing.last["cond"] == pytest.approx(5.0)
    # and no LoRA is left merged when the prompt drops it
    h.generate(GenParams(prompt="a dog", steps=2, width=64, height=64))
    assert processing.last["unet"] == 0.0


def test_generate_goes_through_processing(webui):
    from lora_train.sampler import GenParams
    from modules import processing

    img = webui.host.generate(GenParams(prompt="x <lora:none_here:0.5>", seed=7, steps=3, width=128, height=64,
                                        sampler="Euler a"))
    assert img.size == (16, 8)
    assert processing.last["sampler"] == "Euler a" and processing.last["seed"] == 7 and processing.last["steps"] == 3
    assert webui.shared.state.history[-2:] == [("begin", "lora_train_test"), ("end", "lora_train_test")]


def test_captioners_are_the_webuis_interrogators(webui):
    from PIL import Image
    from modules import interrogate

    assert [k for k in webui.host.captioners() if "BLIP" in k] == []  # none until the WebUI made its interrogator
    webui.shared.interrogator = interrogate.InterrogateModels("interrogate")
    caps = webui.host.captioners()
    img = Image.new("L", (32, 16))
    assert sorted(caps) == sorted([f"{webui.host.title} BLIP (interrogate)", f"{webui.host.title} DeepBooru (tags)"])
    assert caps[f"{webui.host.title} BLIP (interrogate)"](img) == "a picture of something, 32x16"
    assert caps[f"{webui.host.title} DeepBooru (tags)"](img) == "1girl, solo, 32px"


# ------------------------------------------------------------------ paths (item 7)
def test_paths_local_listen_and_insecure_flag(a1111, tmp_path, demo_data):
    h, shared = a1111.host, a1111.shared
    outside = tmp_path / "outside"
    outside.mkdir()
    assert h.allowed_roots() is None
    assert h.check_path(str(outside), "dataset folder") == os.path.realpath(outside)
    shared.set_non_local(listen=True)
    with pytest.raises(a1111.hw.HostError, match="outside the folders this server allows"):
        h.check_path(str(outside), "dataset folder")
    inside = a1111.root / "datasets" / "a"
    inside.mkdir(parents=True)
    assert h.check_path(str(inside), "dataset folder") == os.path.realpath(inside)
    # ../ tricks are folded before the check; a symlink the server's owner put inside a WebUI folder is followed
    # (the path as given is inside), a link outside pointing in is too (resolved, it is inside)
    with pytest.raises(a1111.hw.HostError):
        h.check_path(str(a1111.root / "datasets" / ".." / ".." / "outside"), "dataset folder")
    link = a1111.root / "datasets" / "link"
    link.symlink_to(outside)
    assert h.check_path(str(link), "dataset folder") == os.path.realpath(outside)
    back = tmp_path / "link_in"
    back.symlink_to(inside)
    assert h.check_path(str(back), "dataset folder") == os.path.realpath(inside)
    # Start training checks the dataset too
    with pytest.raises(a1111.hw.HostError, match="outside"):
        _tab_train(h, demo_data, "x", 1)
    shared.set_non_local(listen=True, insecure=True)  # --enable-insecure-extension-access
    assert h.allowed_roots() is None and h.check_path(str(outside), "dataset folder")
    shared.set_non_local(share=True)
    assert h.allowed_roots() is not None


def test_a_symlinked_checkpoint_from_the_hosts_list_loads_under_the_fence(webui, tmp_path):
    """Forge started with --server-name and its checkpoint a symlink into another disk: the checkpoint the WebUI
    lists is not a path a remote user typed, and loads; a path typed by hand is still fenced."""
    import fake_model
    from lora_train.ui import logic

    h, shared = webui.host, webui.shared
    real = tmp_path / "other_disk" / "linked.safetensors"
    real.parent.mkdir()
    shutil.copyfile(webui.ckpt, real)
    link = webui.root / "models" / "Stable-diffusion" / "linked.safetensors"
    link.symlink_to(real)
    fake_model.CheckpointInfo(str(link)).register(webui.sd_models.checkpoints_list)
    shared.cmd_opts.server_name = "127.0.0.1"
    shared.set_non_local()
    assert h.allowed_roots() is not None
    for field in ("linked.safetensors [0123abcd]", str(link), str(real)):
        spec, path = logic.resolve_base(h, field)
        assert spec is not None and os.path.realpath(spec) == os.path.realpath(real), field
        model = h.base_model(spec)  # no HostError: the host listed it
        assert model.unet is not None
    typed = tmp_path / "other_disk" / "typed.safetensors"
    shutil.copyfile(webui.ckpt, typed)
    with pytest.raises(HostError) as e:
        h.base_model(str(typed))
    msg = str(e.value)
    assert "\n" not in msg and str(typed) in msg and "--server-name 127.0.0.1" in msg
    assert os.path.join(str(webui.root), "models", "Stable-diffusion") in msg  # the one folder that applies
    assert msg.count(str(webui.root)) == 1  # not the list of every allowed folder


def test_a_refused_folder_is_one_line_in_the_job_and_the_console(webui, tmp_path, demo_data, caplog):
    """A dataset folder outside the fence: the job's error is the message alone (no 'HostError:'), the console
    gets one line and no traceback, the Diagnosis says the run failed."""
    from lora_train.ui import jobs, logic
    from lora_train.ui.sections.common import err

    webui.shared.set_non_local(listen=True)
    with caplog.at_level("DEBUG"):
        shown = err(HostError("dataset folder '/x' is outside the folders this server allows: move it."))
    assert shown.startswith("**Cannot do that:** dataset folder") and "HostError" not in shown
    assert "Traceback" not in caplog.text
    job = jobs.claim("train", "fenced")

    def work(job):
        logic.dataset_folder(webui.host, demo_data)  # tmp_path is outside the fake WebUI's folders

    caplog.clear()
    with caplog.at_level("DEBUG"):
        jobs.run_in_thread(job, work)
        assert jobs.wait(job, 30)
    snap = job.snapshot()
    assert snap["status"] == "failed" and snap["error"].startswith("dataset folder '") and "HostError" not in snap["error"]
    assert "Traceback" not in caplog.text and len([r for r in caplog.records if "fenced" in r.getMessage()]) == 1
    assert logic.job_diagnosis(snap) == "Diagnosis: the run failed (the error is above)."


def test_webui_interrogator_error_marker_is_a_failure_naming_the_printed_error(webui, tmp_path):
    """The WebUI's interrogate prints its exception and returns '<error>': nothing is written, and the report
    names that exception once and the fix."""
    from PIL import Image
    from lora_train.ui import logic

    class Broken:
        def interrogate(self, img):
            print("*** Error interrogating", file=sys.stderr)
            print("    Traceback (most recent call last):\n    ModuleNotFoundError: No module named 'models.blip'",
                  file=sys.stderr)
            return "<error>"

    webui.shared.interrogator = Broken()
    folder = tmp_path / "colors"
    folder.mkdir()
    for i, c in enumerate(["red", "blue", "green"]):
        Image.new("RGB", (16, 16), c).save(folder / f"0{i}_{c}.png")
    backend = next(k for k in logic.caption_backends(webui.host).values() if "BLIP" in k)
    msg = logic.auto_caption(webui.host, str(folder), backend, "", "skip", "mycolr")
    assert msg.startswith("wrote 0, skipped 0 (already captioned), failed 3")
    assert "No module named 'models.blip'" in msg and msg.count("models.blip") == 1 and "pick another captioner" in msg
    assert not list(folder.glob("*.txt"))


# ------------------------------------------------------------------ scripts/lora_train_tab.py
def _load_script(monkeypatch):
    monkeypatch.syspath_prepend(ROOT)
    path = os.path.join(ROOT, "scripts", "lora_train_tab.py")
    spec = importlib.util.spec_from_file_location("lora_train_tab_script", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_script_registers_the_tab_with_the_right_host(webui, monkeypatch):
    built = []
    fake_webui_pkg = types.ModuleType("lora_train.ui")
    fake_webui_pkg.__path__ = [os.path.join(ROOT, "lora_train", "webui")]
    fake_webui_pkg.build_tab = lambda host: built.append(host) or "BLOCKS"
    # the real build_tab (another module, needs gradio) is replaced: this test is about the registration
    monkeypatch.setitem(sys.modules, "lora_train.ui", fake_webui_pkg)
    from modules import script_callbacks

    _load_script(monkeypatch)
    tabs = script_callbacks.ui_tabs_callback()
    assert tabs == [("BLOCKS", "LoRA Train", "lora_train")]
    assert built[0].name == webui.host.name


def test_script_shows_an_error_tab_when_our_import_fails(a1111, monkeypatch, capsys):
    broken = types.ModuleType("lora_train.ui")
    broken.__path__ = []

    def boom(host):
        raise ImportError("No module named 'diffusers'")

    broken.build_tab = boom
    monkeypatch.setitem(sys.modules, "lora_train.ui", broken)
    gr = types.ModuleType("gradio")
    made = {}

    class Blocks:
        def __init__(self, **kw):
            made["blocks"] = self

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

    gr.Blocks = Blocks
    gr.Markdown = lambda text, **kw: made.setdefault("text", text)
    monkeypatch.setitem(sys.modules, "gradio", gr)
    from modules import script_callbacks

    _load_script(monkeypatch)
    tabs = script_callbacks.ui_tabs_callback()  # must not raise: the WebUI keeps starting
    assert tabs == [(made["blocks"], "LoRA Train", "lora_train")]
    assert "diffusers" in made["text"] and "install.py" in made["text"]
    assert "diffusers" in capsys.readouterr().err


@pytest.mark.slow
def test_javascript_send_to_txt2img_tag_helper():
    import shutil
    import subprocess

    node = shutil.which("node") or shutil.which("nodejs")
    if node is None:
        pytest.skip("node is not installed")
    js = os.path.join(ROOT, "javascript", "lora_train.js")
    code = ("const m = require(%r);" % js) + """
const out = [
  m.lora_train_add_tag("", "<lora:a:0.8>"),
  m.lora_train_add_tag("a cat  ", "<lora:a:0.8>"),
  m.lora_train_add_tag("a cat <lora:a:0.4>, b <lora:ab:1>", "<lora:a:0.8>"),
  m.lora_train_add_tag("x", ""),
];
console.log(JSON.stringify(out));"""
    res = subprocess.run([node, "-e", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    import json

    assert json.loads(res.stdout) == ["<lora:a:0.8>", "a cat <lora:a:0.8>", "a cat <lora:a:0.8>, b <lora:ab:1>", "x"]


@pytest.mark.slow
def test_host_module_imports_no_webui_or_gradio():
    """The adapter and the script import nothing of the WebUI (or gradio) until they are used."""
    import subprocess

    code = ("import sys; import lora_train.hosts.webui as h; "
            "bad = [m for m in sys.modules if m in ('modules', 'gradio', 'networks', 'backend') or "
            "m.startswith(('modules.', 'gradio.', 'backend.'))]; print(bad); sys.exit(1 if bad else 0)")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert not res.stdout.strip() or res.stdout.strip() == "[]"


# ------------------------------------------------------------------ issue 14: what a real A1111 showed
def test_never_hashed_checkpoint_still_resolves_after_hashing(tmp_path, monkeypatch, tiny_ldm):
    """First launch with a new checkpoint: the tab is built while the title is the bare file name; the WebUI
    then hashes it (title `name [hash]`); Start must still train the loaded checkpoint from memory."""
    from lora_train.ui import logic

    w = _make_webui(tmp_path, monkeypatch, tiny_ldm, "a1111", hashed=False)
    try:
        h = w.host
        field = logic.default_settings(h)["base_model"]
        assert field == "tiny.safetensors"
        w.info.calculate_shorthash(w.sd_models.checkpoints_list)
        assert h.loaded_checkpoint()[0] == "tiny.safetensors [0123abcd]"
        for value in (field, "tiny.safetensors [0123abcd]", "tiny", w.ckpt, "tiny.safetensors [ffffffff]"):
            assert logic.resolve_base(h, value) == (None, w.ckpt), value
        assert h.find_checkpoint("no-such-model.safetensors") is None
        with pytest.raises(HostError, match="does not exist"):
            logic.resolve_base(h, "no-such-model.safetensors")
    finally:
        for p in w.paths:
            sys.path.remove(p)
        _purge()


def test_outside_folder_message_names_the_flag_in_effect(a1111, tmp_path, demo_data):
    shared = a1111.shared
    shared.cmd_opts.server_name = "127.0.0.1"
    shared.cmd_opts.webui_is_non_local = True
    with pytest.raises(HostError) as e:
        a1111.host.check_path(demo_data, "dataset folder")
    msg = str(e.value)
    assert "--server-name 127.0.0.1" in msg and "--enable-insecure-extension-access" in msg
    assert "allow-any-path" not in msg and "--listen/--share" not in msg


@pytest.mark.slow
def test_javascript_refreshes_lora_cards_once_and_polls_only_when_shown():
    import json
    import shutil
    import subprocess

    node = shutil.which("node") or shutil.which("nodejs")
    if node is None:
        pytest.skip("node is not installed")
    js = os.path.join(ROOT, "javascript", "lora_train.js")
    code = ("const m = require(%r);" % js) + """
const clicks = [];
function el(id, extra) { return Object.assign({id: id, tagName: "BUTTON", dispatchEvent: () => clicks.push(id),
                                               click: () => clicks.push(id)}, extra || {}); }
const els = {"#txt2img_lora_extra_refresh_internal": el("t2i"), "#img2img_lora_extra_refresh_internal": el("i2i"),
             "#lora_train_poll": el("poll"), "#tab_lora_train": {style: {display: "block"}, offsetParent: {}}};
global.document = {hidden: false, querySelector: (s) => els[s] || null};
const out = {};
out.first = m.lora_train_refresh_cards("a_v2");
out.again = m.lora_train_refresh_cards("a_v2");
out.empty = m.lora_train_refresh_cards("");
out.next = m.lora_train_refresh_cards("a_v3");
// a job runs and the tab is shown: every tick polls
els["#lora_train_status"] = {textContent: "Training my_lora: running | step 3/40"};
out.running_ticks = [1, 2, 3].map(() => m.lora_train_poll_once());
// nothing runs: every 10th tick (a job started from another page still shows up)
els["#lora_train_status"].textContent = "Training my_lora: done | step 40/40";
out.idle_ticks = Array.from({length: 20}, () => m.lora_train_poll_once()).filter(Boolean).length;
// another tab shown (the user waits on txt2img): every 5th tick, so a finished run reaches the cards
els["#tab_lora_train"].style.display = "none";
out.hidden_ticks = Array.from({length: 10}, () => m.lora_train_poll_once()).filter(Boolean).length;
out.clicks = clicks;
console.log(JSON.stringify(out));"""
    res = subprocess.run([node, "-e", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out == {"first": 2, "again": 0, "empty": 0, "next": 2, "running_ticks": [True, True, True],
                   "idle_ticks": 2, "hidden_ticks": 2,
                   "clicks": ["t2i", "i2i", "t2i", "i2i"] + ["poll"] * 7}

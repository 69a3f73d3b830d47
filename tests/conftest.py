"""Test setup: no network at all, offline Hugging Face, shared small fixtures."""
import os
import re
import socket
import sys

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# the suite and the processes it starts: OpenMP threads wait passively and fit the free cores (lora_train/cpu_threads)
from lora_train.cpu_threads import configure as _configure_cpu_threads  # noqa: E402  (no torch import)

_configure_cpu_threads()
#: the folder the clone sits in. The repo root has an __init__.py (ComfyUI loads it), so pytest treats the root as a
#: package and, setting it up, puts this folder on sys.path (import mode "prepend"): any folder there named like a
#: package then shadows it, e.g. gradio's own temp folder /tmp/gradio for a clone in /tmp ("module 'gradio' has no
#: attribute 'Blocks'"). It is taken off again after each test's setup.
_CLONE_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    yield
    while _CLONE_PARENT in sys.path:
        sys.path.remove(_CLONE_PARENT)

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")  # copies of shared/reference (see its README)
REFERENCE = os.path.join(DATA, "kohya_lora_names.json")
REFERENCE_FLUX_SD3 = os.path.join(DATA, "flux_sd3_lora_names.json")


class NetworkBlocked(RuntimeError):
    pass


_real_connect = socket.socket.connect


def _guarded_connect(self, address):
    host = address[0] if isinstance(address, tuple) else address
    if isinstance(host, str) and (host.startswith("127.") or host in ("localhost", "::1") or self.family == socket.AF_UNIX):
        return _real_connect(self, address)
    raise NetworkBlocked(f"test tried to reach the network: {address!r}")


socket.socket.connect = _guarded_connect


@pytest.fixture(scope="session")
def reference_names():
    import json

    if not os.path.isfile(REFERENCE):
        pytest.fail(f"reference file missing: {REFERENCE} (tests/data/ ships with the repo)")
    with open(REFERENCE, encoding="utf-8") as fh:
        return json.load(fh)


@pytest.fixture
def demo_data(tmp_path):
    from lora_train.data.demo import write_demo_dataset

    return write_demo_dataset(str(tmp_path / "data"), n=8, size=64)


def unet_out(model, lat, te):
    """The denoiser's output on `lat` noised with fixed noise at four fixed timesteps (compare two models' outputs)."""
    import torch

    g = torch.Generator().manual_seed(0)
    noise = torch.randn(lat.shape, generator=g)
    t = torch.tensor([100, 400, 700, 900] * (lat.shape[0] // 4 + 1))[: lat.shape[0]]
    with torch.no_grad():
        return model.unet(model.noise_scheduler.add_noise(lat, noise, t), t, te).sample


def run_trainer(cfg, build=None, stop_at=None, resume_from=None):
    """(trainer, result) of one run on `build()` (a fresh model; None: the config's base model), asked to stop after
    step `stop_at` when given, resumed from `resume_from` when given."""
    from lora_train.training.trainer import Trainer

    box = {}

    def cb(ev):
        if ev["kind"] == "step" and ev["step"] == stop_at:
            box["trainer"].stop()
    tr = Trainer(cfg, model=build() if build else None, callback=cb if stop_at else None, resume_from=resume_from)
    box["trainer"] = tr
    return tr, tr.run()


def strength_losses(trainer, strengths=(0.0, 0.5, 1.0), seed=11):
    """The fixed-noise training loss of a finished run's images (its cached latents, captions as written) with its
    LoRA at each strength; the LoRA is left at 1."""
    import torch

    from lora_train.networks import lora as L
    from lora_train.training.device import encode_prompts
    from lora_train.training.loss import fixed_noise_loss

    m = trainer.model
    lat = torch.stack(list(trainer.latents))
    cond = encode_prompts(m, [it.caption for it in trainer.dataset.items], torch.device("cpu"))
    out = []
    for s in strengths:
        L.set_strength(m.unet, s)
        out.append(fixed_noise_loss(m, lat, cond, seed=seed))
    L.set_strength(m.unet, 1.0)
    return out


def assert_loss_falls_with_strength(trainer, label, at_least=0.03):
    """The learning check of a tiny run: the fixed-noise loss at LoRA strength 0 > 0.5 > 1, and 1 at least
    `at_least` below 0 (relative)."""
    mse = strength_losses(trainer)
    print(f"{label} fixed-noise loss at 0 / 0.5 / 1:", mse)
    assert mse[0] > mse[1] > mse[2], mse
    assert mse[2] <= (1 - at_least) * mse[0], mse
    return mse


def flow_file_error(trained_model, lora_path, build, captions=("a red circle", "lrtdemo"), t=(300.0, 800.0),
                    shape=(16, 16, 16)):
    """The largest difference between a trained flow model's prediction and a fresh `build()` with the written
    file applied, on seeded latents (the file holds exactly what was trained when this is ~0)."""
    import torch

    from lora_train.models import flow
    from lora_train.networks import lora as L

    fresh = build()
    L.apply(fresh, L.load_file(lora_path, fresh), "back", 1.0)
    x = torch.randn((len(captions),) + tuple(shape), generator=torch.Generator().manual_seed(1))
    cond = flow.encode(fresh, list(captions))
    ts = torch.tensor(list(t))
    with torch.no_grad():
        a = flow.predict(trained_model, trained_model.unet, x, ts, cond)
        b = flow.predict(fresh, fresh.unet, x, ts, cond)
    return float((a - b).abs().max())


def small_cfg(data, out, **kw):
    from lora_train.config import TrainConfig

    base = dict(train_data_dir=data, output_dir=str(out), output_name="t", resolution=64, lora_rank=4,
                learning_rate=1e-3, batch_size=2, epochs=1, lr_warmup_steps=0, save_every_n_epochs=0, seed=5)
    base.update(kw)
    return TrainConfig(**base).validate()


_FRONTEND_MODULE = re.compile(r"^pytestmark\s*=.*\bfrontend\b", re.M)


def pytest_ignore_collect(collection_path, config):
    """With `-m "not frontend"` (the core run at the WebUI's versions, which has no gradio / ComfyUI / browser
    packages), a test module marked as a whole (`pytestmark = pytest.mark.frontend`) is not even imported, so its
    imports at module level cannot break that run. Other runs collect it as usual."""
    if "not frontend" not in (config.getoption("markexpr", "") or ""):
        return None
    if collection_path.suffix != ".py" or not collection_path.name.startswith("test_"):
        return None
    try:
        text = collection_path.read_text(encoding="utf-8")
    except OSError:
        return None
    return True if _FRONTEND_MODULE.search(text) else None


@pytest.fixture
def fresh_job_slot():
    """The tab's one job slot and the process's used LoRA names, empty before a test and freed after it."""
    from lora_train.hosts import USED_NAMES
    from lora_train.ui import jobs

    jobs.forget(force=True)
    jobs.REMEMBERED.clear()
    USED_NAMES.clear()
    yield
    job = jobs.running()
    if job is not None:
        job.stop()
        jobs.wait(job, 60)
    jobs.forget(force=True)


@pytest.fixture(scope="session")
def ab_lora_dir(tmp_path_factory):
    """A LoRA folder with one trained tiny LoRA `ab` (epoch files ab-000001, ab-000002 and the final ab), trained
    once per test session for every test that only needs a trained file (grids, prompts, reloads)."""
    from lora_train.data.demo import write_demo_dataset
    from lora_train.training.trainer import Trainer

    root = tmp_path_factory.mktemp("ab")
    data = write_demo_dataset(str(root / "data"), n=8, size=64)
    cfg = small_cfg(data, root / "loras", output_name="ab", batch_size=8, epochs=3, learning_rate=2e-2,
                    save_every_n_epochs=1)
    Trainer(cfg).run()
    return str(root / "loras")


@pytest.fixture(autouse=True)
def _names_written_by_earlier_tests_are_forgotten():
    """`hosts.USED_NAMES` (names this process wrote, never reused: hosts cache LoRAs by name) is per process; each
    test starts as a fresh process would."""
    hosts_base = sys.modules.get("lora_train.hosts.base")  # not imported: nothing to forget (torch-free runs)
    if hosts_base is not None:
        hosts_base.USED_NAMES.clear()
    yield


# ----------------------------------------------------------------------------- the fast subset: pytest -m "not slow"
# A test that trains for more than a few steps, starts processes or a browser, or builds venvs carries
# @pytest.mark.slow (a whole module: `pytestmark`); `pytest -m "not slow"` runs the rest, every module's quick
# checks; the full suite is what CI runs.


#: the Flux / SD3 tests need diffusers.training_utils, which does not import beside AUTOMATIC1111's transformers
#: 4.30.2 (the WebUI-versions run; AUTOMATIC1111 runs no Flux / SD3), and diffusers' newer Flux / SD3 LoRA converters
#: (test_flow_names compares with them); there the product says so (training/flow._training_utils) and these tests
#: are skipped, with the reason. Forge (transformers 4.46), ComfyUI and the current releases run them.
FLOW_TRAINING = ("test_flux.py", "test_sd3.py", "test_flow_loss.py", "test_flow_bench.py", "test_webui_flow.py",
                 "test_nodes_flow.py", "test_flow_single_file.py", "test_flow_names.py", "test_networks_flow.py")


def _flow_training_importable() -> bool:
    try:
        from diffusers import training_utils  # noqa: F401
    except (ImportError, AttributeError, RuntimeError):  # diffusers wraps import errors in RuntimeError
        return False
    return True


def pytest_collection_modifyitems(config, items):
    flow_ok = None
    for item in items:
        base = os.path.basename(str(item.fspath))
        if base in FLOW_TRAINING:
            flow_ok = _flow_training_importable() if flow_ok is None else flow_ok
            if not flow_ok:
                item.add_marker(pytest.mark.skip(reason="Flux / SD3 tests need diffusers.training_utils (and its newer "
                                                        "LoRA converters): not at the WebUI versions (transformers 4.30.2)"))

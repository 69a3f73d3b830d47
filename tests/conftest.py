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

    jobs._CURRENT = None
    USED_NAMES.clear()
    yield
    job = jobs.running()
    if job is not None:
        job.stop()
        jobs.wait(job, 60)
    jobs._CURRENT = None

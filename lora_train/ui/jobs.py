"""The one long job (training, LR finder, test grid) the tab runs at a time, kept in Python, not in a page.

A job lives in this module, so a closed or reloaded browser page does not stop it and every page (a
reopened tab, a second browser) shows the running one. A second start while one runs is refused with
`JobBusy`, whose message says what runs and what to do. No gradio here: the tab polls `current()`.
"""
from __future__ import annotations

import logging
import math
import threading
import time
import traceback
from typing import Any, Callable, Dict, List, Optional

log = logging.getLogger(__name__)

RUNNING = ("starting", "running", "stopping")
#: the jobs that train (a training run, auto mode): they show a loss plot and a diagnosis
TRAINING_KINDS = ("train", "auto")


class JobBusy(RuntimeError):
    """Another job is running; the message names it."""


class Job:
    """State of one job, updated from its worker thread; read it with `snapshot()`."""

    def __init__(self, kind: str, name: str = ""):
        self.kind = kind              # "train" | "lr_find" | "grid" | "caption"
        self.name = name              # the LoRA name of a training run
        self.status = "starting"
        self.message = ""
        self.error = ""
        self.started = time.time()
        self.finished: Optional[float] = None
        self.stop_event = threading.Event()
        self.step = 0
        self.total_steps = 0
        self.epoch = 0
        self.total_epochs = 0
        self.eta: Optional[float] = None
        self.its: Optional[float] = None
        self.steps: List[int] = []
        self.losses: List[float] = []
        self.val_steps: List[int] = []
        self.val_losses: List[float] = []
        self.findings: List[str] = []
        self.warnings: List[str] = []
        self.files: List[str] = []
        self.trigger = ""             # the run's trigger word and resolution: the Test section's defaults
        self.resolution = 0
        self.lora_path: Optional[str] = None
        self.vram: Optional[str] = None
        self.device = ""
        self.result: Any = None
        self.trainer: Any = None
        self.version = 0
        self._lock = threading.RLock()
        self._thread: Optional[threading.Thread] = None

    # -- state
    @property
    def running(self) -> bool:
        return self.status in RUNNING

    def touch(self, **changes: Any) -> None:
        with self._lock:
            for k, v in changes.items():
                setattr(self, k, v)
            self.version += 1

    def stop(self) -> None:
        """Ask the job to end after its current step (a training run saves what it has)."""
        with self._lock:
            if self.running:
                self.stop_event.set()
                self.status = "stopping"
                self.version += 1
            trainer = self.trainer
        if trainer is not None:
            trainer.stop()  # the same event; Trainer.stop() is the documented way

    def snapshot(self) -> Dict[str, Any]:
        with self._lock:
            return {k: (list(v) if isinstance(v, list) else v) for k, v in self.__dict__.items()
                    if not k.startswith("_") and k not in ("stop_event", "trainer")}

    def describe(self) -> str:
        what = {"train": f"training '{self.name}'", "auto": f"auto mode for '{self.name}'", "lr_find": "the LR finder",
                "grid": "a test grid", "caption": "auto-captioning"}.get(self.kind, self.kind)
        return what

    # -- training events (Trainer callback)
    def on_train_event(self, ev: Dict[str, Any], host=None) -> None:
        """Keep what the tab shows of a Trainer event (the diagnosis is the Trainer's own `diagnosis` events);
        report progress to the host and stop when the host's own interrupt was pressed."""
        event = ev.get("kind")
        with self._lock:
            if event == "start":
                self.status = "running" if not self.stop_event.is_set() else "stopping"
                self.total_steps = int(ev.get("total_steps") or 0)
                self.total_epochs = int(ev.get("total_epochs") or 0)
                self.device = str(ev.get("device") or "")
            elif event == "step":
                self.step = int(ev.get("step", self.step))
                self.epoch = int(ev.get("epoch", self.epoch))
                self.total_steps = int(ev.get("total_steps") or self.total_steps)
                self.total_epochs = int(ev.get("total_epochs") or self.total_epochs)
                self.eta, self.its = ev.get("eta"), ev.get("its")
                loss = ev.get("loss")
                if loss is not None:
                    self.steps.append(self.step)
                    self.losses.append(float(loss))
                self.vram = vram_text()
            elif event == "val_loss":
                self.val_steps.append(int(ev.get("step", self.step)))
                self.val_losses.append(float(ev.get("val_loss")))
            elif event == "epoch":
                self.epoch = int(ev.get("epoch", self.epoch))
            elif event == "phase":
                self.message = str(ev.get("message", ""))
            elif event == "warning":
                self.warnings.append(str(ev.get("message", "")))
            elif event == "diagnosis":
                self.findings.append(str(ev.get("message", "")))
            elif event == "checkpoint":
                path = ev.get("path")
                if path:
                    self.files.append(str(path))
            self.version += 1
        if host is not None and event == "step":
            try:
                host.progress(self.step, self.total_steps, f"LoRA {self.name}: step {self.step}/{self.total_steps}")
                if host.interrupted():
                    self.stop()
            except Exception as exc:
                log.warning("host progress/interrupt failed: %s", exc)


def vram_text() -> Optional[str]:
    """'peak 3.1 / 8.0 GB' on CUDA, None elsewhere (torch is already imported by a running job)."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        peak = torch.cuda.max_memory_allocated() / 2 ** 30
        total = torch.cuda.get_device_properties(0).total_memory / 2 ** 30
        return f"peak {peak:.1f} / {total:.1f} GB"
    except Exception:
        return None


_LOCK = threading.Lock()
_CURRENT: Optional[Job] = None
#: what a reopened page fills in again (the dataset folder last loaded)
REMEMBERED: Dict[str, Any] = {}


def current() -> Optional[Job]:
    """The running job, else the last one (finished), else None."""
    return _CURRENT


def running() -> Optional[Job]:
    job = _CURRENT
    return job if job is not None and job.running else None


def forget(force: bool = False) -> None:
    """Drop the last finished job (a fresh page shows no old run); a running job stays (stop it first) unless
    `force` (a job whose thread is gone, e.g. in a test harness)."""
    global _CURRENT
    with _LOCK:
        if _CURRENT is not None and _CURRENT.running and not force:
            raise JobBusy(f"{_CURRENT.describe()} is running: stop it first.")
        _CURRENT = None


def claim(kind: str, name: str = "") -> Job:
    """Make a new job the current one, or raise JobBusy while another runs."""
    global _CURRENT
    with _LOCK:
        if _CURRENT is not None and _CURRENT.running:
            raise JobBusy(f"{_CURRENT.describe()} is running (started {time.strftime('%H:%M:%S', time.localtime(_CURRENT.started))}): "
                          f"wait for it to end or press Stop, then try again.")
        _CURRENT = Job(kind, name)
        return _CURRENT


def finish(job: Job, status: str, message: str = "", error: str = "") -> None:
    job.touch(status=status, message=message, error=error, finished=time.time())


def is_user_error(exc: BaseException) -> bool:
    """Our own exceptions (HostError, ConfigError, DatasetError, ...) say what was wrong and the fix in their
    message: the user sees that message alone and the console one line, not a traceback."""
    return type(exc).__module__.split(".")[0] == "lora_train" or isinstance(exc, JobBusy)


def error_text(exc: BaseException) -> str:
    """What the page shows of an exception: our errors' message, else the type and message (a bug)."""
    return str(exc) if is_user_error(exc) else f"{type(exc).__name__}: {exc}"


def log_failure(what: str, exc: BaseException) -> None:
    if is_user_error(exc):
        log.warning("%s: %s", what, exc)
    else:
        log.error("%s failed:\n%s", what, traceback.format_exc())


def run_in_thread(job: Job, target: Callable[[Job], None]) -> Job:
    """Run `target(job)` in a daemon thread; an exception marks the job failed with its message."""

    def body() -> None:
        try:
            target(job)
        except Exception as exc:
            log_failure(job.describe(), exc)
            finish(job, "failed", error=error_text(exc))
        else:
            if job.running:
                finish(job, "stopped" if job.stop_event.is_set() else "done")

    t = threading.Thread(target=body, name=f"lora_train-{job.kind}", daemon=True)
    job._thread = t
    t.start()
    return job


def run_here(job: Job, target: Callable[[Job], Any]) -> Any:
    """Run `target(job)` in this thread (short jobs run from a click handler), always finishing the job."""
    try:
        out = target(job)
    except BaseException as exc:
        finish(job, "failed", error=error_text(exc))
        raise
    if job.running:
        finish(job, "stopped" if job.stop_event.is_set() else "done")
    return out


def wait(job: Job, timeout: Optional[float] = None) -> bool:
    t = job._thread
    if t is not None:
        t.join(timeout)
    return not job.running


def fmt_seconds(s: Optional[float]) -> str:
    if s is None or not isinstance(s, (int, float)) or not math.isfinite(s):
        return "?"
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"

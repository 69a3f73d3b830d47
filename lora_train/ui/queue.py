"""The tab's queue of training runs (no gradio): add the current settings, remove, reorder, cancel; one runs at a
time, each through the tab's one job slot (`jobs`) and the one train-and-publish path (`logic.start_training`).

The queue lives in this module (a reloaded page shows it) and in a JSON file beside the run folders
(`<runs_dir>/queue.json`, written atomically after every change), so it also outlives the process: entries that
were running when the process ended come back as "interrupted"; queued ones wait for Start queue again.
"""
from __future__ import annotations

import json
import os
import threading
import time
import uuid
from typing import Any, Callable, Dict, List, Optional

from ..config import TrainConfig
from ..io_utils import atomic_write_text
from . import jobs

QUEUED, RUNNING, DONE, FAILED, CANCELLED, INTERRUPTED = "queued", "running", "done", "failed", "cancelled", "interrupted"


class RunQueue:
    def __init__(self, path: str, start: Optional[Callable[[TrainConfig, Optional[str]], jobs.Job]] = None):
        self.path = path
        self._start = start
        self._lock = threading.RLock()
        self.entries: List[Dict[str, Any]] = []
        self.running_flag = False
        self._thread: Optional[threading.Thread] = None
        self._load()

    # -- persistence
    def _load(self) -> None:
        if not os.path.isfile(self.path):
            return
        try:
            with open(self.path, encoding="utf-8") as fh:
                data = json.load(fh)
        except (OSError, ValueError):
            return
        for e in data.get("entries", []):
            if e.get("status") == RUNNING:
                e["status"], e["message"] = INTERRUPTED, "the process ended while it ran"
            self.entries.append(e)

    def _save(self) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        atomic_write_text(self.path, json.dumps({"entries": self.entries}, indent=1))

    # -- editing
    def add(self, cfg: TrainConfig, spec: Optional[str]) -> Dict[str, Any]:
        e = {"id": uuid.uuid4().hex[:8], "name": cfg.output_name, "config": cfg.to_dict(), "spec": spec,
             "status": QUEUED, "added": time.time(), "started": None, "finished": None, "message": "",
             "steps": None, "seconds": None}
        with self._lock:
            self.entries.append(e)
            self._save()
        return e

    def _find(self, entry_id: str) -> Dict[str, Any]:
        for e in self.entries:
            if e["id"] == entry_id:
                return e
        raise KeyError(f"no queue entry '{entry_id}'")

    def remove(self, entry_id: str) -> None:
        with self._lock:
            e = self._find(entry_id)
            if e["status"] == RUNNING:
                raise ValueError(f"'{e['name']}' is running: cancel it first.")
            self.entries.remove(e)
            self._save()

    def move(self, entry_id: str, delta: int) -> None:
        with self._lock:
            e = self._find(entry_id)
            i = self.entries.index(e)
            j = max(0, min(len(self.entries) - 1, i + delta))
            self.entries.insert(j, self.entries.pop(i))
            self._save()

    def cancel(self, entry_id: str) -> None:
        """A queued entry is not run; a running one stops after its current step (what it trained is kept)."""
        with self._lock:
            e = self._find(entry_id)
            if e["status"] == QUEUED or e["status"] == INTERRUPTED:
                e["status"] = CANCELLED
                self._save()
                return
        if e["status"] == RUNNING:
            job = jobs.running()
            if job is not None and job.name == e["name"]:
                job.stop()
            with self._lock:
                e["message"] = "cancel asked: stopping after the current step"
                self._save()

    # -- running
    def start(self) -> None:
        """Run the queued entries one after another in a background thread (no-op while it runs)."""
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            for e in self.entries:
                if e["status"] == INTERRUPTED:
                    e["status"] = QUEUED
            self.running_flag = True
            self._thread = threading.Thread(target=self._loop, name="lora_train-queue", daemon=True)
            self._thread.start()

    def pause(self) -> None:
        """Start no further entry (the running one goes on)."""
        self.running_flag = False

    def wait(self, timeout: Optional[float] = None) -> None:
        t = self._thread
        if t is not None:
            t.join(timeout)

    def _next(self) -> Optional[Dict[str, Any]]:
        with self._lock:
            return next((e for e in self.entries if e["status"] == QUEUED), None)

    def _loop(self) -> None:
        while self.running_flag:
            e = self._next()
            if e is None:
                break
            while jobs.running() is not None and self.running_flag:  # the tab's one job slot
                time.sleep(0.2)
            if not self.running_flag:
                break
            with self._lock:
                if e["status"] != QUEUED:  # cancelled or removed meanwhile
                    continue
                e["status"], e["started"] = RUNNING, time.time()
                self._save()
            try:
                cfg = TrainConfig.from_dict(e["config"])
                job = self._start(cfg, e.get("spec"))
                jobs.wait(job)
                snap = job.snapshot()
                status = {"done": DONE, "stopped": CANCELLED}.get(snap["status"], FAILED)
                msg = snap.get("error") or snap.get("message") or ""
                steps = snap.get("step")
            except Exception as exc:  # one bad entry must not stop the queue
                status, msg, steps = FAILED, f"{type(exc).__name__}: {exc}", None
            with self._lock:
                e.update(status=status, finished=time.time(), message=msg, steps=steps,
                         seconds=time.time() - (e["started"] or time.time()))
                self._save()
        self.running_flag = False

    # -- showing
    def eta_seconds(self) -> Optional[float]:
        """Seconds until the queue is empty: the running job's ETA, plus each queued entry's steps at the speed
        measured last (None when no speed is known yet)."""
        job = jobs.running()
        its = job.its if job is not None and job.its else None
        if its is None:
            done = [e for e in self.entries if e["status"] == DONE and e.get("steps") and e.get("seconds")]
            if done:
                its = done[-1]["steps"] / max(done[-1]["seconds"], 1e-6)
        if not its:
            return None
        total = float(job.eta or 0.0) if job is not None else 0.0
        for e in self.entries:
            if e["status"] == QUEUED:
                total += planned_steps(e["config"]) / its
        return total

    def table(self) -> List[List[Any]]:
        rows = []
        job = jobs.running()
        for i, e in enumerate(self.entries, 1):
            status = e["status"]
            eta = ""
            if status == RUNNING and job is not None and job.name == e["name"]:
                status = f"running {job.step}/{job.total_steps}"
                eta = jobs.fmt_seconds(job.eta)
            rows.append([i, e["id"], e["name"], status, eta, e.get("message", "")[:120]])
        return rows


def planned_steps(cfg: Dict[str, Any]) -> int:
    """Steps a queued config will train (max_train_steps, else epochs x images / batch, from the folder)."""
    if cfg.get("max_train_steps"):
        return int(cfg["max_train_steps"])
    try:
        from ..data.folder import scan_folder

        n = sum(r.repeats for r in scan_folder(cfg["train_data_dir"]).rows)
    except Exception:
        n = 1
    per_epoch = -(-n // max(1, int(cfg.get("batch_size") or 1))) // max(1, int(cfg.get("gradient_accumulation_steps") or 1))
    return max(1, per_epoch) * int(cfg.get("epochs") or 1)


_QUEUES: Dict[str, RunQueue] = {}


def queue_for(host, start: Callable[[TrainConfig, Optional[str]], jobs.Job]) -> RunQueue:
    """The process's queue for this host's run folder (one per folder; a reloaded page gets the same)."""
    path = os.path.join(host.runs_dir(), "queue.json")
    q = _QUEUES.get(path)
    if q is None:
        q = _QUEUES[path] = RunQueue(path, start)
    return q

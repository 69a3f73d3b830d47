"""The one kind of event a training run reports, to every front door (CLI, tab, ComfyUI nodes) and to logs.

`TrainEvent(kind, ...)`: `kind` says what happened; the fields that apply to it are set, the others are None;
what only one kind carries sits in `extra` (e.g. a `diagnosis`'s finding, a `nan`'s action). Kinds:
  start (total_steps, total_epochs, device, images), step (step, epoch, loss, lr, its, eta, ...), epoch,
  val_loss (val_loss), checkpoint (path), sample (path), state (path), resumed (path, step, epoch),
  caching (extra: what, done, total), phase (message: the work between steps, e.g. loading the model, saving
  and publishing the files), warning / info (message), nan (message, extra: action, value),
  diagnosis (message, extra: finding), done (extra: result).
It also reads like the dict events used to be (`ev["kind"]`, `ev.get("loss")`), so a callback written for
either works.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, Optional

KINDS = ("start", "step", "epoch", "val_loss", "checkpoint", "sample", "state", "resumed", "caching", "phase",
         "warning", "info", "nan", "diagnosis", "done")


@dataclass(frozen=True)
class TrainEvent:
    kind: str
    step: Optional[int] = None
    epoch: Optional[int] = None
    total_steps: Optional[int] = None
    total_epochs: Optional[int] = None
    loss: Optional[float] = None
    lr: Optional[float] = None
    val_loss: Optional[float] = None
    its: Optional[float] = None
    eta: Optional[float] = None
    path: Optional[str] = None
    message: Optional[str] = None
    extra: Dict[str, Any] = field(default_factory=dict)

    @classmethod
    def make(cls, kind: str, **data: Any) -> "TrainEvent":
        """An event from keyword data: known fields go to their field, the rest to `extra`."""
        if kind not in KINDS:
            raise ValueError(f"unknown event kind {kind!r}: one of {', '.join(KINDS)}")
        known = {f.name for f in dataclasses.fields(cls)} - {"kind", "extra"}
        return cls(kind=kind, **{k: v for k, v in data.items() if k in known},
                   extra={k: v for k, v in data.items() if k not in known})

    def to_dict(self) -> Dict[str, Any]:
        """The set fields and `extra` as one flat dict (for JSON lines, TensorBoard-style logs, old callbacks)."""
        out: Dict[str, Any] = {"kind": self.kind}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name not in ("kind", "extra") and v is not None:
                out[f.name] = v
        out.update(self.extra)
        return out

    # read like a dict
    def get(self, key: str, default: Any = None) -> Any:
        return self.to_dict().get(key, default)

    def __getitem__(self, key: str) -> Any:
        d = self.to_dict()
        if key not in d:
            raise KeyError(key)
        return d[key]

    def __contains__(self, key: object) -> bool:
        return key in self.to_dict()

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_dict())

    def keys(self):
        return self.to_dict().keys()

    def items(self):
        return self.to_dict().items()

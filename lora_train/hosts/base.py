"""The one small interface a host (WebUI, Forge, ComfyUI, the standalone app) implements.

The tab (`lora_train/webui/`) and the ComfyUI nodes only talk to a `Host`, so they never care where they
run. The core never imports a host's modules; host glue lives in `scripts/`, `nodes/` or behind lazy imports.

Contract (every method has a working default for the standalone case where that makes sense):

- `name`: short host id ("standalone", "a1111", "forge", "comfyui"), shown in the UI and in messages.
- `lora_dirs()`: folders the host reads LoRA files from; `lora_dirs()[0]` is where new files go.
- `refresh_loras()`: make the host's LoRA list see new files at once (and drop stale cached weights).
- `checkpoints()`: {display name: path} of base checkpoints the host knows.
- `loaded_checkpoint()`: (display name, path) of the checkpoint the host has loaded, or None.
- `base_model(spec)`: a `BaseModel` for training. spec None/"" = the host's loaded checkpoint (from its
  in-memory weights where it can, see `checkpoints.from_original_state_dict`); otherwise a path/`tiny`.
- `free_memory()` / `restore_memory()`: move the host's own models off the GPU before training and back
  after; `restore_memory` is always called (also on error or stop), use `memory_freed()` as a context.
- `generate(params)`: one image for a `sampler.GenParams` whose prompt may hold `<lora:name:w>` tags,
  through the host's own sampler and LoRA loader.
- `interrupted()`: True when the host's own stop/interrupt was pressed (checked between steps).
- `progress(done, total, text)`: report progress to the host's own progress display.
- `allowed_roots()`: folders paths typed in a UI may point into; None = anywhere.
"""
from __future__ import annotations

import contextlib
import os
import re
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from ..names import epoch_of
from ..io_utils import next_free_name
from ..models.base import BaseModel
from ..models.loading import load_base_model


def checkpoint_names(title: str, path: str) -> set:
    """The names a user may give a checkpoint: its title, the title without a trailing ' [hash]', the path, the
    file name and its stem."""
    bare = re.sub(r"\s*\[[0-9a-fA-F]{6,}\]\s*$", "", title or "")
    base = os.path.basename(str(path or "").rstrip("/\\"))
    return {n for n in (title, bare, path, base, os.path.splitext(base)[0]) if n}


def same_file(a: str, b: str) -> bool:
    """The same file, by path as given or with symlinks resolved."""
    a, b = os.path.abspath(str(a)), os.path.abspath(str(b))
    return a == b or os.path.realpath(a) == os.path.realpath(b)


def path_inside(paths: Sequence[str], roots: Sequence[str]) -> bool:
    """Whether any of `paths` (absolute) lies in or under one of `roots`, each root taken as given and resolved."""
    for root in roots:
        for r in {os.path.abspath(root), os.path.realpath(root)}:
            if any(p == r or p.startswith(r.rstrip(os.sep) + os.sep) for p in paths):
                return True
    return False


#: LoRA names this process has written: never reused, so a host that caches LoRA files by name never shows an
#: older run under a name (even after its file was deleted).
USED_NAMES: set = set()
LORA_EXTS = (".safetensors", ".pt", ".ckpt")


class HostError(RuntimeError):
    """Something the host cannot do; the message says what to do instead."""


class Host:
    name = "host"
    #: the host as its users call it, in messages and the tab's header
    title = "this app"
    #: the host has a txt2img tab a prompt can be sent to (the WebUIs)
    has_txt2img = False
    #: the page's own script polls the tab's job (WebUIs: a server-side timer blocks their "Reload UI")
    polls_from_page = False

    def lora_dirs(self) -> List[str]:
        raise NotImplementedError

    def output_dir(self) -> str:
        return self.lora_dirs()[0]

    def refresh_loras(self) -> None:
        return None

    def runs_dir(self) -> str:
        """Where run folders go (config, loss log, plots, resumable state): never the LoRA folder, whose every
        file a host lists as a LoRA. Default: `lora_train_runs` beside the LoRA folder."""
        return os.path.join(os.path.dirname(os.path.abspath(self.output_dir())), "lora_train_runs")

    def name_taken(self, name: str) -> bool:
        """A LoRA file (or epoch file `name-000004`) of this name is in a LoRA folder, a run folder has it, or this
        process wrote it before."""
        if name in USED_NAMES:
            return True
        for d in self.lora_dirs():
            if any(os.path.exists(os.path.join(d, name + e)) for e in LORA_EXTS):
                return True
            try:
                if any(epoch_of(n, name) is not None for n in os.listdir(d)):
                    return True
            except OSError:
                pass
        return os.path.exists(os.path.join(self.runs_dir(), name))

    def free_name(self, stem: str) -> str:
        """`stem`, else `stem_v2`, `stem_v3`, ...: the first name `name_taken` does not know."""
        return next_free_name("", stem, exists=self.name_taken)

    def checkpoints(self) -> Dict[str, str]:
        return {}

    def loaded_checkpoint(self) -> Optional[Tuple[str, str]]:
        return None

    def base_model(self, spec: Optional[str] = None) -> BaseModel:
        if not spec:
            loaded = self.loaded_checkpoint()
            if loaded is None:
                raise HostError("no base model: choose a checkpoint (or 'tiny' for the demo model).")
            spec = loaded[1]
        return load_base_model(spec)

    def free_memory(self) -> None:
        return None

    def restore_memory(self) -> None:
        return None

    @contextlib.contextmanager
    def memory_freed(self) -> Iterator[None]:
        """`with host.memory_freed(): train()` — the host's models are given back even on error."""
        self.free_memory()
        try:
            yield
        finally:
            self.restore_memory()

    def generate(self, params):  # params: sampler.GenParams -> PIL.Image
        raise NotImplementedError

    def captioners(self) -> Dict[str, Callable[[Any], str]]:
        """The host's own interrogators {name: fn(PIL image) -> caption} (the WebUI's BLIP / DeepBooru); none here."""
        return {}

    def caption_model_dirs(self) -> List[str]:
        """Folders whose subfolders may hold local captioning models (vision-language, BLIP / Florence-2, WD14):
        the tab lists the model folders found there (each with a config.json or model.onnx)."""
        return []

    def interrupted(self) -> bool:
        return False

    def progress(self, done: int, total: int, text: str = "") -> None:
        return None

    def allowed_roots(self) -> Optional[List[str]]:
        return None

    def check_path(self, path: str, what: str = "path", must_exist: bool = True, folder: bool = True) -> str:
        """Resolve a path typed by a user and check it is inside `allowed_roots()`; returns the real path.

        A path counts as inside when it is, as given (made absolute, `..` folded) or with its symlinks resolved,
        under a root taken as given or resolved: a link the server's owner put inside a host folder (a checkpoint
        symlinked into models/) is followed, while `..` cannot climb out."""
        if not path or not str(path).strip():
            raise HostError(f"{what} is empty: type a folder path.")
        given = os.path.abspath(os.path.expanduser(str(path).strip()))
        real = os.path.realpath(given)
        if must_exist and not os.path.exists(real):
            raise HostError(f"{what} '{path}' does not exist: check the spelling or create it first.")
        if must_exist and folder and not os.path.isdir(real):
            raise HostError(f"{what} '{path}' is a file, not a folder: give the folder that holds the images.")
        roots = self.allowed_roots()
        if roots is not None and not path_inside((given, real), roots):
            raise HostError(f"{what} '{path}' is outside the folders this server allows: move it into "
                            f"'{self.home_for(what, roots)}', or {self.outside_roots_advice()}")
        return real

    def home_for(self, what: str, roots: Sequence[str]) -> str:
        """The one allowed folder a refusal of `what` ('dataset folder', 'base model', ...) points to."""
        return roots[0]

    def outside_roots_advice(self) -> str:
        """How to let paths outside `allowed_roots()` in, naming this host's own option (ends the message)."""
        return "start the app with --allow-root FOLDER for each folder it may read (or without --listen)."

    def find_checkpoint(self, value: str) -> Optional[Tuple[str, bool]]:
        """(path, is it the loaded one) of the checkpoint a UI field names as the host shows it (a title with or
        without its ' [hash]'), by file name, stem or path; None when the host knows no such checkpoint."""
        value = (value or "").strip()
        if not value:
            return None
        loaded = self.loaded_checkpoint()
        cands = ([loaded] if loaded else []) + list(self.checkpoints().items())
        as_path = os.sep in value or "/" in value
        for title, path in cands:
            if value in checkpoint_names(title, path) or (as_path and same_file(path, value)):
                return path, bool(loaded) and same_file(path, loaded[1])
        return None

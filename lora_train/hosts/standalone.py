"""The standalone app's and the CLI's host: diffusers generation with our own `sampler.Generator`."""
from __future__ import annotations

import os
import threading
from typing import Dict, List, Optional, Sequence, Tuple

from ..models import BaseModel, load_base_model
from ..sampler import Generator
from .base import Host


class StandaloneHost(Host):
    """The standalone app and the CLI: diffusers generation with our own `sampler.Generator`."""

    name = "standalone"
    title = "the standalone app"

    def __init__(self, base_model: str = "tiny", lora_dir: str = "loras", roots: Optional[Sequence[str]] = None,
                 prediction_type: str = "auto", allow_pickle: bool = False, files: Optional[Dict[str, str]] = None):
        self.base_spec = base_model or "tiny"
        self.files = dict(files or {})  # Flux / SD3 component files (ae, clip_l, clip_g, t5xxl) of a single file
        self.prediction_type, self.allow_pickle = prediction_type, allow_pickle  # as the config asks (CLI)
        self._lora_dir = os.path.abspath(lora_dir)
        self._roots = [os.path.abspath(r) for r in roots] if roots is not None else None
        self._model: Optional[BaseModel] = None
        self._gen = None
        self._lock = threading.Lock()

    def lora_dirs(self) -> List[str]:
        return [self._lora_dir]

    def loaded_checkpoint(self) -> Optional[Tuple[str, str]]:
        return (os.path.basename(self.base_spec.rstrip("/\\")) or self.base_spec, self.base_spec)

    def checkpoints(self) -> Dict[str, str]:
        name, path = self.loaded_checkpoint()
        return {name: path}

    @classmethod
    def for_config(cls, cfg) -> "StandaloneHost":
        """The CLI's host: the config's base model (with its prediction type and pickle opt-in) and its output
        folder as the LoRA folder."""
        return cls(cfg.base_model, cfg.output_dir, prediction_type=cfg.prediction_type, allow_pickle=cfg.allow_pickle,
                   files=cfg.component_files)

    def base_model(self, spec: Optional[str] = None) -> BaseModel:
        return load_base_model(spec or self.base_spec, self.prediction_type, allow_pickle=self.allow_pickle,
                               files=self.files)

    def refresh_loras(self) -> None:
        self._gen = None  # the Generator caches files by (size, mtime); a new run gets a fresh one

    def allowed_roots(self) -> Optional[List[str]]:
        return self._roots

    def generate(self, params):
        with self._lock:
            if self._gen is None:
                if self._model is None:
                    self._model = self.base_model()
                self._gen = Generator(self._model, self.lora_dirs())
            return self._gen.generate(params)

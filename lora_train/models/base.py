"""The BaseModel bundle every family fills (components, kind, prediction type) and ModelError."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any


class ModelError(ValueError):
    """A base model that cannot be used; the message says what it is and what to do."""


def require(title: str, needs) -> None:
    """A ModelError naming the versions when this environment lacks a family's classes. `needs`: [(package,
    (class names), "package >= version")]; the message names what is missing and what this environment has."""
    missing = []
    for package, names, wanted in needs:
        try:
            mod = __import__(package, fromlist=list(names))
            for n in names:
                getattr(mod, n)
        except (ImportError, AttributeError, RuntimeError):  # diffusers' lazy modules raise RuntimeError when a
            missing.append(wanted)                          # pipeline's own imports (transformers) fail
    if missing:
        import diffusers
        import transformers

        raise ModelError(f"{title} needs {' and '.join(missing)} (here: diffusers {diffusers.__version__}, "
                         f"transformers {transformers.__version__}). Update them in this environment (pip install "
                         f"-U diffusers transformers), or train {title} in ComfyUI, Forge Neo or `python -m "
                         f"lora_train`, which have current versions.")


@dataclass
class BaseModel:
    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    noise_scheduler: Any
    kind: str = "sd1"  # sd1 | sd2 | sdxl | flux | sd3 (flow matching: models/flow.py)
    name: str = "tiny"
    path: str = ""
    text_encoder_2: Any = None
    tokenizer_2: Any = None
    native_resolution: int = 512
    text_encoder_3: Any = None  # SD3's T5 (Flux's T5 is text_encoder_2)
    tokenizer_3: Any = None
    extra: dict = field(default_factory=dict)

    @property
    def prediction_type(self) -> str:
        from .. import families

        return families.of(self).prediction_type(self)

    @property
    def vae_scale(self) -> float:
        return float(getattr(self.vae.config, "scaling_factor", 0.18215))

    @property
    def vae_shift(self) -> float:
        """Latent shift (Flux / SD3 VAEs: latents = (mean - shift) * scale); 0 for SD1/SD2/SDXL."""
        return float(getattr(self.vae.config, "shift_factor", None) or 0.0)

    @property
    def text_encoders(self):
        return [t for t in (self.text_encoder, self.text_encoder_2, self.text_encoder_3) if t is not None]

    def to(self, device=None, dtype=None) -> "BaseModel":
        for m in (self.unet, self.vae, *self.text_encoders):
            m.to(device=device, dtype=dtype)
        return self

    def model_hash(self) -> str:
        """Short hash of the identity of the base model (path + name), for metadata."""
        return hashlib.sha256(f"{self.kind}:{self.name}:{self.path}".encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------- tiny tokenizer

"""Base models: the BaseModel bundle (`base`), loading any spec (`loading`), diffusers folders
(`diffusers_folder`), single-file checkpoints (`single_file`), the tiny demo models (`tiny`) and the text
conditioning of each family (`conditioning`)."""
from .base import BaseModel, ModelError
from .loading import TINY_SPECS, load_base_model

__all__ = ["BaseModel", "ModelError", "TINY_SPECS", "load_base_model"]

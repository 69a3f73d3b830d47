"""Command line: `python -m lora_train train | auto | demo | caption | suggest | lr-find | sample | ui | tiny-model`."""
from .main import main

__all__ = ["main"]

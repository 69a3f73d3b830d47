"""What the ComfyUI-side check scripts share (comfyui_flow_lora_check.py, comfyui_flow_train_check.py,
comfyui_families_check.py; each runs with ComfyUI's python, cwd and PYTHONPATH = the ComfyUI checkout):
`start_cpu()` makes ComfyUI parse `--cpu` before torch and comfy are imported, `capture_warnings()` keeps its
warnings (ComfyUI reports a LoRA key it cannot place as a "lora key not loaded" warning)."""
import logging
import sys


def start_cpu() -> None:
    """Call before importing torch or any comfy module."""
    sys.argv = [sys.argv[0], "--cpu"]
    import comfy.options

    comfy.options.enable_args_parsing()


class Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def capture_warnings() -> Warnings:
    handler = Warnings()
    logging.getLogger().addHandler(handler)
    return handler

"""lora_train: one in-process LoRA trainer for Stable Diffusion (core, host-free)."""
__version__ = "0.1.0"

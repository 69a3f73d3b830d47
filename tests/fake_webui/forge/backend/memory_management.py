"""Forge backend.memory_management surface."""
calls = []
current_loaded_models = ["unet", "clip", "vae"]


def unload_all_models():
    calls.append("unload_all_models")
    current_loaded_models.clear()


def soft_empty_cache(force=False):
    calls.append("soft_empty_cache")

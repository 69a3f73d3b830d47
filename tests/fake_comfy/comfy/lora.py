"""Fake of comfy.lora (0.8.0): model_lora_keys_unet maps, for every `diffusion_model.X.weight` of the model,
`lora_unet_<X with _>` and `diffusion_model.X` to it (ComfyUI's generic names); load_lora returns the model keys
whose LoRA tensors (lora_up / lora_down, hada_*, lokr_*) are in the file, logging the rest as ComfyUI does."""
import logging


def model_lora_keys_unet(model, key_map={}):
    for k in model.state_dict().keys():
        if k.startswith("diffusion_model.") and k.endswith(".weight"):
            key_lora = k[len("diffusion_model."):-len(".weight")].replace(".", "_")
            key_map[f"lora_unet_{key_lora}"] = k
            key_map[k[:-len(".weight")]] = k
    return key_map


_PARTS = ("lora_up.weight", "lora_down.weight", "hada_w1_a", "lokr_w1", "lokr_w1_a")


def load_lora(lora, to_load, log_missing=True):
    patch_dict, loaded = {}, set()
    for name, key in to_load.items():
        if any(f"{name}.{p}" in lora for p in _PARTS):
            patch_dict[key] = ("lora", name)
            loaded |= {k for k in lora if k.startswith(name + ".")}
    for k in lora:
        if k not in loaded and log_missing:
            logging.warning("lora key not loaded: %s", k)
    return patch_dict

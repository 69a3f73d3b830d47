"""Forge sd_forge_lora `networks` surface: load_lora_state_dict is an lru_cache keyed by file name (a file
rewritten under the same name keeps its old weights), and load_networks returns early while the compiled
(filename, strengths) hash equals sd_model.current_lora_hash; the patched modules' LoraLoader re-merges only when
the (filename, strengths) keys change (fake_model._LoraLoader)."""
import functools
import json
import os
import struct

from safetensors.torch import load_file

from modules import shared, sd_models

available_networks = {}
available_network_aliases = {}
forbidden_network_aliases = {}
loaded_networks = []
list_calls = 0


class NetworkOnDisk:
    def __init__(self, name, filename):
        self.name, self.filename = name, filename
        with open(filename, "rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            self.metadata = json.loads(fh.read(n)).get("__metadata__", {})
        self.alias = self.metadata.get("ss_output_name", name)

    def read_hash(self):
        pass


@functools.lru_cache(maxsize=5)
def load_lora_state_dict(filename):
    return load_file(filename)


def list_available_networks():
    global list_calls
    list_calls += 1
    available_networks.clear()
    available_network_aliases.clear()
    os.makedirs(shared.cmd_opts.lora_dir, exist_ok=True)
    for filename in shared.walk_files(shared.cmd_opts.lora_dir, allowed_extensions=[".pt", ".ckpt", ".safetensors"]):
        name = os.path.splitext(os.path.basename(filename))[0]
        entry = NetworkOnDisk(name, filename)
        available_networks[name] = entry
        available_network_aliases[name] = entry
        available_network_aliases[entry.alias] = entry


def load_networks(names, te_multipliers=None, unet_multipliers=None, dyn_dims=None):
    current_sd = sd_models.model_data.sd_model
    loaded_networks.clear()
    on_disk = [available_network_aliases.get(n) for n in names]
    targets = [[d.filename, u, t] for d, u, t in zip(on_disk, unet_multipliers or [], te_multipliers or []) if d]
    h = str(targets)
    if current_sd.current_lora_hash == h:
        return
    current_sd.current_lora_hash = h
    current_sd.forge_objects.unet = current_sd.forge_objects_original.unet
    current_sd.forge_objects.clip = current_sd.forge_objects_original.clip
    for filename, strength_model, strength_clip in targets:
        sd = load_lora_state_dict(filename)
        value = float(sum(v.float().sum() for k, v in sd.items() if k.endswith("lora_up.weight")))
        unet = current_sd.forge_objects.unet.clone()
        unet.add_patches(filename=filename, value=value, strength_patch=strength_model)
        clip = current_sd.forge_objects.clip.clone()
        clip.add_patches(filename=filename, value=value, strength_patch=strength_clip)
        current_sd.forge_objects.unet, current_sd.forge_objects.clip = unet, clip


list_available_networks()

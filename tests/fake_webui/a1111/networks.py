"""The A1111 1.10.1 built-in Lora extension's `networks` surface: list_available_networks (scans
cmd_opts.lora_dir; aliases from ss_output_name), load_networks (networks_in_memory by name, re-read only when
the file's mtime is newer), and weight application that keeps a backup and skips a layer whose
`network_current_names` (name, te, unet, dyn) tuple is unchanged - the cause of stale LoRAs."""
import json
import os
import struct

import torch
from safetensors.torch import load_file

from modules import shared

available_networks = {}
available_network_aliases = {}
forbidden_network_aliases = {}
loaded_networks = []
networks_in_memory = {}
list_calls = 0


def _metadata(filename):
    with open(filename, "rb") as fh:
        n = struct.unpack("<Q", fh.read(8))[0]
        return json.loads(fh.read(n)).get("__metadata__", {})


class NetworkOnDisk:
    def __init__(self, name, filename):
        self.name, self.filename = name, filename
        self.metadata = _metadata(filename) if filename.endswith(".safetensors") else {}
        self.alias = self.metadata.get("ss_output_name", name)

    def read_hash(self):
        pass


class Network:
    def __init__(self, name, on_disk):
        self.name, self.network_on_disk = name, on_disk
        self.te_multiplier = self.unet_multiplier = 1.0
        self.dyn_dim = None
        self.mtime = None
        self.value = 0.0


def file_value(filename):
    sd = load_file(filename)
    return float(sum(v.float().sum() for k, v in sd.items() if k.endswith("lora_up.weight")))


def load_network(name, on_disk):
    net = Network(name, on_disk)
    net.mtime = os.path.getmtime(on_disk.filename)
    net.value = file_value(on_disk.filename)
    return net


def list_available_networks():
    global list_calls
    list_calls += 1
    available_networks.clear()
    available_network_aliases.clear()
    forbidden_network_aliases.clear()
    forbidden_network_aliases.update({"none": 1, "Addams": 1})
    os.makedirs(shared.cmd_opts.lora_dir, exist_ok=True)
    for filename in shared.walk_files(shared.cmd_opts.lora_dir, allowed_extensions=[".pt", ".ckpt", ".safetensors"]):
        name = os.path.splitext(os.path.basename(filename))[0]
        entry = NetworkOnDisk(name, filename)
        available_networks[name] = entry
        if entry.alias in available_network_aliases:
            forbidden_network_aliases[entry.alias.lower()] = 1
        available_network_aliases[name] = entry
        available_network_aliases[entry.alias] = entry


def load_networks(names, te_multipliers=None, unet_multipliers=None, dyn_dims=None):
    already_loaded = {net.name: net for net in loaded_networks if net.name in names}
    loaded_networks.clear()
    on_disk = [available_network_aliases.get(n) for n in names]  # no refresh here: new files need a list refresh
    for i, (entry, name) in enumerate(zip(on_disk, names)):
        if entry is None:
            continue
        net = already_loaded.get(name) or networks_in_memory.get(name)
        if net is None or os.path.getmtime(entry.filename) > net.mtime:
            net = load_network(name, entry)
            networks_in_memory[name] = net
        net.te_multiplier = te_multipliers[i] if te_multipliers else 1.0
        net.unet_multiplier = unet_multipliers[i] if unet_multipliers else 1.0
        net.dyn_dim = dyn_dims[i] if dyn_dims else None
        loaded_networks.append(net)


def network_restore_weights_from_backup(layer):
    backup = getattr(layer, "network_weights_backup", None)
    if backup is not None:
        layer.weight.copy_(backup)  # as A1111: no no_grad here (its callers run under no_grad)


def network_apply_weights(layer):
    name = getattr(layer, "network_layer_name", None)
    if name is None:
        return
    current = getattr(layer, "network_current_names", ())
    wanted = tuple((x.name, x.te_multiplier, x.unet_multiplier, x.dyn_dim) for x in loaded_networks)
    if getattr(layer, "network_weights_backup", None) is None and wanted != ():
        layer.network_weights_backup = layer.weight.detach().to("cpu", copy=True)
    if current != wanted:
        network_restore_weights_from_backup(layer)
        if True:
            for net in loaded_networks:
                mult = net.unet_multiplier if name.startswith("diffusion_model") else net.te_multiplier
                layer.weight.add_(net.value * mult / layer.weight.numel())
        layer.network_current_names = wanted


def apply_all(model):
    """Stands in for the patched Linear/Conv forward that calls network_apply_weights on every layer."""
    for m in model.modules():
        network_apply_weights(m)


list_available_networks()

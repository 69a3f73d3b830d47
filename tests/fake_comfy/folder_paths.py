"""Fake of ComfyUI's folder_paths (0.8.0): folder registry, filename list cache, temp/output/input dirs."""
import os
import time

supported_pt_extensions = {".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}
folder_names_and_paths = {}
filename_list_cache = {}
base_path = ""
output_directory = ""
temp_directory = ""
input_directory = ""


class CacheHelper:
    def __init__(self):
        self.cache = {}
        self.active = False

    def get(self, key, default=None):
        return self.cache.get(key, default) if self.active else default

    def set(self, key, value):
        if self.active:
            self.cache[key] = value

    def clear(self):
        self.cache.clear()


cache_helper = CacheHelper()


def setup(root):
    """Test helper (not in ComfyUI): a ComfyUI-like tree under `root`."""
    global base_path, output_directory, temp_directory, input_directory
    base_path = root
    folder_names_and_paths.clear()
    filename_list_cache.clear()
    for name in ("loras", "checkpoints"):
        d = os.path.join(root, "models", name)
        os.makedirs(d, exist_ok=True)
        folder_names_and_paths[name] = ([d], set(supported_pt_extensions))
    output_directory, temp_directory, input_directory = (os.path.join(root, n) for n in ("output", "temp", "input"))
    for d in (output_directory, temp_directory, input_directory):
        os.makedirs(d, exist_ok=True)


def get_output_directory():
    return output_directory


def get_temp_directory():
    return temp_directory


def get_input_directory():
    return input_directory


def get_folder_paths(folder_name):
    return folder_names_and_paths[folder_name][0][:]


def get_full_path(folder_name, filename):
    if folder_name not in folder_names_and_paths:
        return None
    filename = os.path.relpath(os.path.join("/", filename), "/")
    for x in folder_names_and_paths[folder_name][0]:
        full_path = os.path.join(x, filename)
        if os.path.isfile(full_path):
            return full_path
    return None


def get_full_path_or_raise(folder_name, filename):
    p = get_full_path(folder_name, filename)
    if p is None:
        raise FileNotFoundError(f"Model in folder '{folder_name}' with filename '{filename}' not found.")
    return p


def _scan(folder_name):
    out = set()
    dirs = {}
    paths, exts = folder_names_and_paths[folder_name]
    for x in paths:
        if not os.path.isdir(x):
            continue
        dirs[x] = os.path.getmtime(x)
        for dirpath, subdirs, files in os.walk(x, followlinks=True):
            for d in subdirs:
                dirs[os.path.join(dirpath, d)] = os.path.getmtime(os.path.join(dirpath, d))
            for f in files:
                if os.path.splitext(f)[1].lower() in exts or not exts:
                    out.add(os.path.relpath(os.path.join(dirpath, f), x))
    return sorted(out), dirs, time.perf_counter()


def get_filename_list(folder_name):
    """Like ComfyUI: cached until a listed folder's mtime changes (so a refresh must drop the cache when a
    file is replaced in place; tests use `filename_list_cache` directly)."""
    out = cache_helper.get(folder_name) or filename_list_cache.get(folder_name)
    if out is not None and any(os.path.getmtime(d) != t for d, t in out[1].items() if os.path.isdir(d)):
        out = None
    if out is None:
        out = _scan(folder_name)
        filename_list_cache[folder_name] = out
    cache_helper.set(folder_name, out)
    return list(out[0])

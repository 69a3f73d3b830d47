"""Fake of comfy.utils: ProgressBar (same hook protocol as ComfyUI 0.8.0) and load_torch_file."""
PROGRESS_BAR_ENABLED = True
PROGRESS_BAR_HOOK = None


def set_progress_bar_global_hook(function):
    global PROGRESS_BAR_HOOK
    PROGRESS_BAR_HOOK = function


class ProgressBar:
    def __init__(self, total, node_id=None):
        self.total = total
        self.current = 0
        self.hook = PROGRESS_BAR_HOOK
        self.node_id = node_id

    def update_absolute(self, value, total=None, preview=None):
        if total is not None:
            self.total = total
        if value > self.total:
            value = self.total
        self.current = value
        if self.hook is not None:
            self.hook(self.current, self.total, preview, node_id=self.node_id)

    def update(self, value):
        self.update_absolute(self.current + value)


def load_torch_file(ckpt, safe_load=False, device=None, return_metadata=False):
    import safetensors.torch

    if not ckpt.lower().endswith((".safetensors", ".sft")):
        raise ValueError("the fake only reads safetensors")
    sd = safetensors.torch.load_file(ckpt, device="cpu")
    if return_metadata:
        from safetensors import safe_open

        with safe_open(ckpt, framework="pt") as f:
            return sd, f.metadata()
    return sd


def state_dict_prefix_replace(state_dict, replace_prefix, filter_keys=False):
    out = {} if filter_keys else state_dict
    for rp in replace_prefix:
        replace = [(a, "{}{}".format(replace_prefix[rp], a[len(rp):])) for a in state_dict if a.startswith(rp)]
        for x in replace:
            out[x[1]] = state_dict.pop(x[0])
    return out

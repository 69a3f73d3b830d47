"""Fake of comfy.model_patcher.ModelPatcher: clone() shares the model and copies the patch lists;
add_patches() keeps only keys present in model.state_dict() and returns them (as 0.8.0 does)."""
import copy


class ModelPatcher:
    def __init__(self, model, lora_key_map=None, load_device=None):
        self.model = model
        self.patches = {}
        self.weight_wrapper_patches = {}
        self.model_options = {"transformer_options": {}}
        self.load_device = load_device
        self.lora_key_map = lora_key_map or {}  # kohya module name -> model key (comfy.lora.model_lora_keys_*)
        self.unloaded = 0

    def clone(self):
        n = ModelPatcher(self.model, self.lora_key_map, self.load_device)
        n.patches = {k: list(v) for k, v in self.patches.items()}
        n.weight_wrapper_patches = {k: list(v) for k, v in self.weight_wrapper_patches.items()}
        return n

    def add_weight_wrapper(self, name, function):
        self.weight_wrapper_patches[name] = self.weight_wrapper_patches.get(name, []) + [function]

    def load(self, device_to=None, lowvram_model_memory=0, force_patch_weights=False, full_load=False):
        """As 0.8.0's load (full load): every comfy layer's weight_function is reset, then gets the wrappers of
        its key; the functions are moved to the device."""
        for n, m in self.model.named_modules():
            if not hasattr(m, "weight_function"):
                continue
            m.weight_function, m.bias_function = [], []
            m.weight_function.extend(self.weight_wrapper_patches.get(f"{n}.weight", []))
            m.bias_function.extend(self.weight_wrapper_patches.get(f"{n}.bias", []))
            for f in m.weight_function:
                if hasattr(f, "move_to"):
                    f.move_to(device=device_to)

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        p = set()
        model_sd = self.model.state_dict()
        for k in patches:
            if k in model_sd:
                p.add(k)
                self.patches.setdefault(k, []).append((strength_patch, patches[k], strength_model, None, None))
        return list(p)

    def model_unload(self):  # what comfy.model_management.unload_all_models ends up calling per loaded model
        self.unloaded += 1

    def patch_effect(self):
        """Test helper: sum over patches of strength * alpha/rank * sum(up @ down) (a stand-in for the change
        the patches make to the weights)."""
        total = 0.0
        for plist in self.patches.values():
            for strength, (down, up, alpha), *_ in plist:
                rank = down.shape[0]
                scale = (float(alpha) / rank) if alpha is not None else 1.0
                total += strength * scale * float((up.flatten(1).float() @ down.flatten(1).float()).sum())
        return total

    def deepcopy_model(self):
        return copy.deepcopy(self.model)

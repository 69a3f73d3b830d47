"""Fake of comfy.model_patcher.ModelPatcher: clone() shares the model and copies the patch lists;
add_patches() keeps only keys present in model.state_dict() and returns them (as 0.8.0 does)."""
import copy


class ModelPatcher:
    def __init__(self, model, lora_key_map=None):
        self.model = model
        self.patches = {}
        self.lora_key_map = lora_key_map or {}  # kohya module name -> model key (comfy.lora.model_lora_keys_*)
        self.unloaded = 0

    def clone(self):
        n = ModelPatcher(self.model, self.lora_key_map)
        n.patches = {k: list(v) for k, v in self.patches.items()}
        return n

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

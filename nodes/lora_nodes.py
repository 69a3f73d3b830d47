"""The ComfyUI nodes (classic node API: INPUT_TYPES / RETURN_TYPES / FUNCTION / CATEGORY), one group per module
as ComfyUI's comfy_extras/nodes_*.py: nodes_dataset (folder, captions, advice), nodes_train (Train LoRA),
nodes_lora (apply, prompt tags, sweep), auto_node (Auto LoRA); their shared parts in common.py. This module
registers them.

Import cost at ComfyUI start: only lora_train's light modules (config, advisor, prompt, io_utils) and this
package's glue; torch-heavy parts of the core (trainer, diffusers, peft) load when a node runs. ComfyUI's own
modules (folder_paths, comfy.*, nodes) are imported inside the functions that use them.
"""
from __future__ import annotations

from .auto_node import LoraTrainAuto
from .names import NODE_NAMES
from .nodes_dataset import LoraTrainCaptionDataset, LoraTrainDatasetFromFolder, LoraTrainSuggestSettings
from .nodes_lora import LoraTrainApplyLora, LoraTrainPromptWithTags, LoraTrainStrengthSweep
from .nodes_train import LoraTrainTrain

NODE_CLASS_MAPPINGS = {
    "LoraTrainDatasetFromFolder": LoraTrainDatasetFromFolder,
    "LoraTrainCaptionDataset": LoraTrainCaptionDataset,
    "LoraTrainSuggestSettings": LoraTrainSuggestSettings,
    "LoraTrainTrain": LoraTrainTrain,
    "LoraTrainApplyLora": LoraTrainApplyLora,
    "LoraTrainPromptWithTags": LoraTrainPromptWithTags,
    "LoraTrainStrengthSweep": LoraTrainStrengthSweep,
    "LoraTrainAuto": LoraTrainAuto,
}
NODE_DISPLAY_NAME_MAPPINGS = {k: NODE_NAMES[k] for k in NODE_CLASS_MAPPINGS}

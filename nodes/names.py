"""Node ids and display names (no imports: the root __init__ also uses them for placeholder nodes)."""

CATEGORY = "LoRA Train"
DATASET_TYPE = "LORA_TRAIN_DATASET"

NODE_NAMES = {
    "LoraTrainDatasetFromFolder": "Dataset from folder (LoRA Train)",
    "LoraTrainCaptionDataset": "Caption dataset (LoRA Train)",
    "LoraTrainSuggestSettings": "Suggest settings (LoRA Train)",
    "LoraTrainTrain": "Train LoRA (LoRA Train)",
    "LoraTrainApplyLora": "Apply LoRA (LoRA Train)",
    "LoraTrainPromptWithTags": "Prompt with LoRA tags (LoRA Train)",
    "LoraTrainStrengthSweep": "LoRA strength sweep (LoRA Train)",
    "LoraTrainAuto": "Auto LoRA (LoRA Train)",
}

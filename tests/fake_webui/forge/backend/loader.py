"""Forge's backend/loader.py surface: `HF`, the folder of the configs Forge bundles per supported model (Forge Neo:
backend/huggingface/<org>/<repo>/ with model_index.json, <part>/config.json, tokenizer/, scheduler/ and no weights;
forge_loader takes every part's config from `os.path.join(HF, estimated_config.huggingface_repo)` and its weights
from the checkpoint and the "VAE / Text Encoder" files). The tests write a tiny model's folder tree and point
FAKE_FORGE_HF at it."""
import os

HF = os.environ.get("FAKE_FORGE_HF") or os.path.join(os.path.dirname(__file__), "huggingface")

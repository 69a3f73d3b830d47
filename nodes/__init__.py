"""ComfyUI nodes of lora_train (loaded through the repo root `__init__.py`, which ComfyUI imports from
`custom_nodes/`). Kept import-free on purpose: `names` must import even when the nodes cannot."""

"""Where lora_train runs: the `Host` interface (`base`), the standalone app (`standalone`), AUTOMATIC1111 / Forge
(`webui`), ComfyUI (`comfyui`) and the WebUI install plan (`install_plan`)."""
from .base import USED_NAMES, Host, HostError

__all__ = ["Host", "HostError", "USED_NAMES"]

"""shared: cmd_opts (argparse namespace with the WebUI's flags and the Lora extension's --lora-dir), opts,
state, sd_model (the real one is a property that loads a model on first use; here a plain attribute)."""
import os
import types

from modules import paths
from modules.shared_state import State

cmd_opts = types.SimpleNamespace(
    lora_dir=os.path.join(paths.models_path, "Lora"),
    lyco_dir_backcompat=os.path.join(paths.models_path, "LyCORIS"),
    ckpt_dir=None, share=False, listen=False, ngrok=None, server_name=None,
    enable_insecure_extension_access=False, gradio_allowed_path=[paths.data_path],
    embeddings_dir=os.path.join(paths.data_path, "embeddings"),
)
cmd_opts.webui_is_non_local = False
opts = types.SimpleNamespace(persistent_cond_cache=True, lora_in_memory_limit=0)
state = State()
sd_model = None
interrogator = None  # set by shared_init at start-up: interrogate.InterrogateModels("interrogate")
device = None


def set_non_local(listen=False, share=False, insecure=False):
    """Test aid: what shared_cmd_options computes at start-up."""
    cmd_opts.listen, cmd_opts.share, cmd_opts.enable_insecure_extension_access = listen, share, insecure
    cmd_opts.webui_is_non_local = any([cmd_opts.share, cmd_opts.listen, cmd_opts.ngrok, cmd_opts.server_name])
    cmd_opts.disable_extension_access = cmd_opts.webui_is_non_local and not insecure


def walk_files(path, allowed_extensions=None):
    if not os.path.exists(path):
        return
    for root, _, files in os.walk(path, followlinks=True):
        for f in sorted(files):
            if allowed_extensions and os.path.splitext(f)[1].lower() not in allowed_extensions:
                continue
            yield os.path.join(root, f)

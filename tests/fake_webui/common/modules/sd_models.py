"""A1111 1.10.1 sd_models surface: checkpoints_list, model_data, unload_model_weights (moves to CPU),
send_model_to_cpu / send_model_to_device, reload_model_weights (returns early for the loaded checkpoint)."""
from modules import devices, shared

checkpoints_list = {}


def get_closet_checkpoint_match(search_string):
    import fake_model

    return fake_model.get_closet_checkpoint_match(checkpoints_list, search_string)
calls = []


class SdModelData:
    def __init__(self):
        self.sd_model = None
        self.loaded_sd_models = []
        self.was_loaded_at_least_once = False

    def set_sd_model(self, v):
        self.sd_model = v
        shared.sd_model = v


model_data = SdModelData()


def send_model_to_cpu(m):
    calls.append("send_model_to_cpu")
    if m is not None:
        m.to(devices.cpu)
    devices.torch_gc()


def send_model_to_device(m):
    calls.append("send_model_to_device")
    m.to(shared.device or devices.device)


def unload_model_weights(sd_model=None, info=None):
    calls.append("unload_model_weights")
    send_model_to_cpu(sd_model or shared.sd_model)
    return sd_model


def reload_model_weights(sd_model=None, info=None, forced_reload=False):
    calls.append("reload_model_weights")
    sd_model = sd_model or model_data.sd_model
    if sd_model is not None and (info is None or sd_model.sd_model_checkpoint == info.filename) and not forced_reload:
        return sd_model  # unchanged checkpoint: nothing is moved back
    raise NotImplementedError("fake: loading another checkpoint")

"""Forge's modules/sd_models.py surface (installed as `modules.sd_models` by the tests): the A1111 functions
are stubs, the model lives in model_data (a FakeInitialModel until one loads), forge_model_reload() reloads
only when the loading parameters changed."""
from backend import memory_management

checkpoints_list = {}


def get_closet_checkpoint_match(search_string):
    import fake_model

    return fake_model.get_closet_checkpoint_match(checkpoints_list, search_string)
calls = []


class FakeInitialModel:
    def __init__(self):
        self.cond_stage_model = None


class SdModelData:
    def __init__(self):
        self.sd_model = FakeInitialModel()
        self.forge_loading_parameters = {}
        self.forge_hash = ""

    def set_sd_model(self, v):
        from modules import shared

        self.sd_model = v
        shared.sd_model = v


model_data = SdModelData()


def send_model_to_cpu(m):
    calls.append("send_model_to_cpu(stub)")


def send_model_to_device(m):
    calls.append("send_model_to_device(stub)")


def reload_model_weights(sd_model=None, info=None, forced_reload=False):
    calls.append("reload_model_weights(stub)")


def unload_model_weights(sd_model=None, info=None):
    memory_management.unload_all_models()


def forge_model_reload():
    calls.append("forge_model_reload")
    current = str(model_data.forge_loading_parameters)
    if model_data.forge_hash == current:
        return model_data.sd_model, False
    model_data.forge_hash = current
    return model_data.sd_model, True

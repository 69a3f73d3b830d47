"""Fake of comfy.model_management: interrupt flag (same functions and semantics as 0.8.0), memory calls
recorded in CALLS, loaded models unloaded by unload_all_models."""
import threading

import torch

CALLS = []          # test helper: names of the memory functions called, in order
current_loaded_models = []  # objects with .model_unload(); unload_all_models empties it


class InterruptProcessingException(Exception):
    pass


interrupt_processing_mutex = threading.RLock()
interrupt_processing = False


def interrupt_current_processing(value=True):
    global interrupt_processing
    with interrupt_processing_mutex:
        interrupt_processing = value


def processing_interrupted():
    with interrupt_processing_mutex:
        return interrupt_processing


def throw_exception_if_processing_interrupted():
    global interrupt_processing
    with interrupt_processing_mutex:
        if interrupt_processing:
            interrupt_processing = False
            raise InterruptProcessingException()


def get_torch_device():
    return torch.device("cpu")


def unload_all_models():
    CALLS.append("unload_all_models")
    while current_loaded_models:
        current_loaded_models.pop().model_unload()


def soft_empty_cache(force=False):
    CALLS.append("soft_empty_cache")


def load_models_gpu(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None,
                    force_full_load=False):
    """Loads each ModelPatcher on the (CPU) device: its weight wrappers attached (ModelPatcher.load)."""
    CALLS.append("load_models_gpu")
    for m in models:
        m.load(get_torch_device(), full_load=force_full_load)
        if m not in current_loaded_models:
            current_loaded_models.append(m)

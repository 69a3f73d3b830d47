"""Fake of comfy.samplers: the sampler / scheduler name lists the KSampler node offers."""


class KSampler:
    SAMPLERS = ["euler", "euler_ancestral", "dpmpp_2m", "ddim"]
    SCHEDULERS = ["normal", "karras", "simple"]

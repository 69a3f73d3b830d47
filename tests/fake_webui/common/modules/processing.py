"""processing surface: StableDiffusionProcessingTxt2Img, process_images, the class-level conditioning cache
(cached_c / cached_uc: same prompt + same extra-network data = the cached conditioning is reused)."""
import re
import sys

from PIL import Image

from modules import shared

re_lora = re.compile(r"<lora:([^:>]+)(?::([^:>]+))?>")
last = {}  # test aid: what the last generation used


class StableDiffusionProcessing:
    cached_uc = [None, None]
    cached_c = [None, None]

    def __init__(self, sd_model=None, prompt="", negative_prompt="", seed=-1, steps=50, cfg_scale=7.0, width=512,
                 height=512, sampler_name=None, batch_size=1, n_iter=1, do_not_save_samples=False,
                 do_not_save_grid=False, **kwargs):
        self.prompt, self.negative_prompt, self.seed, self.steps = prompt, negative_prompt, seed, steps
        self.cfg_scale, self.width, self.height, self.sampler_name = cfg_scale, width, height, sampler_name
        self.batch_size, self.n_iter = batch_size, n_iter
        self.do_not_save_samples, self.do_not_save_grid = do_not_save_samples, do_not_save_grid
        self.extra = kwargs
        self.cached_uc = StableDiffusionProcessing.cached_uc
        self.cached_c = StableDiffusionProcessing.cached_c
        self.closed = False

    @property
    def sd_model(self):
        return shared.sd_model

    def get_conds_with_caching(self, function, required_prompts, cache, extra_network_data):
        params = (required_prompts, repr(extra_network_data))
        if cache[0] is not None and cache[0] == params:
            return cache[1]
        cache[1] = function()
        cache[0] = params
        return cache[1]

    def close(self):
        self.closed = True
        if not shared.opts.persistent_cond_cache:
            StableDiffusionProcessing.cached_c = [None, None]
            StableDiffusionProcessing.cached_uc = [None, None]


class StableDiffusionProcessingTxt2Img(StableDiffusionProcessing):
    pass


class Processed:
    def __init__(self, p, images, info=""):
        self.images, self.info, self.prompt = images, info, p.prompt


def process_images(p):
    import torch

    with torch.no_grad():  # as A1111: generation (and the Lora extension's weight patching) runs without grad
        return _process_images(p)


def _process_images(p):
    loras = [(m.group(1), float(m.group(2) or 1.0)) for m in re_lora.finditer(p.prompt)]
    prompt = re_lora.sub("", p.prompt).strip()
    networks = sys.modules.get("networks")
    model = shared.sd_model
    if networks is not None:
        names = [n for n, _ in loras]
        mults = [w for _, w in loras]
        networks.load_networks(names, te_multipliers=mults, unet_multipliers=mults, dyn_dims=[None] * len(names))
        if hasattr(networks, "apply_all"):  # A1111 applies in its patched Linear/Conv forward
            networks.apply_all(model)
    cond = p.get_conds_with_caching(model.te_value, prompt, p.cached_c, loras)
    last.clear()
    last.update(prompt=prompt, loras=loras, cond=cond, unet=model.unet_value(), sampler=p.sampler_name,
                seed=p.seed, steps=p.steps, size=(p.width, p.height))
    if shared.state.interrupted:
        return Processed(p, [])
    return Processed(p, [Image.new("RGB", (max(8, p.width // 8), max(8, p.height // 8)), (int(p.seed) % 256, 0, 0))])

"""Fake of comfy.samplers: the sampler / scheduler name lists the KSampler node offers."""


class KSampler:
    SAMPLERS = ["euler", "euler_ancestral", "dpmpp_2m", "ddim"]
    SCHEDULERS = ["normal", "karras", "simple"]


# ----------------------------------------------------------------------------- what in-place training uses
# (0.8.0's encode_model_conds, get_area_and_mult without areas / masks / timestep ranges, can_concat_cond, cond_cat)
import collections  # noqa: E402

import torch  # noqa: E402


def encode_model_conds(model_function, conds, noise, device, prompt_type, **kwargs):
    for t in range(len(conds)):
        x = conds[t]
        params = x.copy()
        params["device"] = device
        params["noise"] = noise
        params["width"] = params.get("width", noise.shape[3] * 8 if noise.ndim >= 4 else None)
        params["height"] = params.get("height", noise.shape[2] * 8)
        params["prompt_type"] = params.get("prompt_type", prompt_type)
        for k in kwargs:
            if k not in params:
                params[k] = kwargs[k]
        out = model_function(**params)
        x = x.copy()
        model_conds = x["model_conds"].copy()
        model_conds.update(out)
        x["model_conds"] = model_conds
        conds[t] = x
    return conds


def get_area_and_mult(conds, x_in, timestep_in):
    conditioning = {c: v.process_cond(batch_size=x_in.shape[0], area=None) for c, v in conds["model_conds"].items()}
    cond_obj = collections.namedtuple("cond_obj", ["input_x", "mult", "conditioning", "area", "control", "patches",
                                                   "uuid", "hooks"])
    return cond_obj(x_in, torch.ones_like(x_in), conditioning, None, conds.get("control"), None, conds["uuid"], None)


def cond_equal_size(c1, c2):
    if c1 is c2:
        return True
    if c1.keys() != c2.keys():
        return False
    return all(c1[k].can_concat(c2[k]) for k in c1)


def can_concat_cond(c1, c2):
    if c1.input_x.shape != c2.input_x.shape:
        return False
    if (c1.control is None) != (c2.control is None) or (c1.patches is None) != (c2.patches is None):
        return False
    return cond_equal_size(c1.conditioning, c2.conditioning)


def cond_cat(c_list):
    temp = {}
    for x in c_list:
        for k in x:
            temp.setdefault(k, []).append(x[k])
    return {k: v[0].concat(v[1:]) for k, v in temp.items()}

"""Fake of comfy.ops (0.8.0): the layer classes ComfyUI's models are built of. Each keeps `weight_function` /
`bias_function` lists; when one is set (or comfy_cast_weights), forward casts the stored weight to the input's
dtype and device and runs the functions on it, as cast_bias_weight does. Simplified: no offload streams, no
quantized tensors."""
import torch
from torch import nn


def cast_bias_weight(s, input):
    weight = s.weight.to(device=input.device, dtype=input.dtype, copy=True)
    for f in s.weight_function:
        weight = f(weight)
    bias = None
    if s.bias is not None:
        bias = s.bias.to(device=input.device, dtype=input.dtype, copy=True)
        for f in s.bias_function:
            bias = f(bias)
    return weight, bias


class CastWeightBiasOp:
    comfy_cast_weights = False
    weight_function = []
    bias_function = []


class disable_weight_init:
    class Linear(nn.Linear, CastWeightBiasOp):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.weight_function, self.bias_function = [], []

        def forward(self, input):
            if self.comfy_cast_weights or self.weight_function or self.bias_function:
                w, b = cast_bias_weight(self, input)
                return nn.functional.linear(input, w, b)
            return super().forward(input)

    class Conv2d(nn.Conv2d, CastWeightBiasOp):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.weight_function, self.bias_function = [], []

        def forward(self, input):
            if self.comfy_cast_weights or self.weight_function or self.bias_function:
                w, b = cast_bias_weight(self, input)
                return self._conv_forward(input, w, b)
            return super().forward(input)


manual_cast = disable_weight_init

"""A fixed, nearly invertible "VAE" for the demo model: its latent space is a rearrangement of pixels.

The tiny demo model's random AutoencoderKL turns any latent into coloured noise, so a grid cannot show what the
UNet learned. `PixelVAE` replaces it in the `tiny-pixel` demo model (`models.tiny.build_tiny_pixel`):

    encode:  x (B, 3, H, W) in [-1, 1] -> space-to-depth by 4 (pixel_unshuffle: (B, 48, H/4, W/4))
             -> a fixed (4 x 48) matrix with orthonormal rows -> latents (B, 4, H/4, W/4)
    decode:  the transpose (4 -> 48) -> depth-to-space (pixel_shuffle) -> x

The four rows are the mean red, green and blue of each 4x4 block and a top-minus-bottom brightness edge,
mixed by a fixed orthogonal 4x4 matrix (so no latent channel is a plain colour). With orthonormal rows,
decode(encode(x)) is the orthogonal projection of each 4x4 block onto those four directions: exact for images
whose 4x4 blocks are flat colours, a 4x-downsampled picture otherwise. So the colours and shapes the UNet learns
show in the pixels. No training, no download: the weights are a function of a seed.

It speaks the parts of the diffusers AutoencoderKL interface the pipelines, the trainer and the caches use:
`config.scaling_factor`, `config.shift_factor`, `config.block_out_channels` (its length gives the 4x factor),
`config.latent_channels`, `encode(x).latent_dist.mean / .sample()`, `decode(z).sample` / `decode(z,
return_dict=False)[0]`, `dtype`, `device`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from diffusers.models.modeling_utils import ModelMixin

PIXEL_FACTOR = 4


def pixel_basis(factor: int = PIXEL_FACTOR, seed: int = 0) -> torch.Tensor:
    """The (4, 3 * factor**2) encoder matrix with orthonormal rows, in pixel_unshuffle's channel order
    (channel c, row i, column j -> c * factor**2 + i * factor + j)."""
    n = factor * factor
    rows = torch.zeros(4, 3 * n, dtype=torch.float64)
    for c in range(3):  # mean of each colour over the block (unit norm: 1/factor per pixel)
        rows[c, c * n:(c + 1) * n] = 1.0 / factor
    edge = torch.zeros(factor, factor, dtype=torch.float64)  # top half bright, bottom half dark: an edge detector
    edge[: factor // 2] = 1.0
    edge[factor // 2:] = -1.0
    for c in range(3):
        rows[3, c * n:(c + 1) * n] = edge.reshape(-1)
    rows[3] /= rows[3].norm()
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(4, 4, generator=gen, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))  # a fixed orthogonal mix of the four directions
    return (q @ rows).float()


class PixelVAE(ModelMixin, ConfigMixin):
    """See the module docstring: a fixed linear space-to-depth autoencoder with AutoencoderKL's interface."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, in_channels: int = 3, out_channels: int = 3, latent_channels: int = 4,
                 block_out_channels=(4, 4, 4), scaling_factor: float = 1.0, shift_factor=None, seed: int = 0,
                 sample_size: int = 64, force_upcast: bool = False):
        super().__init__()
        if in_channels != 3 or out_channels != 3 or latent_channels != 4:
            raise ValueError("PixelVAE maps RGB images to 4 latent channels")
        if 2 ** (len(block_out_channels) - 1) != PIXEL_FACTOR:
            raise ValueError(f"block_out_channels must have {PIXEL_FACTOR.bit_length()} entries (factor {PIXEL_FACTOR})")
        self.register_buffer("basis", pixel_basis(PIXEL_FACTOR, seed))

    def _enc(self, x: torch.Tensor) -> torch.Tensor:
        blocks = F.pixel_unshuffle(x, PIXEL_FACTOR)  # (B, 48, H/4, W/4)
        return torch.einsum("kc,bchw->bkhw", self.basis.to(x.dtype), blocks)

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        mean = self._enc(x)
        # a "posterior" with (almost) no variance: sample() == mean up to 1e-6 noise, mode() == mean
        dist = DiagonalGaussianDistribution(torch.cat([mean, torch.full_like(mean, -30.0)], dim=1))
        if not return_dict:
            return (dist,)
        return AutoencoderKLOutput(latent_dist=dist)

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator=None):
        blocks = torch.einsum("kc,bkhw->bchw", self.basis.to(z.dtype), z)
        x = F.pixel_shuffle(blocks, PIXEL_FACTOR)
        if not return_dict:
            return (x,)
        return DecoderOutput(sample=x)

    def forward(self, sample: torch.Tensor, sample_posterior: bool = False, return_dict: bool = True,
                generator=None):
        return self.decode(self.encode(sample).latent_dist.mean, return_dict=return_dict)

    # the pipelines call these on an AutoencoderKL; nothing to tile or slice here
    def enable_slicing(self):
        return None

    def disable_slicing(self):
        return None

    def enable_tiling(self, *args, **kwargs):
        return None

    def disable_tiling(self):
        return None

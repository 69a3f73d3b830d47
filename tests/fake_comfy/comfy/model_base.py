"""Fake of comfy.model_base.BaseModel for an SD1.x checkpoint: holds the ldm UNet weights as
`diffusion_model`, exposes them under `diffusion_model.` in state_dict() (plus a model_sampling buffer,
as the real module has), and state_dict_for_saving() with the SD15 rules of supported_models.py."""
import torch

from . import utils


class _Weights:
    def __init__(self, sd):
        self._sd = dict(sd)

    def state_dict(self):
        return dict(self._sd)


class SD15:
    """Stands for comfy.supported_models.SD15 (the model_config ComfyUI attaches to the model)."""


class BaseModel:
    def __init__(self, unet_sd, v_prediction=False):
        self.model_config = SD15()
        self.diffusion_model = _Weights(unet_sd)
        self.v_prediction = v_prediction
        self.sigmas = torch.linspace(0.03, 14.6, 1000)

    def state_dict(self):
        sd = {"diffusion_model." + k: v for k, v in self.diffusion_model.state_dict().items()}
        sd["model_sampling.sigmas"] = self.sigmas
        return sd

    # SD15.process_clip_state_dict_for_saving / BASE.process_*_for_saving of ComfyUI 0.8.0
    def state_dict_for_saving(self, clip_state_dict=None, vae_state_dict=None, clip_vision_state_dict=None):
        extra = []
        if clip_state_dict is not None:
            clip_state_dict = dict(clip_state_dict)
            for p in ("clip_l.transformer.text_projection.weight", "clip_l.logit_scale"):
                clip_state_dict.pop(p, None)
            extra.append(utils.state_dict_prefix_replace(clip_state_dict, {"clip_l.": "cond_stage_model."}))
        if vae_state_dict is not None:
            extra.append(utils.state_dict_prefix_replace(dict(vae_state_dict), {"": "first_stage_model."}))
        unet = utils.state_dict_prefix_replace(self.diffusion_model.state_dict(), {"": "model.diffusion_model."})
        if self.v_prediction:
            unet["v_pred"] = torch.tensor([])
        for sd in extra:
            unet.update(sd)
        return unet


class BaseModelWithoutSaving(BaseModel):
    """A model class without state_dict_for_saving (exercises the glue's own SD1 prefix mapping)."""

    state_dict_for_saving = None

    def __getattribute__(self, name):
        if name == "state_dict_for_saving":
            raise AttributeError(name)
        return super().__getattribute__(name)


# ----------------------------------------------------------------------------- Flux / SD3 (issue #16)
class _LatentFormat:
    def __init__(self, channels):
        self.latent_channels = channels
        self.latent_dimensions = 2


class Flux:
    """Stands for comfy.supported_models.Flux: vae_key_prefix ["vae."], text_encoder_key_prefix ["text_encoders."]."""
    vae_prefix = "vae."


class FluxSchnell(Flux):
    pass


class SD3:
    """Stands for comfy.supported_models.SD3 (and SD35*): vae_key_prefix ["first_stage_model."] (BASE's default)."""
    vae_prefix = "first_stage_model."


class FlowModel(BaseModel):
    """comfy.model_base.Flux / SD3 as far as the glue sees them: the BFL / MMDiT keys as `diffusion_model`, a 16-channel
    latent_format, and BASE.process_*_for_saving of ComfyUI 0.8.0 (unet under `model.diffusion_model.`, the CLIP
    object's keys under `text_encoders.`, the VAE's under the config's vae prefix)."""

    def __init__(self, unet_sd, config):
        self.model_config = config
        self.diffusion_model = _Weights(unet_sd)
        self.v_prediction = False
        self.sigmas = torch.linspace(0.0, 1.0, 1000)
        self.latent_format = _LatentFormat(16)

    def state_dict_for_saving(self, clip_state_dict=None, vae_state_dict=None, clip_vision_state_dict=None):
        out = utils.state_dict_prefix_replace(self.diffusion_model.state_dict(), {"": "model.diffusion_model."})
        if clip_state_dict is not None:
            out.update(utils.state_dict_prefix_replace(dict(clip_state_dict), {"": "text_encoders."}))
        if vae_state_dict is not None:
            out.update(utils.state_dict_prefix_replace(dict(vae_state_dict), {"": self.model_config.vae_prefix}))
        return out

"""ControlNet (Zhang et al. 2023; diffusers `ControlNetModel`), NHWC: a trainable copy of the U-Net's first half that
reads a conditioning image and returns residuals for the U-Net's skips and mid block. SD 1.x/2.x and SDXL."""
from typing import ClassVar

import flax.linen as nn
import jax.numpy as jnp

from sdjax.models import model_config
from sdjax.models.conv import Conv
from sdjax.models.unet import UNet2DConditionModel

# Config keys of a ControlNet beyond the U-Net's first half, with the only value implemented here.
_ONLY = {"mid_block_type": "UNetMidBlock2DCrossAttn", "resnet_time_scale_shift": "default",
         "class_embed_type": None, "num_class_embeds": None, "encoder_hid_dim": None, "encoder_hid_dim_type": None}
_NO_EFFECT = {"addition_embed_type_num_heads", "_name_or_path"}
_BOOKKEEPING = {"architectures", "transformers_version", "torch_dtype"}


class ConditioningEmbedding(nn.Module):
    """The conditioning image [B, H, W, c] -> features [B, H/f, W/f, out] at the latents' size (f = 2^(n-1)):
    conv_in, then per level a 3x3 conv and a strided one, SiLU after each, and a zero-initialised conv_out."""
    out_channels: int
    block_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = nn.silu(Conv(self.block_out_channels[0], (3, 3), padding=1, name="conv_in", **kw)(x))
        for i, (c_in, c_out) in enumerate(zip(self.block_out_channels[:-1], self.block_out_channels[1:])):
            x = nn.silu(Conv(c_in, (3, 3), padding=1, name=f"blocks_{2 * i}", **kw)(x))
            x = nn.silu(Conv(c_out, (3, 3), strides=2, padding=1, name=f"blocks_{2 * i + 1}", **kw)(x))
        return Conv(self.out_channels, (3, 3), padding=1, name="conv_out", **kw)(x)


class ControlNetModel(UNet2DConditionModel):
    """(x_t, t, text, conditioning image) -> (down residuals [one per U-Net skip], mid residual), already scaled.

    The U-Net's fields (its first half's: the same names and params, so `from_unet` copies them) plus
    diffusers' ControlNet keys; the U-Net's second-half fields (up blocks, conv_out) are unused."""
    # the U-Net's fields of its second half and of the sample, which are not ControlNet config keys (config_of)
    UNET_ONLY: ClassVar[tuple] = ("sample_size", "out_channels", "center_input_sample", "up_block_types",
                                  "dual_cross_attention")
    conditioning_channels: int = 3
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    controlnet_conditioning_channel_order: str = "rgb"
    global_pool_conditions: bool = False

    @classmethod
    def from_config(cls, cfg, **overrides):
        """Build from a diffusers ControlNet `config.json` dict; overrides (e.g. dtype) win."""
        return model_config.build(cls, cfg, overrides, only=_ONLY, ignored=_NO_EFFECT | _BOOKKEEPING)

    def check_config(self):
        super().check_config()
        if self.controlnet_conditioning_channel_order not in ("rgb", "bgr"):
            raise model_config.unsupported("ControlNetModel", "controlnet_conditioning_channel_order",
                                           self.controlnet_conditioning_channel_order, "'rgb' or 'bgr'")

    @nn.compact
    def __call__(self, sample, timesteps, encoder_hidden_states, controlnet_cond, conditioning_scale=1.0,
                 text_embeds=None, time_ids=None, guess_mode=False):
        """sample [B, h, w, in], timesteps scalar or [B], text [B, L, D], controlnet_cond [B, H, W, c] in [0, 1]
        (H = h * f) -> (residuals [B, h_i, w_i, c_i] per U-Net skip, mid residual), times conditioning_scale
        (a scalar, traced or not). guess_mode (static): scales from 0.1 to 1 (log-spaced) over the skips and the
        mid block, as diffusers; global_pool_conditions: each residual averaged over space."""
        f = 2 ** (len(self.conditioning_embedding_out_channels) - 1)
        if (controlnet_cond.ndim != 4 or controlnet_cond.shape[-1] != self.conditioning_channels
                or controlnet_cond.shape[1:3] != (sample.shape[1] * f, sample.shape[2] * f)):
            raise ValueError(f"controlnet_cond must be [B, {sample.shape[1] * f}, {sample.shape[2] * f}, "
                             f"{self.conditioning_channels}] for a sample of {sample.shape}, got {controlnet_cond.shape}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        cond = controlnet_cond.astype(self.dtype)
        if self.controlnet_conditioning_channel_order == "bgr":
            cond = cond[..., ::-1]
        embed = ConditioningEmbedding(self.block_out_channels[0], self.conditioning_embedding_out_channels,
                                      name="controlnet_cond_embedding", **kw)
        _, mid, skips = self.encode(sample, timesteps, encoder_hidden_states, text_embeds, time_ids,
                                    hint=lambda x: x + embed(cond))
        down = [Conv(s.shape[-1], (1, 1), name=f"controlnet_down_blocks_{i}", **kw)(s) for i, s in enumerate(skips)]
        mid = Conv(mid.shape[-1], (1, 1), name="controlnet_mid_block", **kw)(mid)
        if guess_mode and not self.global_pool_conditions:
            scales = jnp.logspace(-1, 0, len(down) + 1) * conditioning_scale
        else:
            scales = jnp.full((len(down) + 1,), conditioning_scale, jnp.float32)
        scales = scales.astype(self.dtype)
        down, mid = [r * scales[i] for i, r in enumerate(down)], mid * scales[-1]
        if self.global_pool_conditions:
            down, mid = [r.mean(axis=(1, 2), keepdims=True) for r in down], mid.mean(axis=(1, 2), keepdims=True)
        return down, mid

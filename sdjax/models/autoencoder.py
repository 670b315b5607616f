"""KL autoencoder (the Stable Diffusion VAE), mirroring diffusers `AutoencoderKL`.

Parameter names follow the diffusers module tree (`encoder.down_blocks.0.resnets.0.conv1`,
`decoder.mid_block.attentions.0.to_q`, `quant_conv`, ...) so weights convert mechanically.
Images and latents are NHWC; images in [-1, 1]. The module's latents are unscaled; `to_latents` /
`from_latents` (and `scaled_latents`, for the latent cache's posteriors) are the one place where
`scaling_factor` / `shift_factor` or the per-channel `latents_mean` / `latents_std` (and `force_upcast`) are
applied, for the diffusion model's (scaled) latent space.
"""
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from sdjax.models.attention import multi_head_attention
from sdjax.models.conv import Conv
from sdjax.models import model_config
from sdjax.models.activations import ACTIVATIONS

EPS = 1e-6  # GroupNorm eps used throughout the diffusers Encoder/Decoder.


@struct.dataclass
class DiagonalGaussian:
    """Posterior N(mean, exp(logvar)) over latents; mean/logvar: [B, h, w, C]."""

    mean: jax.Array
    logvar: jax.Array

    @classmethod
    def from_moments(cls, moments):
        """moments: [B, h, w, 2C] (mean first, then logvar) -> posterior, logvar clipped to [-30, 20]."""
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return cls(mean, jnp.clip(logvar, -30.0, 20.0))

    @property
    def std(self):
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self):
        return jnp.exp(self.logvar)

    def sample(self, key):
        """One reparameterised draw: [B, h, w, C]."""
        return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)

    def mode(self):
        """The mean: [B, h, w, C]."""
        return self.mean

    def kl(self, other=None):
        """KL(self || other), other defaults to N(0, I); summed over non-batch dims: [B]."""
        axes = tuple(range(1, self.mean.ndim))
        if other is None:
            terms = jnp.square(self.mean) + self.var - 1.0 - self.logvar
        else:
            terms = (jnp.square(self.mean - other.mean) / other.var + self.var / other.var
                     - 1.0 - self.logvar + other.logvar)
        return 0.5 * jnp.sum(terms, axis=axes)

    def nll(self, x):
        """Negative log-likelihood of x: [B, h, w, C] under the posterior, summed per example: [B]."""
        axes = tuple(range(1, self.mean.ndim))
        terms = np.log(2.0 * np.pi) + self.logvar + jnp.square(x - self.mean) / self.var
        return 0.5 * jnp.sum(terms, axis=axes)


class ResnetBlock2D(nn.Module):
    """Pre-norm residual block without time embedding: [B, H, W, Cin] -> [B, H, W, out_channels]."""

    out_channels: int
    groups: int = 32
    act_fn: str = "silu"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        act = ACTIVATIONS[self.act_fn]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = act(nn.GroupNorm(self.groups, epsilon=EPS, name="norm1", **kw)(x))
        h = Conv(self.out_channels, (3, 3), padding=1, name="conv1", **kw)(h)
        h = act(nn.GroupNorm(self.groups, epsilon=EPS, name="norm2", **kw)(h))
        h = Conv(self.out_channels, (3, 3), padding=1, name="conv2", **kw)(h)
        if x.shape[-1] != self.out_channels:
            x = Conv(self.out_channels, (1, 1), name="conv_shortcut", **kw)(x)
        return x + h


class Downsample2D(nn.Module):
    """Pad bottom/right by one, then a stride-2 3x3 conv: [B, H, W, C] -> [B, H/2, W/2, C]."""

    channels: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return Conv(self.channels, (3, 3), strides=(2, 2), padding="VALID", name="conv",
                       dtype=self.dtype, param_dtype=self.param_dtype)(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv: [B, H, W, C] -> [B, 2H, 2W, C]."""

    channels: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return Conv(self.channels, (3, 3), padding=1, name="conv",
                       dtype=self.dtype, param_dtype=self.param_dtype)(x)


class SpatialSelfAttention(nn.Module):
    """Single-head self-attention over all pixels, with residual: [B, H, W, C] -> same."""

    groups: int = 32
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        y = nn.GroupNorm(self.groups, epsilon=EPS, name="group_norm", **kw)(x).reshape(b, h * w, c)
        q, k, v = (nn.Dense(c, name=n, **kw)(y) for n in ("to_q", "to_k", "to_v"))
        # The reference upcasts the softmax for this block (upcast_softmax=True).
        y = multi_head_attention(q, k, v, num_heads=1, upcast=True)
        y = nn.Dense(c, name="to_out_0", **kw)(y)
        return x + y.reshape(b, h, w, c)


class MidBlock2D(nn.Module):
    """resnet -> (attention) -> resnet at constant width: [B, H, W, C] -> same."""

    groups: int = 32
    act_fn: str = "silu"
    add_attention: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        c = x.shape[-1]
        x = ResnetBlock2D(c, self.groups, self.act_fn, name="resnets_0", **kw)(x)
        if self.add_attention:
            x = SpatialSelfAttention(self.groups, name="attentions_0", **kw)(x)
        return ResnetBlock2D(c, self.groups, self.act_fn, name="resnets_1", **kw)(x)


class ResnetStack2D(nn.Module):
    """DownEncoderBlock2D / UpDecoderBlock2D: resnets, then resample ('down', 'up' or None).

    [B, H, W, Cin] -> [B, H', W', out_channels], H' = H/2, 2H or H.
    """

    out_channels: int
    num_layers: int
    resample: Optional[str]
    groups: int = 32
    act_fn: str = "silu"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for j in range(self.num_layers):
            x = ResnetBlock2D(self.out_channels, self.groups, self.act_fn, name=f"resnets_{j}", **kw)(x)
        if self.resample == "down":
            x = Downsample2D(self.out_channels, name="downsamplers_0", **kw)(x)
        elif self.resample == "up":
            x = Upsample2D(self.out_channels, name="upsamplers_0", **kw)(x)
        return x


class Encoder(nn.Module):
    """images [B, H, W, Cin] -> moments [B, H/f, W/f, 2 * latent_channels]."""

    latent_channels: int
    block_out_channels: Sequence[int]
    layers_per_block: int
    norm_num_groups: int
    act_fn: str
    mid_block_add_attention: bool
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        groups, act, chans = self.norm_num_groups, self.act_fn, self.block_out_channels
        x = Conv(chans[0], (3, 3), padding=1, name="conv_in", **kw)(x)
        for i, ch in enumerate(chans):
            down = "down" if i < len(chans) - 1 else None
            x = ResnetStack2D(ch, self.layers_per_block, down, groups, act,
                              name=f"down_blocks_{i}", **kw)(x)
        x = MidBlock2D(groups, act, self.mid_block_add_attention, name="mid_block", **kw)(x)
        # The output activation is SiLU whatever act_fn says, as in the reference.
        x = nn.silu(nn.GroupNorm(groups, epsilon=EPS, name="conv_norm_out", **kw)(x))
        return Conv(2 * self.latent_channels, (3, 3), padding=1, name="conv_out", **kw)(x)


class Decoder(nn.Module):
    """latents [B, h, w, latent_channels] -> images [B, h*f, w*f, out_channels]."""

    out_channels: int
    block_out_channels: Sequence[int]
    layers_per_block: int
    norm_num_groups: int
    act_fn: str
    mid_block_add_attention: bool
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        groups, act, chans = self.norm_num_groups, self.act_fn, self.block_out_channels[::-1]
        x = Conv(chans[0], (3, 3), padding=1, name="conv_in", **kw)(z)
        x = MidBlock2D(groups, act, self.mid_block_add_attention, name="mid_block", **kw)(x)
        for i, ch in enumerate(chans):
            up = "up" if i < len(chans) - 1 else None
            x = ResnetStack2D(ch, self.layers_per_block + 1, up, groups, act,
                              name=f"up_blocks_{i}", **kw)(x)
        x = nn.silu(nn.GroupNorm(groups, epsilon=EPS, name="conv_norm_out", **kw)(x))
        return Conv(self.out_channels, (3, 3), padding=1, name="conv_out", **kw)(x)


class AutoencoderKL(nn.Module):
    """The KL-regularised VAE; attributes are diffusers' AutoencoderKL config keys.

    Downsampling factor f = 2 ** (len(block_out_channels) - 1).
    """

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: Sequence[str] = ("DownEncoderBlock2D",)
    up_block_types: Sequence[str] = ("UpDecoderBlock2D",)
    block_out_channels: Sequence[int] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: Any = 32
    scaling_factor: float = 0.18215
    shift_factor: Optional[float] = None
    latents_mean: Optional[Sequence[float]] = None
    latents_std: Optional[Sequence[float]] = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @classmethod
    def from_config(cls, cfg, **overrides):
        """Build from a diffusers config dict (model_config.build); overrides (e.g. dtype) win."""
        return model_config.build(cls, cfg, overrides)

    def check_config(self):
        """UnsupportedConfig for architecture options this implementation lacks."""
        n = len(self.block_out_channels)
        for key, types, want in (("down_block_types", self.down_block_types, "DownEncoderBlock2D"),
                                 ("up_block_types", self.up_block_types, "UpDecoderBlock2D")):
            if len(types) != n or any(t != want for t in types):
                raise model_config.unsupported("AutoencoderKL", key, list(types),
                                               f"{n} x {want!r} (one per block_out_channels entry)")
        for key in ("latents_mean", "latents_std"):
            stats = getattr(self, key)
            if stats is not None and len(stats) != self.latent_channels:
                raise model_config.unsupported("AutoencoderKL", key, list(stats),
                                               f"{self.latent_channels} numbers (one per latent channel)")
        model_config.check_activation("AutoencoderKL", "act_fn", self.act_fn.lower())

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        arch = dict(block_out_channels=tuple(self.block_out_channels),
                    layers_per_block=self.layers_per_block, norm_num_groups=self.norm_num_groups,
                    act_fn=self.act_fn.lower(), mid_block_add_attention=self.mid_block_add_attention)
        self.encoder = Encoder(self.latent_channels, **arch, **kw)
        self.decoder = Decoder(self.out_channels, **arch, **kw)
        c = self.latent_channels
        if self.use_quant_conv:
            self.quant_conv = Conv(2 * c, (1, 1), **kw)
        if self.use_post_quant_conv:
            self.post_quant_conv = Conv(c, (1, 1), **kw)

    def encode(self, images):
        """images: [B, H, W, in_channels] in [-1, 1] -> posterior over [B, H/f, W/f, latent_channels]."""
        moments = self.encoder(images.astype(self.dtype))
        if self.use_quant_conv:
            moments = self.quant_conv(moments)
        # Posterior statistics in float32: the latents feed the diffusion model and the KL loss.
        return DiagonalGaussian.from_moments(moments.astype(jnp.float32))

    def decode(self, latents):
        """latents: [B, h, w, latent_channels] (unscaled) -> images [B, h*f, w*f, out_channels]."""
        z = latents.astype(self.dtype)
        if self.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, images, key=None, sample_posterior=False):
        """Reconstruction of images: [B, H, W, C] -> [B, H, W, out_channels]."""
        posterior = self.encode(images)
        if sample_posterior:
            if key is None:
                raise ValueError("AutoencoderKL: sample_posterior=True needs a PRNG key")
            z = posterior.sample(key)
        else:
            z = posterior.mode()
        return self.decode(z)


def serving(vae):
    """The VAE as the diffusion model uses it: a float16 VAE with `force_upcast` computes in float32 (its
    activations overflow float16; diffusers' SDXL pipelines upcast it the same way). bfloat16 has float32's
    range and stays as it is; the stored params keep their dtype either way."""
    return vae.clone(dtype=jnp.float32) if vae.force_upcast and jnp.dtype(vae.dtype) == jnp.float16 else vae


def latent_affine(vae):
    """(offset, spread) of the diffusion model's latent space: latents = (z - offset) * scaling_factor / spread.
    Per channel [c] from `latents_mean` / `latents_std` where both are set (Playground-style SDXL VAEs: diffusers'
    SDXL pipelines use them only together), else shift_factor (or 0) and 1."""
    if vae.latents_mean is not None and vae.latents_std is not None:
        return jnp.asarray(vae.latents_mean, jnp.float32), jnp.asarray(vae.latents_std, jnp.float32)
    return vae.shift_factor or 0.0, 1.0


def to_latents(vae, params, images, noise=None):
    """images [B, H, W, 3] in [-1, 1] -> the diffusion model's latents [B, h, w, c] (float32):
    (z - offset) * scaling_factor / spread (`latent_affine`), z the posterior mean, or with unit `noise`
    [B, h, w, c] the posterior sample mean + std * noise."""
    post = serving(vae).apply({"params": params}, images, method="encode")
    return scaled_latents(vae, post.mean, post.std, noise)


def scaled_latents(vae, mean, std, noise=None):
    """The diffusion model's latents of a posterior (`mean`, `std`: the encoder's, as the latent cache keeps
    them): (z - offset) * scaling_factor / spread (`latent_affine`), z the mean or, with unit `noise`,
    mean + std * noise."""
    z = mean if noise is None else mean + std * noise.astype(mean.dtype)
    offset, spread = latent_affine(vae)
    return (z - offset) * vae.scaling_factor / spread


def from_latents(vae, params, latents):
    """The diffusion model's latents [B, h, w, c] -> images [B, H, W, 3] in about [-1, 1] (the dtype
    `serving(vae)` computes in): z = latents * spread / scaling_factor + offset (`latent_affine`)."""
    offset, spread = latent_affine(vae)
    z = latents * spread / vae.scaling_factor + offset
    return serving(vae).apply({"params": params}, z, method="decode")

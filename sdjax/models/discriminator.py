"""PatchGAN discriminator (the NLayerDiscriminator of pix2pix / taming-transformers), NHWC.

Layout as in the reference `main` Sequential: conv 4x4 stride 2 + LeakyReLU(0.2), then
n_layers - 1 blocks of conv 4x4 stride 2 + norm + LeakyReLU, one conv 4x4 stride 1 + norm +
LeakyReLU, and a final 4x4 stride-1 conv to one logit per patch. Flax names follow the torch
indices (`main_0`, `main_2`, `main_3`, ...). The reference uses BatchNorm (or ActNorm); here the
norm is GroupNorm: no batch statistics to carry or synchronise across devices, and the
discriminator stays a pure function of (params, images).
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# Initialisation of the reference (`weights_init`): convs N(0, 0.02), norm scales N(1, 0.02).
_CONV_INIT = nn.initializers.normal(0.02)


def _scale_init(key, shape, dtype=jnp.float32):
    return 1.0 + 0.02 * nn.initializers.normal(1.0)(key, shape, dtype)


class NLayerDiscriminator(nn.Module):
    """images [B, H, W, input_nc] -> patch logits [B, H/2**n_layers - 2, W/2**n_layers - 2, 1]."""

    input_nc: int = 3
    ndf: int = 64
    n_layers: int = 3
    norm_num_groups: int = 32
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @classmethod
    def from_config(cls, cfg):
        """Build from {input_nc, ndf, n_layers, norm_num_groups}; ValueError naming an unknown key."""
        known = {"input_nc", "ndf", "n_layers", "norm_num_groups"}
        for key in sorted(set(cfg) - known):
            raise ValueError(f"NLayerDiscriminator: unknown config key {key!r} = {cfg[key]!r}; known: {sorted(known)}")
        return cls(**dict(cfg))

    def _conv(self, features, stride, index):
        return nn.Conv(features, (4, 4), strides=(stride, stride), padding=((1, 1), (1, 1)),
                       kernel_init=_CONV_INIT, name=f"main_{index}", dtype=self.dtype, param_dtype=self.param_dtype)

    def _norm(self, index):
        return nn.GroupNorm(self.norm_num_groups, epsilon=1e-5, scale_init=_scale_init, name=f"main_{index}",
                            dtype=self.dtype, param_dtype=self.param_dtype)

    @nn.compact
    def __call__(self, images):
        x = nn.leaky_relu(self._conv(self.ndf, 2, 0)(images.astype(self.dtype)), 0.2)
        index = 2
        for n in range(1, self.n_layers + 1):
            stride = 2 if n < self.n_layers else 1  # the last block keeps the resolution
            x = self._conv(self.ndf * min(2 ** n, 8), stride, index)(x)
            x = nn.leaky_relu(self._norm(index + 1)(x), 0.2)
            index += 3
        return self._conv(1, 1, index)(x).astype(jnp.float32)

    def init_params(self, key, image_size=32):
        """Randomly initialised params for [1, image_size, image_size, input_nc] inputs."""
        return jax.jit(self.init)(key, jnp.zeros((1, image_size, image_size, self.input_nc)))["params"]

"""LPIPS perceptual distance (Zhang et al. 2018) with a VGG16 trunk, NHWC; weights from the user's files (sdjax.weights.lpips).

Param names mirror the `lpips` pip package's LPIPS module, so its state dicts convert mechanically:
`net.slice1.0.weight` <-> ('net', 'slice1_0', 'kernel'), `lin0.model.1.weight` <-> ('lin0', 'model_1',
'kernel'). Slice k ends at the tap relu{k}_2 / relu{k}_3; conv indices are those of torchvision's
`vgg16().features`, and a torchvision VGG16 state dict (`features.N.weight`) loads too.
"""
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

# torchvision vgg16().features indices of the 3x3 convs, grouped by LPIPS slice (a 2x2 max pool
# opens every slice after the first).
SLICES = ((0, 2), (5, 7), (10, 12, 14), (17, 19, 21), (24, 26, 28))
VGG16_CHANNELS = (64, 128, 256, 512, 512)
# The ScalingLayer: inputs in [-1, 1] -> ImageNet-normalised.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
EPS = 1e-10  # of lpips.normalize_tensor


class VGG16Features(nn.Module):
    """x [B, H, W, 3] (scaled) -> the five taps relu1_2 .. relu5_3, [B, H / 2**k, W / 2**k, channels[k]]."""

    channels: Sequence[int] = VGG16_CHANNELS
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        taps = []
        for k, (indices, ch) in enumerate(zip(SLICES, self.channels)):
            if k > 0:
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
            for i in indices:
                x = nn.relu(nn.Conv(ch, (3, 3), padding=1, name=f"slice{k + 1}_{i}",
                                    dtype=self.dtype, param_dtype=self.param_dtype)(x))
            taps.append(x)
        return taps


def unit_normalize(features):
    """Scale each pixel's feature vector to unit length: [..., C] -> [..., C]."""
    return features / (jnp.sqrt(jnp.sum(jnp.square(features), axis=-1, keepdims=True)) + EPS)


class NetLin(nn.Module):
    """The learned per-channel weights: [B, h, w, C] -> [B, h, w, 1], a 1x1 conv held as `model_1`
    (index 0 of the reference's Sequential is a dropout)."""

    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        return nn.Conv(1, (1, 1), use_bias=False, name="model_1", dtype=self.dtype, param_dtype=self.param_dtype)(x)


class LPIPS(nn.Module):
    """Perceptual distance of two image batches [B, H, W, 3] in [-1, 1] -> [B] (float32).

    channels: the trunk widths (VGG16's by default; tests use narrower random trunks).
    """

    channels: Sequence[int] = VGG16_CHANNELS
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x0, x1):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        shift, scale = jnp.asarray(SHIFT, jnp.float32), jnp.asarray(SCALE, jnp.float32)
        x = (jnp.concatenate([x0, x1]).astype(jnp.float32) - shift) / scale
        taps = VGG16Features(tuple(self.channels), name="net", **kw)(x.astype(self.dtype))
        total = 0.0
        for k, f in enumerate(taps):
            f0, f1 = jnp.split(unit_normalize(f.astype(jnp.float32)), 2)
            d = NetLin(name=f"lin{k}", **kw)(jnp.square(f0 - f1))
            total = total + jnp.mean(d.astype(jnp.float32), axis=(1, 2, 3))
        return total

    def init_params(self, key, image_size=32):
        """Random params (the lin weights made non-negative, as trained LPIPS weights are)."""
        x = jnp.zeros((1, image_size, image_size, 3))
        params = self.init(key, x, x)["params"]
        return {k: jax.tree.map(jnp.abs, v) if k.startswith("lin") else v for k, v in params.items()}

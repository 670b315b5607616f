"""LPIPS perceptual distance (Zhang et al. 2018) with a VGG16 trunk, NHWC; weights from the user's files.

Param names mirror the `lpips` pip package's LPIPS module, so its state dicts convert mechanically:
`net.slice1.0.weight` <-> ('net', 'slice1_0', 'kernel'), `lin0.model.1.weight` <-> ('lin0', 'model_1',
'kernel'). Slice k ends at the tap relu{k}_2 / relu{k}_3; conv indices are those of torchvision's
`vgg16().features`, and a torchvision VGG16 state dict (`features.N.weight`) loads too.
"""
import re
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sdjax.weights.convert import to_params
from sdjax.weights.errors import WeightLoadError
from sdjax.weights.files import read_tensors

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




_TORCHVISION = re.compile(r"^features\.(\d+)\.(weight|bias)$")
_LIN = re.compile(r"^lin(\d)\.model\.\d\.weight$")
_IGNORED = re.compile(r"^(scaling_layer\.|classifier\.)")


def lpips_names(tensors):
    """Rename a merged state dict to the lpips-package names: torchvision `features.N.*` ->
    `net.sliceK.N.*`, `linK.model.0.weight` (no dropout) -> `linK.model.1.weight`; drop the
    scaling-layer buffers and torchvision's classifier."""
    slice_of = {i: k + 1 for k, indices in enumerate(SLICES) for i in indices}
    out = {}
    for name, value in tensors.items():
        m = _TORCHVISION.match(name)
        if m and int(m.group(1)) in slice_of:
            name = f"net.slice{slice_of[int(m.group(1))]}.{m.group(1)}.{m.group(2)}"
        elif _LIN.match(name):
            name = f"lin{_LIN.match(name).group(1)}.model.1.weight"
        elif _IGNORED.match(name):
            continue
        out[name] = value
    return out


def load_lpips(paths, channels=VGG16_CHANNELS, dtype=jnp.float32):
    """(LPIPS module, params) from weight files (.safetensors / .pth / .bin), merged in order.

    E.g. the lpips package's `weights/v0.1/vgg.pth` (lin layers only) plus torchvision's
    `vgg16-397923af.pth` (the trunk), or one full LPIPS state dict. Raises WeightLoadError listing
    missing / unexpected tensors, or naming negative lin weights.
    """
    paths = [paths] if isinstance(paths, str) else list(paths)
    if not paths:
        raise WeightLoadError("LPIPS: no weight files given (expected the lin layers and the VGG16 trunk)")
    tensors = {}
    for path in paths:
        tensors.update(read_tensors(path))
    module = LPIPS(tuple(channels), dtype=dtype)
    shapes = jax.eval_shape(lambda: module.init_params(jax.random.key(0), 32))
    params = to_params("lpips", lpips_names(tensors), shapes)
    for k in range(len(channels)):
        low = float(np.min(params[f"lin{k}"]["model_1"]["kernel"]))
        if low < 0:
            raise WeightLoadError(f"LPIPS: lin{k}.model.1.weight has negative entries (min {low:.3g}); "
                                  "trained LPIPS lin weights are non-negative: wrong file?")
    return module, params

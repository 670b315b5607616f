"""LoRA: low-rank updates merged into the params, outside every compiled function (which take the params as
arguments: merging, rescaling or removing a LoRA compiles nothing, and costs no time per step).

A layer's update is PyTorch's `W + scale * alpha / r * B @ A` in Flax layout: `kernel + scale * factor * down @ up`,
contracting the rank; down is A laid out as a kernel (a convolution's [kh, kw, in, r], LoCon's 3x3 ones
included), up is B's [r, out].
"""
from typing import NamedTuple

import numpy as np


class LowRank(NamedTuple):
    """One adapted layer. down: [in, r] or [kh, kw, in, r]; up: [r, out]; factor: alpha / r (rsLoRA's:
    alpha / sqrt(r))."""
    down: np.ndarray
    up: np.ndarray
    factor: float


def delta(layer, shape):
    """The update (scale 1) of a kernel of `shape` ([in, out] or [kh, kw, in, out]), float32; a linear layer's
    update may adapt a 1x1 convolution and the reverse, as diffusers allows."""
    rank = layer.up.shape[0]
    product = layer.down.reshape(-1, rank).astype(np.float32) @ layer.up.astype(np.float32)
    return np.float32(layer.factor) * product.reshape(shape)


def merged(kernel, updates):
    """kernel (host, any float dtype) + the sum of scale * delta over `updates` [(LowRank, scale)], computed in
    float32 and returned in the kernel's dtype."""
    out = np.asarray(kernel, np.float32)
    for layer, scale in updates:
        out = out + np.float32(scale) * delta(layer, kernel.shape)
    return out.astype(kernel.dtype)

"""LoRA: low-rank updates merged into the params, outside the sampling loop and every piece of the pipeline (which take
the params as arguments: merging, rescaling or removing a LoRA recompiles none of them, and costs no time per step).

A layer's update is PyTorch's `W + scale * alpha / r * B @ A` in Flax layout: `kernel + scale * factor * down @ up`,
contracting the rank; down is A laid out as a kernel (a convolution's [kh, kw, in, r], LoCon's 3x3 ones
included), up is B's [r, out].
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class LowRank(NamedTuple):
    """One adapted layer. down: [in, r] or [kh, kw, in, r]; up: [r, out]; factor: alpha / r (rsLoRA's:
    alpha / sqrt(r))."""
    down: np.ndarray
    up: np.ndarray
    factor: float


def delta(layer, shape, scale=1.0):
    """The update of a kernel of `shape` ([in, out] or [kh, kw, in, out]) at `scale`, float32; a linear layer's update
    may adapt a 1x1 convolution and the reverse, as diffusers allows."""
    rank = layer.up.shape[0]
    down = layer.down.reshape(-1, rank).astype(jnp.float32) * (scale * layer.factor)  # scaled: the small factor
    return jnp.matmul(down, layer.up.astype(jnp.float32), precision="highest").reshape(shape)


@jax.jit
def merged(kernel, updates):
    """kernel (any float dtype) + the sum of delta(layer, scale) over `updates` [(LowRank, scale)], computed in
    float32 and returned in the kernel's dtype."""
    out = kernel.astype(jnp.float32)
    for layer, scale in updates:
        out = out + delta(layer, kernel.shape, scale)
    return out.astype(kernel.dtype)

"""LPIPS weights from the user's files: the lpips package's lin layers plus a VGG16 trunk (torchvision or
the lpips package's names), merged, renamed and checked."""
import re

import jax
import jax.numpy as jnp
import numpy as np

from sdjax.errors import WeightLoadError
from sdjax.models.lpips import LPIPS, SLICES, VGG16_CHANNELS
from sdjax.weights.convert import to_params
from sdjax.weights.files import read_tensors

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

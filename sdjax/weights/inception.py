"""FID Inception weights: pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (a state dict of its InceptionV3)
-> params of sdjax.models.inception, each BatchNorm folded into the convolution before it. Found where the user
puts it; nothing is downloaded."""
import os
import re

import jax
import numpy as np

from sdjax.errors import WeightLoadError
from sdjax.models.inception import FIDInceptionV3
from sdjax.weights.convert import to_params
from sdjax.weights.files import read_tensors

FILENAME = "pt_inception-2015-12-05-6726825d.pth"
URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{FILENAME}"
ENV = "SDJAX_FID_INCEPTION"
BN_EPS = 1e-3  # of pytorch-fid's (torchvision's) BasicConv2d
_UNUSED = re.compile(r"^fc\.|\.num_batches_tracked$")  # the classifier, and BatchNorm's counter


def torch_cache():
    """Where pytorch-fid's download is cached: torch.hub's `$TORCH_HOME/hub/checkpoints/` (default TORCH_HOME:
    $XDG_CACHE_HOME/torch, ~/.cache/torch)."""
    home = os.getenv("TORCH_HOME", os.path.join(os.getenv("XDG_CACHE_HOME", "~/.cache"), "torch"))
    return os.path.join(os.path.expanduser(home), "hub", "checkpoints")


def find_weights(path=None):
    """The weight file: `path` if given, else $SDJAX_FID_INCEPTION, else pytorch-fid's cached download."""
    for given, what in ((path, "--inception"), (os.getenv(ENV), f"${ENV}")):
        if given:
            if not os.path.isfile(given):
                raise WeightLoadError(f"FID Inception weights not found: {given} (from {what})")
            return given
    cached = os.path.join(torch_cache(), FILENAME)
    if not os.path.isfile(cached):
        raise WeightLoadError(f"FID Inception weights {FILENAME} not found: pass --inception FILE, set ${ENV}, or "
                              f"put the file in {torch_cache()}/ (pytorch-fid's download, {URL})")
    return cached


def fold_batchnorm(tensors):
    """`X.conv.weight` + `X.bn.{weight, bias, running_mean, running_var}` -> `X.conv.{weight, bias}` (PyTorch
    names and layouts); the classifier and the other tensors left out."""
    out = {k: v for k, v in tensors.items() if not _UNUSED.search(k) and ".bn." not in k}
    for name in [k for k in out if k.endswith(".conv.weight")]:
        prefix = name[:-len("conv.weight")]
        try:
            gamma, beta, mean, var = (np.asarray(tensors[f"{prefix}bn.{k}"], np.float64)
                                      for k in ("weight", "bias", "running_mean", "running_var"))
        except KeyError as e:
            raise WeightLoadError(f"FID Inception: no BatchNorm tensor {e.args[0]} for {name}") from None
        scale = gamma / np.sqrt(var + BN_EPS)
        out[name] = (out[name] * scale[:, None, None, None]).astype(np.float32)
        out[f"{prefix}conv.bias"] = (beta - mean * scale).astype(np.float32)
    return out


def load_inception_params(path):
    """Params of FIDInceptionV3 (all four blocks) from pytorch-fid's weight file (.pth, or a .safetensors of the
    same names). Raises WeightLoadError naming missing / unexpected tensors."""
    module = FIDInceptionV3()
    shapes = jax.eval_shape(module.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 75, 75, 3), np.float32))
    return to_params("FID Inception", fold_batchnorm(read_tensors(path)), shapes["params"])

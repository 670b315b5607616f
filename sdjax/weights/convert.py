"""Mechanical conversion between PyTorch (diffusers/transformers) state dicts and Flax params.

The Flax modules mirror the PyTorch module tree, so names map one to one:
`down_blocks.0.resnets.1.conv1.weight` <-> ('down_blocks_0', 'resnets_1', 'conv1', 'kernel').
A numeric segment is joined to the segment before it with '_'; the last segment
`weight` becomes `kernel` (Dense/Conv), `scale` (norms) or `embedding` (Embed), as the
Flax tree expects. Layouts: Linear [out, in] <-> kernel [in, out]; Conv2d [out, in, kh, kw]
<-> kernel [kh, kw, in, out].
"""
import re

import numpy as np
from flax import traverse_util

from sdjax.errors import WeightLoadError
from sdjax.weights.files import release

# Module lists in the reference models: their numeric children become `name_i` in Flax.
_INDEXED = re.compile(r"^(.*)_(\d+)$")
LIST_NAMES = frozenset({
    "down_blocks", "up_blocks", "resnets", "attentions", "downsamplers", "upsamplers",
    "transformer_blocks", "to_out", "net", "layers", "controlnet_down_blocks", "blocks",  # ControlNet
    "main", "model", "slice1", "slice2", "slice3", "slice4", "slice5",  # discriminator, LPIPS
})
# Buffers that some checkpoints carry and that are not parameters.
IGNORED = re.compile(r"(^|\.)position_ids$")


def _listing(names, limit=20):
    names = sorted(names)
    shown = "\n  ".join(names[:limit])
    more = f"\n  ... and {len(names) - limit} more" if len(names) > limit else ""
    return f"\n  {shown}{more}"


def check_names(component, missing, unexpected):
    """Raise one error listing every missing and unexpected tensor name, if any."""
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing tensor(s):{_listing(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected tensor(s):{_listing(unexpected)}")
    if parts:
        raise WeightLoadError(f"{component}: checkpoint does not match the model architecture.\n" + "\n".join(parts))


def flax_path(torch_name):
    """'a.b.0.c.weight' -> ('a', 'b_0', 'c', 'weight') (the leaf is renamed later)."""
    out = []
    for seg in torch_name.split("."):
        if seg.isdigit() and out:
            out[-1] = f"{out[-1]}_{seg}"
        else:
            out.append(seg)
    return tuple(out)


def torch_name(path):
    """('a', 'b_0', 'c', 'kernel') -> 'a.b.0.c.weight'."""
    segs = []
    for seg in path[:-1]:
        m = _INDEXED.match(seg)
        segs.extend([m.group(1), m.group(2)] if m and m.group(1) in LIST_NAMES else [seg])
    segs.append("bias" if path[-1] == "bias" else "weight")
    return ".".join(segs)


def kernel_layout(weight):
    """A PyTorch Linear [out, in] / Conv2d [out, in, kh, kw] weight in Flax's kernel layout: [in, out] /
    [kh, kw, in, out]."""
    return weight.transpose(2, 3, 1, 0) if weight.ndim == 4 else weight.T


def torch_layout(kernel):
    """A Flax kernel [in, out] / [kh, kw, in, out] in PyTorch's Linear [out, in] / Conv2d [out, in, kh, kw] layout
    (the inverse of kernel_layout)."""
    return kernel.transpose(3, 2, 0, 1) if kernel.ndim == 4 else kernel.T


def _to_flax(name, array, leaf, shape):
    """Re-layout one PyTorch tensor for the Flax leaf of `shape`."""
    if leaf == "kernel" and array.ndim in (2, 4):
        array = kernel_layout(array)
    if tuple(array.shape) != tuple(shape):
        raise WeightLoadError(
            f"shape mismatch for {name}: the model expects {tuple(shape)} (Flax layout), "
            f"the checkpoint has {tuple(array.shape)} (after re-layout)")
    return array


def _aligned(array, dtype, alignment=64):
    """A C-ordered copy of `array` in `dtype` whose data starts on an `alignment`-byte boundary: XLA's CPU
    client takes such arrays as device buffers without a copy (jax.device_put aliases them), others it copies,
    and the copies of the host arrays (not freed before a full garbage collection) would double the model."""
    size = array.size * np.dtype(dtype).itemsize
    raw = np.empty(size + alignment, np.uint8)
    start = -raw.ctypes.data % alignment
    out = raw[start:start + size].view(dtype).reshape(array.shape)
    out[...] = array
    return out


def to_params(component, state_dict, shapes, dtype=np.float32):
    """PyTorch-named numpy tensors -> Flax params tree.

    state_dict: {name: np.ndarray} (views of a mapped file are released as they are converted); dtype: the
    params' (numpy, or ml_dtypes' bfloat16); shapes: Flax params tree of arrays or ShapeDtypeStructs
    (e.g. from `jax.eval_shape(model.init, ...)`). Raises WeightLoadError listing every
    missing/unexpected name, or naming the first shape mismatch.
    """
    expected = traverse_util.flatten_dict(shapes)
    by_torch = {torch_name(p): p for p in expected}
    names = {n for n in state_dict if not IGNORED.search(n)}
    check_names(component, set(by_torch) - names, names - set(by_torch))
    flat = {}
    for name, path in by_torch.items():
        source = state_dict[name]
        array = _to_flax(f"{component}: {name}", np.asarray(source), path[-1], expected[path].shape)
        flat[path] = _aligned(array, dtype)  # a copy in the params' dtype: the file's view is read once;
        release(source)  # tensor by tensor, the model is in memory once
    return traverse_util.unflatten_dict(flat)


def to_state_dict(params):
    """Flax params tree -> {PyTorch name: np.ndarray} in PyTorch layouts."""
    out = {}
    for path, value in traverse_util.flatten_dict(params).items():
        name, array = torch_name(path), np.asarray(value)
        if path[-1] == "kernel" and array.ndim in (2, 4):
            array = torch_layout(array)
        out[name] = np.ascontiguousarray(array)
    return out

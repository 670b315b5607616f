"""The Inception-v3 of FID (pytorch-fid's `InceptionV3`: the TensorFlow 2015-12-05 graph ported to PyTorch), NHWC.

Module and param names mirror pytorch-fid's (torchvision's `Inception3` with the FID blocks swapped in), so its
state dict converts mechanically: `Mixed_5b.branch1x1.conv.weight` <-> ('Mixed_5b', 'branch1x1', 'conv', 'kernel').
Each BasicConv2d's BatchNorm (inference only) is folded into its convolution, which so has a bias
(sdjax.weights.inception folds it). The FID blocks differ from torchvision's in their pooling branch: average
pools that leave the padding out of the mean (TensorFlow's), and a max pool in the last block.
"""
import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from jax import lax

from sdjax.models.conv import Conv

SIZE = 299  # the input is resized to SIZE x SIZE
# pytorch-fid's BLOCK_INDEX_BY_DIM: the width of each block's output (first max pool, second max pool, the input
# of the auxiliary classifier, the final average pool) is the `--dims` that selects it
BLOCK_DIMS = (64, 192, 768, 2048)


def _resize(x, axis, size_out=SIZE):
    """PyTorch's bilinear interpolation (`F.interpolate`, align_corners=False, no antialiasing) along one axis of
    x: each output pixel mixes the two input pixels around its centre."""
    size_in = x.shape[axis]
    src = np.maximum((np.arange(size_out) + 0.5) * (size_in / size_out) - 0.5, 0)
    low = src.astype(np.int64)
    frac = (src - low).astype(np.float32).reshape([-1] + [1] * (x.ndim - 1 - axis))
    return (jnp.take(x, low, axis) * (1 - frac)
            + jnp.take(x, np.minimum(low + 1, size_in - 1), axis) * frac)


class BasicConv2d(nn.Module):
    """Convolution (BatchNorm folded in) + ReLU; padding (ph, pw) on both sides, as PyTorch's."""
    features: int
    kernel_size: tuple[int, int]
    strides: int = 1
    padding: tuple[int, int] = (0, 0)

    @nn.compact
    def __call__(self, x):
        (ph, pw), s = self.padding, self.strides
        return nn.relu(Conv(self.features, self.kernel_size, (s, s), ((ph, ph), (pw, pw)), name="conv")(x))


def _pool3(x, reduce, stride=1, pad=None):
    """A 3x3 window reduced (jnp.maximum / jnp.add) along H, then W: shifted slices that XLA fuses, faster on CPU
    than its reduce_window. pad: the value of a 1-pixel border (None: no padding)."""
    for axis in (1, 2):
        if pad is not None:
            x = jnp.pad(x, [(1, 1) if a == axis else (0, 0) for a in range(4)], constant_values=pad)
        end = x.shape[axis] - 2
        taps = [lax.slice_in_dim(x, i, i + end, stride, axis) for i in range(3)]
        x = reduce(reduce(taps[0], taps[1]), taps[2])
    return x


def _avg_pool(x):
    """3x3 stride-1 average over the unpadded neighbours (TensorFlow's; pytorch-fid's count_include_pad=False)."""
    _, h, w, _ = x.shape
    count = [np.full(n, 3.0, np.float32) for n in (h, w)]
    for c in count:
        c[[0, -1]] = 2
    return _pool3(x, jnp.add, pad=0) / np.outer(*count)[:, :, None]


def _max_pool(x, stride=2):
    """3x3 max pool: stride 2 without padding, or stride 1 padded (with -inf, as PyTorch's)."""
    return _pool3(x, jnp.maximum, stride, None if stride == 2 else -jnp.inf)


class InceptionA(nn.Module):
    """FIDInceptionA (Mixed_5b-d): [B, H, W, C] -> [B, H, W, 224 + pool_features]."""
    pool_features: int

    @nn.compact
    def __call__(self, x):
        b5 = BasicConv2d(64, (5, 5), padding=(2, 2), name="branch5x5_2")(BasicConv2d(48, (1, 1), name="branch5x5_1")(x))
        b3 = BasicConv2d(64, (1, 1), name="branch3x3dbl_1")(x)
        b3 = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
        pool = BasicConv2d(self.pool_features, (1, 1), name="branch_pool")(_avg_pool(x))
        return jnp.concatenate([BasicConv2d(64, (1, 1), name="branch1x1")(x), b5, b3, pool], -1)


class InceptionB(nn.Module):
    """Mixed_6a (torchvision's InceptionB): [B, H, W, C] -> [B, (H - 3) // 2 + 1, ..., 480 + C]."""

    @nn.compact
    def __call__(self, x):
        b3 = BasicConv2d(384, (3, 3), 2, name="branch3x3")(x)
        dbl = BasicConv2d(64, (1, 1), name="branch3x3dbl_1")(x)
        dbl = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(dbl)
        dbl = BasicConv2d(96, (3, 3), 2, name="branch3x3dbl_3")(dbl)
        return jnp.concatenate([b3, dbl, _max_pool(x)], -1)


class InceptionC(nn.Module):
    """FIDInceptionC (Mixed_6b-e): factorised 7x7 convolutions, [B, H, W, 768] -> [B, H, W, 768]."""
    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c7, row, col = self.channels_7x7, dict(padding=(0, 3)), dict(padding=(3, 0))
        b7 = BasicConv2d(c7, (1, 1), name="branch7x7_1")(x)
        b7 = BasicConv2d(c7, (1, 7), name="branch7x7_2", **row)(b7)
        b7 = BasicConv2d(192, (7, 1), name="branch7x7_3", **col)(b7)
        dbl = BasicConv2d(c7, (1, 1), name="branch7x7dbl_1")(x)
        for i, (width, shape, pad) in enumerate(((c7, (7, 1), col), (c7, (1, 7), row), (c7, (7, 1), col),
                                                 (192, (1, 7), row)), start=2):
            dbl = BasicConv2d(width, shape, name=f"branch7x7dbl_{i}", **pad)(dbl)
        pool = BasicConv2d(192, (1, 1), name="branch_pool")(_avg_pool(x))
        return jnp.concatenate([BasicConv2d(192, (1, 1), name="branch1x1")(x), b7, dbl, pool], -1)


class InceptionD(nn.Module):
    """Mixed_7a (torchvision's InceptionD): [B, H, W, 768] -> [B, (H - 3) // 2 + 1, ..., 1280]."""

    @nn.compact
    def __call__(self, x):
        b3 = BasicConv2d(320, (3, 3), 2, name="branch3x3_2")(BasicConv2d(192, (1, 1), name="branch3x3_1")(x))
        b7 = BasicConv2d(192, (1, 1), name="branch7x7x3_1")(x)
        b7 = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = BasicConv2d(192, (3, 3), 2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool(x)], -1)


class InceptionE(nn.Module):
    """FIDInceptionE_1 (Mixed_7b, average pool) / FIDInceptionE_2 (Mixed_7c, max pool): [B, H, W, C] ->
    [B, H, W, 2048]."""
    max_pool: bool = False

    @nn.compact
    def __call__(self, x):
        def split(y, name):  # the 1x3 and 3x1 convolutions side by side
            return [BasicConv2d(384, (1, 3), padding=(0, 1), name=f"{name}a")(y),
                    BasicConv2d(384, (3, 1), padding=(1, 0), name=f"{name}b")(y)]

        b3 = split(BasicConv2d(384, (1, 1), name="branch3x3_1")(x), "branch3x3_2")
        dbl = BasicConv2d(448, (1, 1), name="branch3x3dbl_1")(x)
        dbl = split(BasicConv2d(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(dbl), "branch3x3dbl_3")
        pool = BasicConv2d(192, (1, 1), name="branch_pool")(_max_pool(x, 1) if self.max_pool else _avg_pool(x))
        return jnp.concatenate([BasicConv2d(320, (1, 1), name="branch1x1")(x), *b3, *dbl, pool], -1)


class FIDInceptionV3(nn.Module):
    """Images [B, H, W, 3] float in [0, 1] -> the spatially averaged outputs of blocks 0 .. the one of `dims`:
    [[B, 64], [B, 192], [B, 768], [B, 2048]][:BLOCK_DIMS.index(dims) + 1] (float32), as pytorch-fid's
    InceptionV3(output_blocks) and its get_activations' average pool compute them."""
    dims: int = 2048

    @nn.compact
    def __call__(self, images):
        if self.dims not in BLOCK_DIMS:
            raise ValueError(f"FID Inception: dims must be one of {BLOCK_DIMS}, got {self.dims}")
        x = _resize(_resize(images.astype(jnp.float32), 1), 2)
        x = 2 * x - 1  # [0, 1] -> [-1, 1]
        last, out = BLOCK_DIMS.index(self.dims), []
        for block in range(last + 1):
            if block == 0:
                x = BasicConv2d(32, (3, 3), 2, name="Conv2d_1a_3x3")(x)
                x = BasicConv2d(32, (3, 3), name="Conv2d_2a_3x3")(x)
                x = _max_pool(BasicConv2d(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x))
            elif block == 1:
                x = BasicConv2d(80, (1, 1), name="Conv2d_3b_1x1")(x)
                x = _max_pool(BasicConv2d(192, (3, 3), name="Conv2d_4a_3x3")(x))
            elif block == 2:
                for name, pool_features in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):
                    x = InceptionA(pool_features, name=name)(x)
                x = InceptionB(name="Mixed_6a")(x)
                for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
                    x = InceptionC(c7, name=name)(x)
            else:
                x = InceptionD(name="Mixed_7a")(x)
                x = InceptionE(name="Mixed_7c", max_pool=True)(InceptionE(name="Mixed_7b")(x))
            out.append(jnp.mean(x, axis=(1, 2)))
        return out

"""Convolution for the models: flax's nn.Conv, with small-image/large-kernel convolutions on CPU done as
one matmul over shifted copies of the input (im2col), and 1x1 convolutions as matmuls.

XLA's CPU convolution reaches about a third of the matmul rate when the kernel is much larger than the
image (the 8x8 and 4x4 levels of the SD U-Net: 1280x1280x3x3 kernels); there im2col is 2-3x faster.
"""
import functools

import flax.linen as nn
import jax
from jax import lax

IM2COL_RATIO = 30  # im2col when kernel elements per output element (kh*kw*cout / (n*h*w)) reach this


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None, **kw):
    """lax.conv_general_dilated, or im2col for a plain 2-D NHWC convolution where that is faster on CPU."""
    args = dict(lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                feature_group_count=feature_group_count, precision=precision, **kw)
    plain = (lhs.ndim == 4 and feature_group_count == 1 and not kw
             and all(d in (None, 1) or d == (1, 1) for d in (lhs_dilation, rhs_dilation))
             and tuple(dimension_numbers.lhs_spec) == (0, 3, 1, 2)
             and tuple(dimension_numbers.rhs_spec) == (3, 2, 0, 1))
    if not plain or jax.default_backend() != "cpu":
        return lax.conv_general_dilated(lhs, rhs, window_strides, padding, **args)
    kh, kwd, _, cout = rhs.shape
    n, h, w, _ = lhs.shape
    if isinstance(padding, str):
        padding = lax.padtype_to_pads((h, w), (kh, kwd), window_strides, padding)
    (pt, pb), (pl, pr) = padding
    sh, sw = window_strides
    oh, ow = (h + pt + pb - kh) // sh + 1, (w + pl + pr - kwd) // sw + 1
    if kh * kwd * cout < IM2COL_RATIO * n * oh * ow and (kh, kwd) != (1, 1):
        return lax.conv_general_dilated(lhs, rhs, window_strides, padding, **args)
    return im2col_conv(lhs, rhs, window_strides, padding, precision)  # a 1x1 convolution is a matmul


def im2col_conv(x, kernel, strides, padding, precision=None):
    """NHWC x, HWIO kernel, explicit ((top, bottom), (left, right)) padding -> NHWC output."""
    kh, kw, cin, cout = kernel.shape
    sh, sw = strides
    if any(p for pair in padding for p in pair):
        x = jax.numpy.pad(x, ((0, 0), *padding, (0, 0)))
    oh, ow = (x.shape[1] - kh) // sh + 1, (x.shape[2] - kw) // sw + 1
    windows = [x[:, i:i + (oh - 1) * sh + 1:sh, j:j + (ow - 1) * sw + 1:sw] for i in range(kh) for j in range(kw)]
    cols = windows[0] if len(windows) == 1 else jax.numpy.concatenate(windows, -1)
    return lax.dot_general(cols, kernel.reshape(kh * kw * cin, cout), (((3,), (0,)), ((), ())),
                           precision=precision)


Conv = functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated)

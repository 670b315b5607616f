"""Convolution for the models: flax's nn.Conv, with three faster ways on CPU for what the models use (chosen
when lowering for CPU; other platforms get XLA's convolution).

- 3x3 float32 convolutions from 16x16 on: Winograd F(4x4, 3x3) (Lavin & Gray 2016), 4x fewer
  multiplications: the input and output tiles go through fixed 6x6 / 4x6 transforms and the channels
  through 36 independent matmuls. Kernel transform included, 1.4-1.6x faster than im2col at 16x16
  (SD U-Net at 512^2, 640-2560 channels) and 1.2-2.5x faster than XLA's convolution at 32x32 and
  64x64. The kernel transform (36/9 the kernel's size) is tied to the convolution's input, so that XLA
  does not run all of them up front and hold them at once; inside `loop_constant_kernels()` (the
  sampler's scan) it is left free, and XLA computes it once, before the loop.
- Small-image/large-kernel convolutions: one matmul over shifted copies of the input (im2col). XLA's CPU
  convolution reaches about a third of the matmul rate when the kernel is much larger than the image
  (the 8x8 and 4x4 levels of the SD U-Net: 1280x1280x3x3 kernels); there im2col is 2-3x faster.
- 1x1 convolutions are matmuls.
- Unpadded 3x3 stride-1 convolutions are the interior of padded ones (the FID Inception's): XLA's CPU
  convolution runs them 2-3x faster padded (Winograd, when it applies, as fast).
"""
import contextlib
import contextvars
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# im2col when kernel elements per output pixel of one image (kh*kw*cout / (h*w)) reach this; per image, so an
# image's bits do not depend on the batch it is in
IM2COL_RATIO = 40  # the former 20 per pixel at batch 2 (guidance), where it was tuned
# Winograd when a 3x3 float32 convolution has h*w >= this per image; not counting the batch keeps an image's
# bits independent of the batch it is in (sharded or not)
WINOGRAD_MIN_PIXELS = 256
WINOGRAD_MIN_CHANNELS = 32  # ... and at least this many input and output channels
_LOOP_CONSTANT_KERNELS = contextvars.ContextVar("loop_constant_kernels", default=False)


@contextlib.contextmanager
def loop_constant_kernels():
    """Convolutions traced inside are in a loop whose kernels do not change from one iteration to the next:
    their Winograd kernel transforms may be hoisted out of the loop (XLA does), at the cost of holding them.

    A trace-time setting (like flax's `nn.logical_axis_rules`): enter it inside the jitted function, around
    the loop, so that every trace of that function sees it."""
    token = _LOOP_CONSTANT_KERNELS.set(True)
    try:
        yield
    finally:
        _LOOP_CONSTANT_KERNELS.reset(token)


# F(4x4, 3x3) from the interpolation points 0, 1, -1, 2, -2, inf: y = A^T [(G g G^T) * (B^T d B)] A
_BT = np.array([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
                [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]], np.float64)
_G = np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
               [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], np.float64)
_AT = np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]], np.float64)
# the 2-D transforms of flattened tiles, row-major: kron(M, M) @ vec(X) = vec(M X M^T)
_IN, _KERNEL, _OUT = (np.kron(m, m).astype(np.float32) for m in (_BT, _G, _AT))


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None, **kw):
    """lax.conv_general_dilated, or im2col for a plain 2-D NHWC convolution where that is faster on CPU."""
    args = dict(lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                feature_group_count=feature_group_count, precision=precision, **kw)
    plain = (lhs.ndim == 4 and feature_group_count == 1 and not kw
             and all(d in (None, 1) or d == (1, 1) for d in (lhs_dilation, rhs_dilation))
             and tuple(dimension_numbers.lhs_spec) == (0, 3, 1, 2)
             and tuple(dimension_numbers.rhs_spec) == (3, 2, 0, 1))
    if not plain:
        return lax.conv_general_dilated(lhs, rhs, window_strides, padding, **args)
    # chosen for the platform the code is lowered for: XLA's own convolution everywhere but on CPU
    return lax.platform_dependent(
        lhs, rhs, cpu=lambda lhs, rhs: _cpu_conv(lhs, rhs, window_strides, padding, precision, args),
        default=lambda lhs, rhs: lax.conv_general_dilated(lhs, rhs, window_strides, padding, **args))


def _cpu_conv(lhs, rhs, window_strides, padding, precision, args):
    """Winograd, im2col or XLA's convolution, whichever is fastest on CPU for this shape."""
    kh, kwd, _, cout = rhs.shape
    _, h, w, _ = lhs.shape
    if isinstance(padding, str):
        padding = lax.padtype_to_pads((h, w), (kh, kwd), window_strides, padding)
    (pt, pb), (pl, pr) = padding
    sh, sw = window_strides
    if (kh, kwd, sh, sw, pt, pb, pl, pr) == (3, 3, 1, 1, 0, 0, 0, 0):  # the interior of the padded convolution:
        return _cpu_conv(lhs, rhs, window_strides, ((1, 1), (1, 1)), precision, args)[:, 1:-1, 1:-1]  # 2-3x faster
    oh, ow = (h + pt + pb - kh) // sh + 1, (w + pl + pr - kwd) // sw + 1
    if ((kh, kwd, sh, sw, pt, pb, pl, pr) == (3, 3, 1, 1, 1, 1, 1, 1) and lhs.dtype == rhs.dtype == jnp.float32
            and oh * ow >= WINOGRAD_MIN_PIXELS and min(rhs.shape[2:]) >= WINOGRAD_MIN_CHANNELS):
        return winograd_conv(lhs, rhs, precision)
    if kh * kwd * cout < IM2COL_RATIO * oh * ow and (kh, kwd) != (1, 1):
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


def _once_ready(const, x):
    """`const` unchanged, as a value that XLA can compute only once x is (0 times a finite element of x)."""
    x0 = lax.stop_gradient(x.reshape(-1)[0])
    return const + jnp.where(jnp.isfinite(x0), x0, 0).astype(const.dtype) * 0


def winograd_conv(x, kernel, precision=None):
    """3x3 'SAME' convolution, stride 1, by Winograd F(4x4, 3x3): x [N, H, W, Cin], kernel [3, 3, Cin, Cout]."""
    n, h, w, cin = x.shape
    cout = kernel.shape[-1]
    # outside a loop, tie the kernel's transform to x, so that XLA runs it just before it is needed rather
    # than all of them up front (+3.7 GiB at 512^2); inside one, leave it free to be hoisted out of the loop
    g = _KERNEL if _LOOP_CONSTANT_KERNELS.get() else _once_ready(_KERNEL, x)
    th, tw = -(-h // 4), -(-w // 4)  # 4x4 output tiles, each read from a 6x6 input tile
    x = jnp.pad(x, ((0, 0), (1, 4 * th - h + 1), (1, 4 * tw - w + 1), (0, 0)))
    tiles = jnp.stack([x[:, i:i + 4 * th:4, j:j + 4 * tw:4] for i in range(6) for j in range(6)])
    v = jnp.dot(_IN, tiles.reshape(36, -1)).reshape(36, n * th * tw, cin)
    u = jnp.dot(g, kernel.reshape(9, cin * cout)).reshape(36, cin, cout)
    m = lax.dot_general(v, u, (((2,), (1,)), ((0,), (0,))), precision=precision)  # [36, tiles, Cout]
    y = jnp.dot(_OUT, m.reshape(36, -1)).reshape(4, 4, n, th, tw, cout)
    return y.transpose(2, 3, 0, 4, 1, 5).reshape(n, 4 * th, 4 * tw, cout)[:, :h, :w]


Conv = functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated)

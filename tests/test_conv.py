"""The im2col convolution against lax.conv_general_dilated, and when Conv chooses it."""
import contextlib

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax import lax

from sdjax.models import conv


def lax_conv(x, w, strides=(1, 1), padding=((1, 1), (1, 1))):
    return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.parametrize("kernel,stride,padding", [(3, 1, ((1, 1), (1, 1))), (3, 2, ((0, 1), (0, 1))),
                                                   (1, 1, ((0, 0), (0, 0))), (4, 2, ((1, 1), (1, 1)))])
def test_im2col_matches_lax(kernel, stride, padding):
    kx, kw = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (2, 9, 8, 5))
    w = jax.random.normal(kw, (kernel, kernel, 5, 7))
    want = lax_conv(x, w, (stride, stride), padding)
    got = conv.im2col_conv(x, w, (stride, stride), padding)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("features", [4, 512])  # below / above the im2col ratio on a 4x4 image
def test_conv_module_same_params_and_output(monkeypatch, features):
    x = jax.random.normal(jax.random.key(1), (1, 4, 4, 8))
    ref, fast = nn.Conv(features, (3, 3), padding=1), conv.Conv(features, (3, 3), padding=1)
    params = ref.init(jax.random.key(2), x)
    assert jax.tree.map(np.shape, fast.init(jax.random.key(2), x)) == jax.tree.map(np.shape, params)
    calls, im2col = [], conv.im2col_conv
    monkeypatch.setattr(conv, "im2col_conv", lambda *a: calls.append(1) or im2col(*a))
    np.testing.assert_allclose(fast.apply(params, x), ref.apply(params, x), atol=1e-5)
    assert bool(calls) == (9 * features >= conv.IM2COL_RATIO * 16)


def test_1x1_conv_is_a_matmul(monkeypatch):
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 6))
    ref, fast = nn.Conv(5, (1, 1)), conv.Conv(5, (1, 1))
    params = ref.init(jax.random.key(2), x)
    calls, im2col = [], conv.im2col_conv
    monkeypatch.setattr(conv, "im2col_conv", lambda *a: calls.append(1) or im2col(*a))
    np.testing.assert_allclose(fast.apply(params, x), ref.apply(params, x), atol=1e-5)
    assert calls


@pytest.mark.parametrize("h,w", [(8, 8), (9, 7), (3, 5)])  # whole tiles, partial tiles, smaller than a tile
def test_winograd_matches_lax(h, w):
    kx, kw, kg = jax.random.split(jax.random.key(3), 3)
    x = jax.random.normal(kx, (2, h, w, 6))
    k = jax.random.normal(kw, (3, 3, 6, 5))
    np.testing.assert_allclose(conv.winograd_conv(x, k), lax_conv(x, k), atol=1e-4, rtol=1e-5)
    g = jax.random.normal(kg, (2, h, w, 5))  # the backward pass too (training goes through it)
    want = jax.grad(lambda x, k: (lax_conv(x, k) * g).sum(), (0, 1))(x, k)
    got = jax.grad(lambda x, k: (conv.winograd_conv(x, k) * g).sum(), (0, 1))(x, k)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("size,channels,dtype,loop,expect", [
    (32, 32, "float32", False, True), (16, 32, "float32", False, False), (32, 8, "float32", False, False),
    (32, 32, "bfloat16", False, False), (16, 32, "float32", True, True), (8, 32, "float32", True, False)])
def test_conv_module_uses_winograd_on_large_float32_images(monkeypatch, size, channels, dtype, loop, expect):
    """Winograd from 32x32 per image, or from 16x16 inside `loop_constant_kernels` (a sampler's scan)."""
    x = jax.random.normal(jax.random.key(1), (1, size, size, channels), dtype)
    ref, fast = nn.Conv(channels, (3, 3), padding=1, dtype=dtype), conv.Conv(channels, (3, 3), padding=1, dtype=dtype)
    params = ref.init(jax.random.key(2), x)
    calls, winograd = [], conv.winograd_conv
    monkeypatch.setattr(conv, "winograd_conv", lambda *a: calls.append(1) or winograd(*a))
    tol = 1e-4 if dtype == "float32" else 5e-2
    with conv.loop_constant_kernels() if loop else contextlib.nullcontext():
        got = fast.apply(params, x)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(ref.apply(params, x), np.float32),
                               atol=tol, rtol=tol)
    assert bool(calls) == expect
    assert conv.winograd_min_pixels() == conv.WINOGRAD_MIN_PIXELS  # the setting ends with its block


def test_xla_hoists_the_kernel_transform_out_of_a_loop():
    """What `loop_constant_kernels` counts on: the kernel's Winograd transform runs once, not per iteration."""
    x = jax.random.normal(jax.random.key(1), (1, 16, 16, 32))
    k = jax.random.normal(jax.random.key(2), (3, 3, 32, 48))

    def f(x, k):
        return lax.scan(lambda h, _: (conv.winograd_conv(h, k)[..., :32], None), x, None, length=3)[0]
    hlo = jax.jit(f).lower(x, k).compile().as_text()
    loop = next(line for line in hlo.splitlines() if " while(" in line)
    assert "f32[36,1536]" in loop.split(" while(")[0]  # the transformed kernel (32 * 48) goes into the loop ready

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


def test_unpadded_3x3_is_the_padded_interior():
    x = jax.random.normal(jax.random.key(1), (2, 7, 6, 8))
    ref, fast = nn.Conv(5, (3, 3), padding="VALID"), conv.Conv(5, (3, 3), padding="VALID")
    params = ref.init(jax.random.key(2), x)
    np.testing.assert_allclose(fast.apply(params, x), ref.apply(params, x), atol=1e-5)


@pytest.mark.parametrize("h,w", [pytest.param(8, 8, marks=pytest.mark.slow), (9, 7),  # whole / partial tiles,
                                 pytest.param(3, 5, marks=pytest.mark.slow)])              # smaller than a tile
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


@pytest.mark.parametrize("size,channels,dtype,expect", [
    (32, 32, "float32", True), (16, 32, "float32", True), (8, 32, "float32", False), (16, 8, "float32", False),
    (16, 32, "bfloat16", False)])
def test_conv_module_uses_winograd_on_float32_images_from_16x16(monkeypatch, size, channels, dtype, expect):
    x = jax.random.normal(jax.random.key(1), (1, size, size, channels), dtype)
    ref, fast = nn.Conv(channels, (3, 3), padding=1, dtype=dtype), conv.Conv(channels, (3, 3), padding=1, dtype=dtype)
    params = ref.init(jax.random.key(2), x)
    calls, winograd = [], conv.winograd_conv
    monkeypatch.setattr(conv, "winograd_conv", lambda *a: calls.append(1) or winograd(*a))
    tol = 1e-4 if dtype == "float32" else 5e-2
    np.testing.assert_allclose(np.asarray(fast.apply(params, x), np.float32),
                               np.asarray(ref.apply(params, x), np.float32), atol=tol, rtol=tol)
    assert bool(calls) == expect


@pytest.mark.parametrize("loop", [True, False])
def test_kernel_transform_leaves_a_loop_only_inside_loop_constant_kernels(loop):
    """Inside `loop_constant_kernels` XLA computes the kernel's Winograd transform once, before the loop;
    outside, the transform is tied to the convolution's input and stays in the loop body."""
    x = jax.random.normal(jax.random.key(1), (1, 16, 16, 32))
    k = jax.random.normal(jax.random.key(2), (3, 3, 32, 48))

    def f(x, k):
        with conv.loop_constant_kernels() if loop else contextlib.nullcontext():
            return lax.scan(lambda h, _: (conv.winograd_conv(h, k)[..., :32], None), x, None, length=3)[0]
    hlo = jax.jit(f).lower(x, k).compile().as_text()
    carry = next(line for line in hlo.splitlines() if " while(" in line).split(" while(")[0]
    assert ("f32[36,1536]" in carry) == loop  # the transformed kernel (32 * 48) goes into the loop ready
    np.testing.assert_allclose(jax.jit(f)(x, k), f(x, k), atol=1e-5)
    ref = lax.scan(lambda h, _: (lax_conv(h, k)[..., :32], None), x, None, length=3)[0]
    np.testing.assert_allclose(jax.jit(f)(x, k), ref, atol=1e-5 * float(np.abs(ref).max()))  # values ~1e3


def test_kernel_transforms_are_not_all_held_at_once():
    """Outside a loop, a chain of Winograd convolutions holds about one transformed kernel at a time, not all
    of them (XLA would otherwise compute every transform first: they depend only on the weights)."""
    n, c = 12, 64
    x = jax.random.normal(jax.random.key(1), (1, 16, 16, c))
    ks = jax.random.normal(jax.random.key(2), (n, 3, 3, c, c)) * 0.05

    def f(x, ks):
        for i in range(n):
            x = conv.winograd_conv(x, ks[i])
        return x
    transformed = 36 * c * c * 4  # bytes of one transformed kernel
    temp = jax.jit(f).lower(x, ks).compile().memory_analysis().temp_size_in_bytes
    assert temp < n / 2 * transformed, (temp, transformed)  # ~3.3 (~12.5 with the transforms up front)
    np.testing.assert_allclose(f(x, ks), jax.jit(_lax_chain)(x, ks), atol=1e-3)


def _lax_chain(x, ks):
    for k in ks:
        x = lax_conv(x, k)
    return x

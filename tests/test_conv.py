"""The im2col convolution against lax.conv_general_dilated, and when Conv chooses it."""
import flax.linen as nn
import jax
import numpy as np
import pytest
from jax import lax

from sdjax.models import conv


@pytest.mark.parametrize("kernel,stride,padding", [(3, 1, ((1, 1), (1, 1))), (3, 2, ((0, 1), (0, 1))),
                                                   (1, 1, ((0, 0), (0, 0))), (4, 2, ((1, 1), (1, 1)))])
def test_im2col_matches_lax(kernel, stride, padding):
    kx, kw = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (2, 9, 8, 5))
    w = jax.random.normal(kw, (kernel, kernel, 5, 7))
    want = lax.conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
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

"""Autoencoder-stage losses against closed forms and hand computations on small arrays."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdjax.models.autoencoder import DiagonalGaussian
from sdjax.train.vae import vae_losses


def test_reconstruction_loss_closed_form():
    x = np.zeros((2, 1, 2, 1), np.float32)
    y = np.array([[[[1.0], [-2.0]]], [[[0.5], [0.0]]]], np.float32)
    # Per image sums: L1 3 and 0.5, L2 5 and 0.25.
    assert float(vae_losses.reconstruction_loss(x, y)) == pytest.approx((3 + 0.5) / 2)
    assert float(vae_losses.reconstruction_loss(x, y, 0.0, 1.0)) == pytest.approx((5 + 0.25) / 2)
    assert float(vae_losses.reconstruction_loss(x, y, 2.0, 3.0)) == pytest.approx((2 * 3.5 + 3 * 5.25) / 2)
    # LPIPS [B] is added at each of the H*W*C = 2 pixels of its image.
    lp = np.array([0.1, 0.4], np.float32)
    got = vae_losses.reconstruction_loss(x, y, 1.0, 0.0, lp, 0.5)
    assert float(got) == pytest.approx((3 + 0.5 + 0.5 * 2 * (0.1 + 0.4)) / 2)


def test_kl_loss_closed_form():
    mean = np.array([[[[1.0, 0.0]]], [[[0.0, 2.0]]]], np.float32)      # [2, 1, 1, 2]
    logvar = np.array([[[[0.0, np.log(2.0)]]], [[[0.0, 0.0]]]], np.float32)
    # 0.5 * sum(m^2 + var - 1 - logvar) per example: 0.5 (1 + 1 - log 2) and 0.5 * 4.
    want = (0.5 * (1 + 1 - np.log(2.0)) + 0.5 * 4) / 2
    assert float(vae_losses.kl_loss(DiagonalGaussian(mean, logvar))) == pytest.approx(want, rel=1e-6)


def test_gan_losses_closed_form():
    real = np.array([2.0, 0.5, -1.0, 0.0], np.float32).reshape(1, 2, 2, 1)
    fake = np.array([-2.0, 0.5, 1.0, -0.5], np.float32).reshape(1, 2, 2, 1)
    # relu(1 - real) = 0, 0.5, 2, 1 (mean 0.875); relu(1 + fake) = 0, 1.5, 2, 0.5 (mean 1.0).
    assert float(vae_losses.hinge_d_loss(real, fake)) == pytest.approx(0.5 * (0.875 + 1.0))
    assert float(vae_losses.generator_loss(fake)) == pytest.approx(0.25)


def test_adaptive_weight_by_hand():
    """Toy 'last layer' W [2, 2]: rec(W) = |W x - y|^2, g(W) = -v . W x; gradients by hand."""
    x, y, v = np.array([1.0, 2.0]), np.array([0.5, -1.0]), np.array([3.0, 4.0])
    w = np.array([[0.2, -0.1], [0.3, 0.4]])
    rec = lambda W: jnp.sum(jnp.square(W @ x - y))  # noqa: E731
    g = lambda W: -jnp.dot(v, W @ x)  # noqa: E731
    rec_grad_hand = 2 * np.outer(w @ x - y, x)
    g_grad_hand = -np.outer(v, x)
    np.testing.assert_allclose(jax.grad(rec)(w), rec_grad_hand, rtol=1e-6)
    want = np.linalg.norm(rec_grad_hand) / (np.linalg.norm(g_grad_hand) + 1e-4) * 0.5
    got = vae_losses.adaptive_weight(jax.grad(rec)(w), jax.grad(g)(w), 0.5)
    assert float(got) == pytest.approx(want, rel=1e-6)
    # A vanishing GAN gradient gives the clip value 1e4 (times disc_weight).
    assert float(vae_losses.adaptive_weight(jnp.ones((2, 2)), jnp.zeros((2, 2)), 0.5)) == pytest.approx(5e3)
    # No gradient flows through the weight.
    assert float(jax.grad(lambda a: vae_losses.adaptive_weight(a * jnp.ones(2), jnp.ones(2), 1.0))(2.0)) == 0.0


def test_disc_factor():
    f = jax.jit(lambda s: vae_losses.disc_factor(s, 10, 0.7))
    assert float(f(jnp.int32(0))) == 0.0 and float(f(jnp.int32(9))) == 0.0
    assert float(f(jnp.int32(10))) == pytest.approx(0.7) and float(f(jnp.int32(500))) == pytest.approx(0.7)

"""The training loss against closed forms on toy models (tests/train_fakes.py)."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch

from sdjax.train.ldm import ldm_losses as losses
from sdjax.train.ldm.ldm_step import example_draws, make_loss_fn
from train_fakes import ABAR, EMPTY, toy_setup


def loss_config(prediction_type="epsilon", gamma=0.0, offset=0.0, dropout=0.0, latent="mean"):
    return ml_collections.ConfigDict(dict(loss=dict(
        prediction_type=prediction_type, min_snr_gamma=gamma, offset_noise=offset,
        caption_dropout=dropout, latent=latent)))


@pytest.fixture(scope="module")
def toy():
    return toy_setup()


def reference_loss(modules, params, micro, cfg, zero_dropped=False):
    """The loss recomputed in float64 from the same draws, noising and targets by diffusers (DDPMScheduler's
    add_noise and get_velocity, training_utils.compute_snr), min-SNR weights as its train_text_to_image; dropped
    captions' text the empty caption's or (zero_dropped) zeros."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr
    c = cfg.loss
    d = jax.vmap(lambda k: example_draws(k, (8, 8, 4), 1000, c))(micro["key"])
    t, eps = np.asarray(d["t"]), np.asarray(d["eps"], np.float64)
    post = modules["vae"].apply({"params": params["vae"]}, micro["images"], method="encode")
    z = np.asarray(post.mean, np.float64) * 0.5
    ids = np.where(np.asarray(d["drop"])[:, None], EMPTY["input_ids"][None], micro["input_ids"])
    ctx = modules["text_encoder"].apply({"params": params["text_encoder"]}, ids)["last_hidden_state"]
    if zero_dropped:
        ctx = np.where(np.asarray(d["drop"])[:, None, None], 0.0, ctx)
    ddpm = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    np.testing.assert_allclose(ddpm.alphas_cumprod.numpy(), ABAR, rtol=1e-6)  # the fakes' table is SD's
    tz, te, tt = torch.from_numpy(z), torch.from_numpy(eps), torch.from_numpy(t)
    x_t = ddpm.add_noise(tz, te, tt).numpy()
    pred = np.asarray(modules["unet"].apply({"params": params["unet"]}, jnp.asarray(x_t, jnp.float32), d["t"], ctx),
                      np.float64)
    tgt = eps if c.prediction_type == "epsilon" else ddpm.get_velocity(tz, te, tt).numpy()
    snr = compute_snr(ddpm, tt).double().numpy()
    if c.min_snr_gamma > 0:
        w = np.minimum(snr, c.min_snr_gamma) / (snr if c.prediction_type == "epsilon" else snr + 1)
    else:
        w = np.ones_like(snr)
    return np.mean(w * np.mean((pred - tgt) ** 2, axis=(1, 2, 3))), x_t, pred, tgt, w


@pytest.mark.parametrize("prediction_type,gamma", [("epsilon", 0.0), ("epsilon", 5.0), ("v_prediction", 5.0)])
def test_loss_and_gradient_match_closed_form(toy, prediction_type, gamma):
    modules, params, micro = toy
    cfg = loss_config(prediction_type, gamma)
    loss_fn = make_loss_fn(modules, cfg, jnp.asarray(ABAR), EMPTY)
    trainable, frozen = {"unet": params["unet"]}, {k: params[k] for k in ("vae", "text_encoder")}
    loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, micro)
    want, x_t, pred, tgt, w = reference_loss(modules, params, micro, cfg)
    assert abs(float(loss) - want) <= 1e-5 * want
    # The U-Net output is a * x_t + ...: dL/da = mean_b(w_b * mean(2 (pred - tgt) x_t)).
    grad_a = np.mean(w * np.mean(2 * (pred - tgt) * x_t, axis=(1, 2, 3)))
    assert abs(float(grads["unet"]["a"]) - grad_a) <= 1e-4 * abs(grad_a)


def test_caption_dropout_and_posterior_sample(toy):
    """Dropped captions on the empty caption's text or on zeros (zero_dropped: SDXL's force_zeros_for_empty_prompt;
    tests/test_pipeline_xl.py checks the conditioning of each); a posterior draw."""
    modules, params, micro = toy
    frozen = {k: params[k] for k in ("vae", "text_encoder")}
    losses_of = {}
    for dropout, latent, zeros in ((1.0, "mean", False), (1.0, "mean", True), (0.5, "mean", True),
                                   (0.5, "sample", False)):
        cfg = loss_config(dropout=dropout, latent=latent)
        loss_fn = make_loss_fn(modules, cfg, jnp.asarray(ABAR), EMPTY, zero_dropped=zeros)
        got = float(loss_fn({"unet": params["unet"]}, frozen, micro))
        want = reference_loss(modules, params, micro, cfg, zeros)[0]
        losses_of[dropout, zeros] = got
        if latent == "mean":  # every (or about half the) caption(s) replaced by the empty one or zeros
            assert abs(got - want) <= 1e-5 * got, (dropout, zeros, got, want)
        else:  # a posterior draw moves the latents, so the loss differs from the mean's
            assert abs(got - want) > 1e-6
    assert abs(losses_of[1.0, True] - losses_of[1.0, False]) > 100 * 1e-5 * losses_of[1.0, False]


def test_min_snr_weights_closed_form():
    snr = jnp.asarray([0.01, 1.0, 5.0, 20.0, 1000.0])
    np.testing.assert_allclose(losses.min_snr_weight(snr, 5.0, "epsilon"), [1, 1, 1, 0.25, 0.005], rtol=1e-6)
    np.testing.assert_allclose(losses.min_snr_weight(snr, 5.0, "v_prediction"),
                               np.minimum(snr, 5) / (np.asarray(snr) + 1), rtol=1e-6)
    np.testing.assert_array_equal(losses.min_snr_weight(snr, 0.0, "epsilon"), np.ones(5))


def test_draws_statistics():
    """t uniform on {0..T-1}, eps ~ N(0, 1 + s^2) with offset noise s, caption drop rate p (4096 examples)."""
    cfg = loss_config(offset=0.3, dropout=0.25).loss
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(0), i))(jnp.arange(4096))
    d = jax.vmap(lambda k: example_draws(k, (4, 4, 2), 1000, cfg))(keys)
    t = np.asarray(d["t"])
    assert t.min() >= 0 and t.max() <= 999 and abs(t.mean() - 499.5) < 15
    assert abs(float(jnp.var(d["eps"])) - (1 + 0.3 ** 2)) < 0.03
    # The offset is constant over the image: per-example channel means vary by ~0.3, not ~1/4.
    assert abs(float(jnp.std(d["eps"].mean(axis=(1, 2)))) - np.sqrt(0.09 + 1 / 16)) < 0.03
    assert abs(float(jnp.mean(d["drop"])) - 0.25) < 0.03




def test_prior_preservation_loss(toy):
    """DreamBooth's loss (rows marked "class_example"): the instance rows' loss + prior_loss_weight x the class rows',
    each the closed form above on its half of the same draws (diffusers' train_dreambooth.py splits its batch so);
    the effect: it differs from the mean over all rows by far more than the tolerance."""
    modules, params, micro = toy
    cfg = loss_config("epsilon", 5.0)
    cfg.dreambooth = dict(prior_loss_weight=0.3)
    trainable, frozen = {"unet": params["unet"]}, {k: params[k] for k in ("vae", "text_encoder")}
    is_class = jnp.asarray([0, 1, 0, 0, 1, 1, 0, 1], jnp.float32)  # rows 1, 4, 5, 7: class examples
    loss = make_loss_fn(modules, cfg, jnp.asarray(ABAR), EMPTY)(trainable, frozen, {**micro, "class_example": is_class})
    half = lambda rows: reference_loss(modules, params, jax.tree.map(lambda x: x[rows], micro), cfg)[0]  # noqa: E731
    want = half(np.array([0, 2, 3, 6])) + 0.3 * half(np.array([1, 4, 5, 7]))
    assert abs(float(loss) - want) <= 1e-5 * want
    assert abs(reference_loss(modules, params, micro, cfg)[0] - want) > 100 * 1e-5 * want

"""The denoising loss as plain functions: forward noising, targets, min-SNR weights, caption dropout."""
import jax
import jax.numpy as jnp

PREDICTION_TYPES = ("epsilon", "v_prediction")


def _per_example(a, x):
    """[B] -> [B, 1, ..., 1] broadcastable against x: [B, ...]."""
    return a.reshape(a.shape + (1,) * (x.ndim - 1))


def add_noise(x0, eps, abar):
    """x_t = sqrt(abar) x0 + sqrt(1 - abar) eps; x0, eps: [B, ...], abar: [B]."""
    return _per_example(jnp.sqrt(abar), x0) * x0 + _per_example(jnp.sqrt(1 - abar), x0) * eps


def target(x0, eps, abar, prediction_type):
    """What the U-Net learns to output: eps, or v = sqrt(abar) eps - sqrt(1 - abar) x0; [B, ...]."""
    if prediction_type == "epsilon":
        return eps
    alpha, sigma = _per_example(jnp.sqrt(abar), x0), _per_example(jnp.sqrt(1 - abar), x0)
    return alpha * eps - sigma * x0


def min_snr_weight(snr, gamma, prediction_type):
    """Min-SNR-gamma loss weights (Hang et al. 2023): [B] -> [B]; gamma <= 0 gives ones.

    For eps-prediction the x0-space weight min(snr, gamma) becomes min(snr, gamma) / snr;
    for v-prediction (whose MSE is (snr + 1) times the x0 MSE) it is min(snr, gamma) / (snr + 1).
    """
    if gamma <= 0:
        return jnp.ones_like(snr)
    clipped = jnp.minimum(snr, gamma)
    return clipped / snr if prediction_type == "epsilon" else clipped / (snr + 1)


def offset_noise(key, shape, strength):
    """Per-example, per-channel constant noise (Guttenberg 2023): shape [C... ] -> strength * N(0, 1) of [1, 1, C]."""
    return strength * jax.random.normal(key, (1,) * (len(shape) - 1) + shape[-1:])


def drop_captions(drop, input_ids, empty_ids):
    """Replace captions by the empty prompt where drop: [B] bool; input_ids [B, L], empty_ids [L]."""
    return jnp.where(drop[:, None], empty_ids[None, :], input_ids)


def weighted_mse(prediction, tgt, weights):
    """Mean over examples of weights [B] * per-example MSE of [B, ...] arrays (float32): scalar."""
    err = jnp.square(prediction.astype(jnp.float32) - tgt.astype(jnp.float32))
    return jnp.mean(weights * jnp.mean(err.reshape(err.shape[0], -1), axis=1))

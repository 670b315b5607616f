"""The denoising loss as plain functions: min-SNR weights, offset noise, caption dropout, the weighted MSE
(forward noising and targets are schedules.add_noise / schedules.target)."""
import jax
import jax.numpy as jnp


def per_example(a, x):
    """[B] -> [B, 1, ..., 1] broadcastable against x: [B, ...]."""
    return a.reshape(a.shape + (1,) * (x.ndim - 1))


def min_snr_weight(snr, gamma, prediction_type):
    """Min-SNR-gamma loss weights (Hang et al. 2023): [B] -> [B]; gamma <= 0 gives ones.

    The x0-space weight min(snr, gamma) ("sample") becomes min(snr, gamma) / snr for eps-prediction (whose
    MSE is snr times the x0 MSE) and min(snr, gamma) / (snr + 1) for v-prediction ((snr + 1) times).
    """
    if gamma <= 0:
        return jnp.ones_like(snr)
    clipped = jnp.minimum(snr, gamma)
    return {"epsilon": clipped / snr, "v_prediction": clipped / (snr + 1)}.get(prediction_type, clipped)


def offset_noise(key, shape, strength):
    """Per-example, per-channel constant noise (Guttenberg 2023): shape [C... ] -> strength * N(0, 1) of [1, 1, C]."""
    return strength * jax.random.normal(key, (1,) * (len(shape) - 1) + shape[-1:])


def drop_captions(drop, input_ids, empty_ids):
    """Replace captions by the empty prompt where drop: [B] bool; input_ids [B, L], empty_ids [L]."""
    return jnp.where(drop[:, None], empty_ids[None, :], input_ids)


def example_mse(prediction, tgt):
    """Per-example MSE of [B, ...] arrays (float32): [B]."""
    err = jnp.square(prediction.astype(jnp.float32) - tgt.astype(jnp.float32))
    return jnp.mean(err.reshape(err.shape[0], -1), axis=1)


def weighted_mse(prediction, tgt, weights):
    """Mean over examples of weights [B] * per-example MSE of [B, ...] arrays (float32): scalar."""
    return jnp.mean(weights * example_mse(prediction, tgt))


def prior_preservation_mse(prediction, tgt, weights, is_class, prior_weight):
    """DreamBooth's loss: the weighted MSE of the instance rows + prior_weight x that of the class rows (is_class [B]:
    1 for a class row), each a mean over its own rows."""
    err = weights * example_mse(prediction, tgt)
    mean = lambda m: jnp.sum(m * err) / jnp.maximum(jnp.sum(m), 1)  # noqa: E731
    return mean(1 - is_class) + prior_weight * mean(is_class)

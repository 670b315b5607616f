"""Prediction-type math (schedules.add_noise / target / to_x0 / to_eps / snr) against diffusers."""
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from sdjax.diffusion import schedules

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
ZERO_SNR = dict(SD, rescale_betas_zero_snr=True)


def _setup(config):
    from diffusers import DDPMScheduler
    ddpm = DDPMScheduler(**config, clip_sample=False)
    abar = ddpm.alphas_cumprod.numpy()  # the tables are compared in test_samplers; here, the formulas
    rng = np.random.default_rng(0)
    x0, eps = (rng.standard_normal((6, 4, 4, 3)).astype(np.float32) for _ in range(2))
    t = np.array([0, 1, 250, 500, 998, 999])
    alpha, sigma = (np.sqrt(a)[t][:, None, None, None] for a in (abar, 1 - abar))
    return ddpm, abar, x0, eps, t, alpha, sigma


@pytest.mark.parametrize("config", [SD, ZERO_SNR], ids=["sd", "zero_snr"])
def test_noising_velocity_and_snr_match_diffusers(config):
    from diffusers.training_utils import compute_snr
    ddpm, abar, x0, eps, t, alpha, sigma = _setup(config)
    tx0, teps, tt = torch.from_numpy(x0), torch.from_numpy(eps), torch.from_numpy(t)
    np.testing.assert_allclose(schedules.add_noise(x0, eps, alpha, sigma), ddpm.add_noise(tx0, teps, tt).numpy(),
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(schedules.target(x0, eps, alpha, sigma, "v_prediction"),
                               ddpm.get_velocity(tx0, teps, tt).numpy(), rtol=1e-6, atol=1e-6)
    assert schedules.target(x0, eps, alpha, sigma, "epsilon") is eps
    assert schedules.target(x0, eps, alpha, sigma, "sample") is x0
    snr = compute_snr(ddpm, tt).numpy()
    np.testing.assert_allclose(schedules.snr(abar)[t], snr, rtol=2e-6)


@pytest.mark.parametrize("prediction_type", schedules.PREDICTION_TYPES)
def test_conversions_match_diffusers_and_invert_the_target(prediction_type):
    ddpm, abar, x0, eps, t, alpha, sigma = _setup(dict(SD, prediction_type=prediction_type))
    x_t = schedules.add_noise(x0, eps, alpha, sigma)
    out = np.asarray(schedules.target(x0, eps, alpha, sigma, prediction_type))
    g = torch.Generator().manual_seed(0)
    for i, ti in enumerate(t[:-1]):  # diffusers' x0 estimate inside DDPMScheduler.step (sigma > 0)
        ref = ddpm.step(torch.from_numpy(out[i:i + 1]), int(ti), torch.from_numpy(x_t[i:i + 1]),
                        generator=g).pred_original_sample.numpy()
        got = schedules.to_x0(jnp.asarray(out[i:i + 1]), x_t[i:i + 1], alpha[i], sigma[i], prediction_type)
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * max(1, 1 / float(alpha[i, 0, 0, 0])))
    # and the conversions invert the target: the x0 and eps that made x_t
    np.testing.assert_allclose(schedules.to_x0(out, x_t, alpha, sigma, prediction_type)[:-1], x0[:-1], atol=2e-3)
    np.testing.assert_allclose(schedules.to_eps(out, x_t, alpha, sigma, prediction_type)[1:], eps[1:], atol=2e-3)

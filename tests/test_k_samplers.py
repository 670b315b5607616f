"""Euler, Euler a, Heun and DPM-Solver++(2M) (more of its family in test_dpm_samplers.py) trajectories against diffusers' schedulers (same fake model and noise)."""
import numpy as np
import pytest
import torch
from diffusers import (DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler,
                       HeunDiscreteScheduler)

from sampler_reference import SD_CONFIG, assert_noise_levels, img2img_start, run_diffusers, run_ours, test_inputs
from sdjax.diffusion import schedules
from sdjax.diffusion.plan import slice_plan
from sdjax.diffusion.samplers import SAMPLERS

torch.set_num_threads(1)
TOL = 1e-4      # max abs difference where |x| stays O(10) (SD's sigma_max ~ 14.6)
REL_TOL = 1e-6  # max difference relative to the largest |x| so far, for schedules reaching sigma ~ 160 or 4096

# name -> (diffusers scheduler class, module whose randn_tensor the step calls, or None if deterministic)
REFERENCES = {
    "euler": (EulerDiscreteScheduler, None),
    "euler_a": (EulerAncestralDiscreteScheduler, "diffusers.schedulers.scheduling_euler_ancestral_discrete"),
    "heun": (HeunDiscreteScheduler, None),
    "dpmpp_2m": (DPMSolverMultistepScheduler, None),
}
KARRAS = ["euler", "heun", "dpmpp_2m"]
ZERO_SNR = dict(SD_CONFIG, timestep_spacing="trailing", rescale_betas_zero_snr=True)
LINEAR = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.0001, beta_end=0.02,
              timestep_spacing="linspace")


def reference_scheduler(name, config, num_steps, **options):
    """diffusers' scheduler for `name`, built as pipelines do (from_config) with set_timesteps called."""
    scheduler = REFERENCES[name][0].from_config(config, **options)
    scheduler.set_timesteps(num_steps)
    return scheduler


def compare(name, config, num_steps, seed=0, **options):
    """(max abs diff, max diff relative to the largest |x| so far) over the text-to-image trajectory."""
    scheduler = reference_scheduler(name, config, num_steps, **options)
    plan = SAMPLERS[name].plan(schedules.scheduler_settings(config), num_steps, **options)
    # a ramp's timesteps come from log-sigma interpolation, sensitive to the last bits of alphas_cumprod
    exact = not any(options.get(f"use_{ramp}_sigmas") for ramp in schedules.SIGMA_RAMPS)
    np.testing.assert_allclose(plan.timesteps, scheduler.timesteps.numpy(), rtol=0, atol=0 if exact else 2e-3)
    np.testing.assert_allclose(plan.init_noise_sigma, float(scheduler.init_noise_sigma), rtol=2e-6)
    x, noises = test_inputs(seed, len(plan.timesteps))
    x = x * plan.init_noise_sigma
    ref = run_diffusers(scheduler, x, noises, REFERENCES[name][1])
    ours = run_ours(SAMPLERS[name], plan, x, noises)
    assert ours.shape == ref.shape
    diff = np.abs(ours - ref).reshape(len(ref), -1).max(1)
    scale = np.maximum.accumulate(np.maximum(np.abs(ref).reshape(len(ref), -1).max(1), np.abs(x).max()))
    return float(diff.max()), float((diff / np.maximum(scale, 1)).max())


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("num_steps", [1, 4, 10, 25])
@pytest.mark.parametrize("name", list(REFERENCES))
def test_sd_config(name, num_steps, prediction_type):
    assert compare(name, dict(SD_CONFIG, prediction_type=prediction_type), num_steps)[0] <= TOL


@pytest.mark.parametrize("spacing", ["linspace", "trailing"])
@pytest.mark.parametrize("num_steps", [2, 7])
@pytest.mark.parametrize("name", list(REFERENCES))
def test_spacings(name, num_steps, spacing):
    config = dict(SD_CONFIG, timestep_spacing=spacing, prediction_type="v_prediction")
    assert compare(name, config, num_steps)[0] <= TOL


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("num_steps", [1, 4, 25])
@pytest.mark.parametrize("name", KARRAS)
def test_karras(name, num_steps, spacing):
    config = dict(SD_CONFIG, timestep_spacing=spacing)
    assert compare(name, config, num_steps, use_karras_sigmas=True)[0] <= TOL


@pytest.mark.parametrize("num_steps", [1, 4, 25])
@pytest.mark.parametrize("ramp", ["exponential", "beta"])
@pytest.mark.parametrize("name", ["euler", "heun"])
def test_exponential_and_beta_sigmas(name, ramp, num_steps):
    assert compare(name, SD_CONFIG, num_steps, **{f"use_{ramp}_sigmas": True})[0] <= TOL


@pytest.mark.parametrize("options", [dict(final_sigmas_type="sigma_min"),
                                     dict(use_karras_sigmas=True, sigma_min=0.1, sigma_max=10.0),
                                     dict(use_beta_sigmas=True, sigma_min=0.05, final_sigmas_type="sigma_min")],
                         ids=["sigma_min_final", "karras_range", "beta_range"])
def test_euler_options(options):
    assert compare("euler", dict(SD_CONFIG, prediction_type="v_prediction"), 6, **options)[0] <= TOL


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("num_steps", [1, 4, 25])
@pytest.mark.parametrize("name", ["euler", "euler_a", "dpmpp_2m"])
def test_zero_snr(name, num_steps, prediction_type):
    # sigma_max = 4096: x reaches ~1e4, so float32 agreement is relative
    assert compare(name, dict(ZERO_SNR, prediction_type=prediction_type), num_steps)[1] <= REL_TOL


@pytest.mark.parametrize("num_steps", [3, 20])
@pytest.mark.parametrize("name", list(REFERENCES))
def test_linear_betas(name, num_steps):
    assert compare(name, LINEAR, num_steps)[1] <= REL_TOL
    if name in KARRAS:
        assert compare(name, LINEAR, num_steps, use_karras_sigmas=True)[1] <= REL_TOL


@pytest.mark.parametrize("num_steps", [4, 14, 15, 25])  # >= 15 steps: the last step stays second order
def test_dpm_final_sigma_min(num_steps):
    assert compare("dpmpp_2m", SD_CONFIG, num_steps, final_sigmas_type="sigma_min")[0] <= TOL


@pytest.mark.parametrize("name", ["euler", "heun", "dpmpp_2m"])
def test_sample_prediction(name):
    # diffusers' EulerAncestral does not implement prediction_type="sample"
    config = dict(SD_CONFIG, prediction_type="sample", clip_sample=name == "heun", clip_sample_range=0.25)
    assert compare(name, config, 6)[0] <= TOL


@pytest.mark.parametrize("config", [SD_CONFIG, ZERO_SNR], ids=["sd", "zero_snr"])
@pytest.mark.parametrize("name", list(REFERENCES))
def test_noise_levels_match_add_noise(name, config):
    if name == "heun" and config is ZERO_SNR:
        pytest.skip("HeunDiscreteScheduler has no zero-SNR option")
    scheduler = reference_scheduler(name, config, 10)
    plan = SAMPLERS[name].plan(schedules.scheduler_settings(config), 10)
    assert_noise_levels(scheduler, plan)


@pytest.mark.parametrize("strength", [0.3, 0.75, 0.95])
@pytest.mark.parametrize("name", list(REFERENCES))
def test_img2img_slice(name, strength):
    """As diffusers' img2img: timesteps[t_start * order:], set_begin_index, start from add_noise at the first one."""
    num_steps = 10
    scheduler = reference_scheduler(name, SD_CONFIG, num_steps)
    start = (num_steps - int(num_steps * strength)) * scheduler.order
    plan = slice_plan(SAMPLERS[name].plan(schedules.scheduler_settings(SD_CONFIG), num_steps), start)
    np.testing.assert_array_equal(plan.timesteps, scheduler.timesteps[start:].numpy())
    x, noises = img2img_start(scheduler, plan, start)
    ref = run_diffusers(scheduler, x, noises, REFERENCES[name][1], start=start)
    assert np.abs(run_ours(SAMPLERS[name], plan, x, noises) - ref).max() <= TOL


def test_karras_sigmas_closed_form():
    sigmas = schedules.karras_sigmas(0.03, 14.6, 5)
    assert sigmas[0] == pytest.approx(14.6) and sigmas[-1] == pytest.approx(0.03)
    np.testing.assert_allclose(np.diff(sigmas ** (1 / 7)), (0.03 ** (1 / 7) - 14.6 ** (1 / 7)) / 4)
    train = np.array([0.1, 1.0, 10.0])  # log-linear in t: sigma = 0.1 * 10^t
    np.testing.assert_allclose(schedules.sigma_to_t(np.array([0.01, 0.1, 10 ** 0.5 * 0.1, 10.0, 50.0]), train),
                               [0, 0, 0.5, 2, 2])


def test_errors():
    with pytest.raises(ValueError, match="rescale_betas_zero_snr"):
        SAMPLERS["heun"].plan(schedules.scheduler_settings(ZERO_SNR), 4)
    with pytest.raises(ValueError, match="final_sigmas_type"):
        SAMPLERS["dpmpp_2m"].plan(schedules.scheduler_settings(SD_CONFIG), 4, final_sigmas_type="max")
    with pytest.raises(ValueError, match="num_steps"):
        SAMPLERS["euler"].plan(schedules.scheduler_settings(SD_CONFIG), 0)
    with pytest.raises(TypeError):
        SAMPLERS["euler_a"].plan(schedules.scheduler_settings(SD_CONFIG), 4, use_karras_sigmas=True)
    with pytest.raises(ValueError, match="only one of"):
        SAMPLERS["heun"].plan(schedules.scheduler_settings(SD_CONFIG), 4, use_karras_sigmas=True, use_beta_sigmas=True)

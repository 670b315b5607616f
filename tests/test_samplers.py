"""DDIM, DDPM and PNDM trajectories against diffusers' schedulers driven by the same fake model and noise."""
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, PNDMScheduler

from sampler_reference import SD_CONFIG, run_diffusers, run_ours, test_inputs
from sdjax.diffusion import plan as plan_lib, samplers, schedules

torch.set_num_threads(1)
TOL = 1e-4

# name -> (diffusers scheduler class, module whose randn_tensor the step calls, or None if deterministic)
REFERENCES = {
    "ddim": (DDIMScheduler, "diffusers.schedulers.scheduling_ddim"),
    "ddpm": (DDPMScheduler, "diffusers.schedulers.scheduling_ddpm"),
    "pndm": (PNDMScheduler, None),
}
ZERO_SNR = dict(SD_CONFIG, timestep_spacing="trailing", rescale_betas_zero_snr=True, prediction_type="v_prediction")


def compare(name, config, num_steps, seed=0, **options):
    """Max abs difference of the whole trajectory, ours vs diffusers, after checking the timesteps agree."""
    cls, randn_module = REFERENCES[name]
    scheduler = cls.from_config(config)
    scheduler.set_timesteps(num_steps)
    plan = samplers.SAMPLERS[name].plan(schedules.scheduler_settings(config), num_steps, **options)
    np.testing.assert_array_equal(plan.timesteps, scheduler.timesteps.numpy())
    x, noises = test_inputs(seed, len(plan.timesteps))
    ref = run_diffusers(scheduler, x, noises, randn_module, step_kwargs=options)
    ours = run_ours(samplers.SAMPLERS[name], plan, x, noises)
    assert ours.shape == ref.shape
    return float(np.abs(ours - ref).max())


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("num_steps", [1, 4, 10, 25])
@pytest.mark.parametrize("name", ["ddim", "ddpm", "pndm"])
def test_sd_config(name, num_steps, prediction_type):
    assert compare(name, dict(SD_CONFIG, prediction_type=prediction_type), num_steps) <= TOL


@pytest.mark.parametrize("num_steps", [2, 7])
@pytest.mark.parametrize("config", [
    ZERO_SNR,
    dict(SD_CONFIG, timestep_spacing="linspace"),
    dict(num_train_timesteps=1000, clip_sample=False),  # diffusers' defaults: linear betas, set_alpha_to_one True
], ids=["trailing_zero_snr", "linspace", "linear_defaults"])
@pytest.mark.parametrize("name", ["ddim", "ddpm"])
def test_other_configs(name, config, num_steps):
    assert compare(name, config, num_steps) <= TOL


@pytest.mark.parametrize("spacing", ["trailing", "linspace"])
@pytest.mark.parametrize("num_steps", [2, 7])
def test_pndm_spacings(spacing, num_steps):
    # PNDMScheduler has no zero-SNR option; its step still uses num_train_timesteps // num_steps.
    assert compare("pndm", dict(SD_CONFIG, timestep_spacing=spacing, prediction_type="v_prediction"), num_steps) <= TOL


@pytest.mark.parametrize("num_steps", [1, 4, 25])
@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_ddim_eta(eta, num_steps):
    assert compare("ddim", SD_CONFIG, num_steps, eta=eta) <= TOL
    # Not eta=1 at zero terminal SNR: there sqrt(1 - abar_prev - std^2) takes the root of a difference that is
    # exactly 0 in exact arithmetic, so one float32 rounding (ours or diffusers') moves x by ~2e-4.
    if eta < 1:
        assert compare("ddim", ZERO_SNR, num_steps, eta=eta) <= TOL


@pytest.mark.parametrize("name", ["ddim", "ddpm"])
def test_sample_prediction_clipped(name):
    config = dict(SD_CONFIG, prediction_type="sample", clip_sample=True, clip_sample_range=0.25)
    assert compare(name, config, 6) <= TOL


@pytest.mark.parametrize("name", ["ddim", "ddpm", "pndm"])
def test_noise_levels_match_add_noise(name):
    config = ZERO_SNR if name != "pndm" else SD_CONFIG
    scheduler = REFERENCES[name][0].from_config(config)
    scheduler.set_timesteps(10)
    plan = samplers.SAMPLERS[name].plan(schedules.scheduler_settings(config), 10)
    x0, eps = test_inputs(1, 1)
    for i, t in enumerate(scheduler.timesteps):
        ref = scheduler.add_noise(torch.from_numpy(x0), torch.from_numpy(eps[0]), t[None]).numpy()
        np.testing.assert_allclose(plan.noise_a[i] * x0 + plan.noise_b[i] * eps[0], ref, rtol=0, atol=1e-6)
    assert plan.init_noise_sigma == scheduler.init_noise_sigma and plan.order == scheduler.order


@pytest.mark.parametrize("strength", [0.3, 0.75, 0.95])
@pytest.mark.parametrize("name", ["ddim", "ddpm", "pndm"])
def test_img2img_slice(name, strength):
    """As diffusers' img2img: fresh scheduler, timesteps[t_start * order:], start from add_noise at the first one."""
    num_steps = 10
    cls, randn_module = REFERENCES[name]
    scheduler = cls.from_config(SD_CONFIG)
    scheduler.set_timesteps(num_steps)
    start = (num_steps - int(num_steps * strength)) * scheduler.order
    full = samplers.SAMPLERS[name].plan(schedules.scheduler_settings(SD_CONFIG), num_steps)
    plan = plan_lib.slice_plan(full, start)
    np.testing.assert_array_equal(plan.timesteps, scheduler.timesteps[start:].numpy())
    x0, noises = test_inputs(2, len(plan.timesteps) + 1)
    x_ref = scheduler.add_noise(torch.from_numpy(x0), torch.from_numpy(noises[-1]), scheduler.timesteps[start:start + 1])
    x = plan.noise_a[0] * x0 + plan.noise_b[0] * noises[-1]
    np.testing.assert_allclose(x, x_ref.numpy(), rtol=0, atol=1e-6)
    ref = run_diffusers(scheduler, x, noises, randn_module, start=start)
    assert np.abs(run_ours(samplers.SAMPLERS[name], plan, x, noises) - ref).max() <= TOL


def test_errors():
    with pytest.raises(ValueError, match="prediction_type"):
        samplers.SAMPLERS["pndm"].plan(schedules.scheduler_settings(dict(SD_CONFIG, prediction_type="sample")), 4)
    plan = samplers.SAMPLERS["ddim"].plan(schedules.scheduler_settings(SD_CONFIG), 4)
    with pytest.raises(ValueError, match="start"):
        plan_lib.slice_plan(plan, 4)

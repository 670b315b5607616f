"""UniPC, LMS, LCM and TCD trajectories against diffusers' schedulers (same fake model and noise)."""
import json
import logging

import numpy as np
import pytest
import torch
from diffusers import LCMScheduler, LMSDiscreteScheduler, TCDScheduler, UniPCMultistepScheduler

from sampler_reference import SD_CONFIG, assert_noise_levels, run_diffusers, run_ours, test_inputs
from sdjax.diffusion import schedules
from sdjax.diffusion.plan import slice_plan
from sdjax.diffusion.samplers import CLASS_DEFAULTS, SAMPLERS, configure

torch.set_num_threads(1)
TOL = 1e-4      # max abs difference where |x| stays O(10)
REL_TOL = 1e-6  # max difference relative to the largest |x| so far, for zero-SNR schedules (sigma_max ~ 4096)

# name -> (diffusers scheduler class, module whose randn_tensor the step calls, or None if deterministic)
REFERENCES = {
    "unipc": (UniPCMultistepScheduler, None),
    "lms": (LMSDiscreteScheduler, None),
    "lcm": (LCMScheduler, "diffusers.schedulers.scheduling_lcm"),
    "tcd": (TCDScheduler, "diffusers.schedulers.scheduling_tcd"),
}
SD = {k: v for k, v in SD_CONFIG.items() if k != "skip_prk_steps"}  # PNDM's own key (diffusers warns)
ZERO_SNR = dict(SD, timestep_spacing="trailing", rescale_betas_zero_snr=True, prediction_type="v_prediction")
RAMPS = ["use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"]
SET_TIMESTEPS_KEYS = {"strength"}  # plan options that are diffusers' set_timesteps arguments
STEP_KEYS = {"eta"}                # ... and step arguments; the others are config keys


def reference_scheduler(name, config, num_steps, **options):
    """diffusers' scheduler for `name` from_config(config, **config options), set_timesteps called."""
    config_options = {k: v for k, v in options.items() if k not in SET_TIMESTEPS_KEYS | STEP_KEYS}
    scheduler = REFERENCES[name][0].from_config(config, **config_options)
    scheduler.set_timesteps(num_steps, **{k: v for k, v in options.items() if k in SET_TIMESTEPS_KEYS})
    return scheduler


def settings_of(name, config):
    """Our settings of a config dict for `name`'s class (its defaults for the keys left out)."""
    return schedules.scheduler_settings(config, CLASS_DEFAULTS[name])


def nan_at_zero_sigma(name, options):
    """Whether diffusers' UniPC returns NaN at the last step (a zero final sigma): bh1 multiplies a zero
    correction by B(h) = -inf, predict_x0=False 0 by e^inf. Ours takes the limit there: the predicted x0."""
    return name == "unipc" and options.get("final_sigmas_type", "zero") == "zero" and (
        options.get("solver_type") == "bh1" or options.get("predict_x0") is False)


def zero_sigma_limit(scheduler):
    """Where diffusers' UniPC run ended in NaN: the first-order step to sigma = 0 taken as its limit, from its
    state after the run (the last corrected sample and converted model output) -> x0 [B,h,w,c]."""
    m = scheduler.model_outputs[-1].numpy()
    if scheduler.config.predict_x0:
        return m
    sigma = float(scheduler.sigmas[-2])
    alpha = 1 / (sigma * sigma + 1) ** 0.5
    return (scheduler.last_sample.numpy() - sigma * alpha * m) / alpha


def compare(name, config, num_steps, seed=0, start=0, **options):
    """(max abs diff, max diff relative to the largest |x| so far) over the trajectory from iteration `start`
    (img2img: diffusers' set_begin_index, both from add_noise at the first timestep that runs)."""
    scheduler = reference_scheduler(name, config, num_steps, **options)
    plan = SAMPLERS[name].plan(settings_of(name, config), num_steps, **options)
    # LMS's ramped timesteps are fractional (log-sigma interpolation, sensitive to alphas_cumprod's last bits)
    atol = 2e-3 if name == "lms" and any(options.get(k) for k in RAMPS) else 0
    np.testing.assert_allclose(plan.timesteps, scheduler.timesteps.numpy(), rtol=0, atol=atol)
    np.testing.assert_allclose(plan.init_noise_sigma, float(scheduler.init_noise_sigma), rtol=2e-6)
    assert plan.order == scheduler.order
    plan = slice_plan(plan, start)
    x, noises = test_inputs(seed, len(plan.timesteps) + 1)
    scheduler.set_begin_index(start)  # as pipelines do for img2img (t2i: a repeated first timestep is no skip)
    if start:
        x_ref = scheduler.add_noise(torch.from_numpy(x), torch.from_numpy(noises[-1]),
                                    scheduler.timesteps[start:start + 1]).numpy()
        x = plan.noise_a[0] * x + plan.noise_b[0] * noises[-1]
        np.testing.assert_allclose(x, x_ref, rtol=1e-6, atol=1e-6)
    else:
        x = x * plan.init_noise_sigma
    step_kwargs = {k: v for k, v in options.items() if k in STEP_KEYS}
    ref = run_diffusers(scheduler, x, noises, REFERENCES[name][1], start=start, step_kwargs=step_kwargs)
    ours = run_ours(SAMPLERS[name], plan, x, noises)
    if nan_at_zero_sigma(name, options):
        assert np.isnan(ref[-1]).all()
        ref[-1] = zero_sigma_limit(scheduler)
    assert ours.shape == ref.shape and np.isfinite(ref).all()
    diff = np.abs(ours - ref).reshape(len(ref), -1).max(1)
    scale = np.maximum.accumulate(np.maximum(np.abs(ref).reshape(len(ref), -1).max(1), np.abs(x).max()))
    return float(diff.max()), float((diff / np.maximum(scale, 1)).max())


def trajectory(name, config, num_steps, **options):
    """Our trajectory [S, ...] from the standard start."""
    plan = SAMPLERS[name].plan(settings_of(name, config), num_steps, **options)
    x, noises = test_inputs(0, len(plan.timesteps))
    return run_ours(SAMPLERS[name], plan, x * plan.init_noise_sigma, noises)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("num_steps", [1, 2, 4, 10, 25])
@pytest.mark.parametrize("name", list(REFERENCES))
def test_sd_config(name, num_steps, prediction_type):
    assert compare(name, dict(SD, prediction_type=prediction_type), num_steps)[0] <= TOL


# ---- UniPC's options ----

@pytest.mark.parametrize("solver_type", ["bh1", "bh2"])
@pytest.mark.parametrize("solver_order", [1, 2, 3])
def test_unipc_orders(solver_order, solver_type, num_steps=12):
    assert compare("unipc", SD, num_steps, solver_order=solver_order, solver_type=solver_type)[0] <= TOL


@pytest.mark.parametrize("options", [
    dict(predict_x0=False),
    dict(predict_x0=False, final_sigmas_type="sigma_min"),
    dict(predict_x0=False, final_sigmas_type="sigma_min", solver_order=3, solver_type="bh1"),
    dict(final_sigmas_type="sigma_min", lower_order_final=False, solver_order=3),
    dict(final_sigmas_type="sigma_min"),
    dict(disable_corrector=[0, 1, 5]),
    dict(solver_type="midpoint"),  # a DPM-Solver config's solver_type: diffusers runs bh2
], ids=["eps_space", "eps_space_sigma_min", "eps_space_bh1_3", "no_lower_order_final", "sigma_min",
        "disable_corrector", "midpoint"])
@pytest.mark.parametrize("num_steps", [4, 25])
def test_unipc_options(options, num_steps):
    config = dict(SD, prediction_type="v_prediction") if options.get("predict_x0") is False else SD
    assert compare("unipc", config, num_steps, **options)[0] <= TOL


@pytest.mark.parametrize("options", [dict(solver_order=3), dict(solver_type="bh1"), dict(disable_corrector=[1]),
                                     dict(use_karras_sigmas=True)], ids=lambda o: next(iter(o)))
def test_unipc_options_take_effect(options):
    """What the tolerance above is small against: each option moves the trajectory by far more."""
    effect = np.abs(trajectory("unipc", SD, 6, **options) - trajectory("unipc", SD, 6)).max()
    assert effect > 30 * TOL


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("name", ["unipc", "lms"])
def test_spacings(name, spacing, num_steps=7):
    assert compare(name, dict(SD, timestep_spacing=spacing, prediction_type="v_prediction"), num_steps)[0] <= TOL


@pytest.mark.parametrize("ramp", RAMPS)
@pytest.mark.parametrize("num_steps", [1, 4, 25])
@pytest.mark.parametrize("name", ["unipc", "lms"])
def test_sigma_ramps(name, num_steps, ramp):
    spacing = "trailing" if num_steps == 4 else "leading"  # LMS ramps between the spaced schedule's ends
    assert compare(name, dict(SD, timestep_spacing=spacing), num_steps, **{ramp: True})[0] <= TOL


@pytest.mark.parametrize("ramp", RAMPS)
def test_unipc_ramp_sigma_min(ramp):
    assert compare("unipc", SD, 10, final_sigmas_type="sigma_min", solver_order=3, **{ramp: True})[0] <= TOL


@pytest.mark.parametrize("num_steps", [1, 4, 25])
@pytest.mark.parametrize("name", ["unipc", "lcm", "tcd"])
def test_zero_snr(name, num_steps):
    assert compare(name, ZERO_SNR, num_steps)[1] <= REL_TOL


@pytest.mark.parametrize("config", [
    dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
    dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2"),
], ids=["linear", "cosine"])
@pytest.mark.parametrize("name", list(REFERENCES))
def test_other_betas(name, config):
    assert compare(name, config, 6)[1] <= REL_TOL
    if name in ("unipc", "lms"):  # UniPC rounds the Karras timesteps also for the cosine schedule
        assert compare(name, config, 6, use_karras_sigmas=True)[1] <= REL_TOL


@pytest.mark.parametrize("name", list(REFERENCES))
def test_sample_prediction(name):
    config = dict(SD, prediction_type="sample", clip_sample=name == "lcm", clip_sample_range=0.25)
    assert compare(name, config, 6)[0] <= TOL


# ---- LCM and TCD's schedules and eta ----

@pytest.mark.parametrize("options", [
    dict(original_inference_steps=100), dict(original_inference_steps=20), dict(original_inference_steps=8),
    dict(timestep_scaling=3.0),
], ids=["orig100", "orig20", "orig8", "scaling3"])
@pytest.mark.parametrize("num_steps", [1, 7])
def test_lcm_schedule_options(options, num_steps):
    assert compare("lcm", SD, num_steps, **options)[0] <= TOL


@pytest.mark.parametrize("eta", [0.0, 0.3, 0.75, 1.0])
def test_tcd_eta(eta):
    assert compare("tcd", SD, 1, eta=eta)[0] <= TOL
    assert compare("tcd", dict(SD, prediction_type="v_prediction"), 9, eta=eta, original_inference_steps=20)[0] <= TOL


@pytest.mark.parametrize("strength", [0.3, 0.6, 1.0])
@pytest.mark.parametrize("name", ["lcm", "tcd"])
def test_consistency_strength(name, strength):
    """diffusers' LatentConsistencyModelImg2ImgPipeline: set_timesteps(n, strength=...), all n steps from add_noise
    at the first timestep; the plan's `strength` option (not a slice) reproduces it."""
    num_steps = 4
    scheduler = reference_scheduler(name, SD, num_steps, strength=strength)
    plan = SAMPLERS[name].plan(settings_of(name, SD), num_steps, strength=strength)
    np.testing.assert_array_equal(plan.timesteps, scheduler.timesteps.numpy())
    x0, noises = test_inputs(3, num_steps + 1)
    x_ref = scheduler.add_noise(torch.from_numpy(x0), torch.from_numpy(noises[-1]), scheduler.timesteps[:1]).numpy()
    x = plan.noise_a[0] * x0 + plan.noise_b[0] * noises[-1]
    np.testing.assert_allclose(x, x_ref, rtol=0, atol=1e-6)
    ref = run_diffusers(scheduler, x, noises, REFERENCES[name][1])
    assert np.abs(run_ours(SAMPLERS[name], plan, x, noises) - ref).max() <= TOL


# ---- img2img, add_noise, folders ----

@pytest.mark.parametrize("strength", [0.3, 0.95])
@pytest.mark.parametrize("name", list(REFERENCES))
def test_img2img_slice(name, strength):
    """As diffusers' img2img pipelines: timesteps[t_start * order:], set_begin_index, start from add_noise there."""
    num_steps = 10
    options = dict(solver_order=3) if name == "unipc" else {}
    start = (num_steps - int(num_steps * strength)) * REFERENCES[name][0].order
    assert compare(name, SD, num_steps, start=start, seed=2, **options)[0] <= TOL


@pytest.mark.parametrize("config", [SD, ZERO_SNR], ids=["sd", "zero_snr"])
@pytest.mark.parametrize("name", list(REFERENCES))
def test_noise_levels_match_add_noise(name, config):
    if name == "lms" and config is ZERO_SNR:
        pytest.skip("LMSDiscreteScheduler has no zero-SNR option")
    scheduler = reference_scheduler(name, config, 10)
    plan = SAMPLERS[name].plan(settings_of(name, config), 10)
    assert_noise_levels(scheduler, plan)


# An SD 1.5-like scheduler_config.json (no timestep_spacing, PNDM's keys) with each class's own options on top.
SD15 = dict(beta_end=0.012, beta_schedule="scaled_linear", beta_start=0.00085, clip_sample=False,
            num_train_timesteps=1000, set_alpha_to_one=False, steps_offset=1, trained_betas=None)
FOLDER_OPTIONS = {
    "unipc": dict(solver_order=3, solver_type="bh1", disable_corrector=[0], use_karras_sigmas=True,
                  final_sigmas_type="sigma_min", prediction_type="v_prediction"),
    "lms": dict(use_beta_sigmas=True, prediction_type="v_prediction"),
    "lcm": dict(original_inference_steps=40, timestep_scaling=5.0),
    "tcd": dict(original_inference_steps=40),
}


@pytest.mark.parametrize("name", list(REFERENCES))
def test_scheduler_folder(name, tmp_path, caplog):
    """configure() of the saved scheduler_config.json runs what Class.from_pretrained(folder) runs."""
    cls, randn_module = REFERENCES[name]
    cls.from_config(dict(SD15, **FOLDER_OPTIONS[name])).save_config(tmp_path)
    with caplog.at_level(logging.WARNING, logger="sdjax"):
        settings, options = configure(name, json.loads((tmp_path / "scheduler_config.json").read_text()))
    assert not caplog.records  # every key that changes results is honoured
    num_steps = 8
    plan = SAMPLERS[name].plan(settings, num_steps, **options)
    scheduler = cls.from_pretrained(tmp_path)
    scheduler.set_timesteps(num_steps)
    np.testing.assert_allclose(plan.timesteps, scheduler.timesteps.numpy(), rtol=0, atol=2e-3 if name == "lms" else 0)
    x, noises = test_inputs(4, num_steps)
    x = x * plan.init_noise_sigma
    ref = run_diffusers(scheduler, x, noises, randn_module)
    assert np.abs(run_ours(SAMPLERS[name], plan, x, noises) - ref).max() <= TOL


def test_configure_warns_fixed_keys(caplog):
    with caplog.at_level(logging.WARNING, logger="sdjax"):
        configure("unipc", dict(SD15, _class_name="UniPCMultistepScheduler", thresholding=True))
    assert "thresholding=True" in caplog.text


def test_errors():
    settings = schedules.scheduler_settings(SD)
    for name, options, match in [
        ("unipc", dict(solver_order=0), "solver_order"), ("unipc", dict(solver_type="ddim"), "solver_type"),
        ("unipc", dict(lower_order_final=False), "lower_order_final"),
        ("unipc", dict(lower_order_final=False, final_sigmas_type="sigma_min", use_beta_sigmas=True),
         "lower_order_final"),
        ("unipc", dict(final_sigmas_type="max"), "final_sigmas_type"),
        ("unipc", dict(disable_corrector=[0.5]), "disable_corrector"),
        ("lms", dict(use_karras_sigmas=True, use_beta_sigmas=True), "use_karras_sigmas"),
        ("tcd", dict(eta=1.5), "eta"), ("lcm", dict(strength=0), "strength"),
        ("lcm", dict(original_inference_steps=2000), "original_inference_steps"),
    ]:
        with pytest.raises(ValueError, match=match):
            SAMPLERS[name].plan(settings, 4, **options)
    with pytest.raises(ValueError, match="num_steps"):
        SAMPLERS["lcm"].plan(settings, 51)
    with pytest.raises(ValueError, match="strength"):
        SAMPLERS["tcd"].plan(settings, 10, strength=0.1)  # 5 distillation timesteps left for 10 steps
    with pytest.raises(ValueError, match="rescale_betas_zero_snr"):
        SAMPLERS["lms"].plan(schedules.scheduler_settings(ZERO_SNR), 4)

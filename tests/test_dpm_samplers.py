"""DPM-Solver++ (2M, 3M, SDE, 2S) and DEIS trajectories against diffusers' DPMSolverMultistep,
DPMSolverSinglestep and DEISMultistep schedulers (same fake model, and for the SDE variants the same noise)."""
import json

import numpy as np
import pytest
import torch
from diffusers import DEISMultistepScheduler, DPMSolverMultistepScheduler, DPMSolverSinglestepScheduler, PNDMScheduler

from sampler_reference import SD_CONFIG, assert_noise_levels, run_diffusers, run_ours, test_inputs
from sdjax.diffusion import samplers, schedules
from sdjax.diffusion.dpm_solver import singlestep_orders
from sdjax.diffusion.plan import slice_plan

torch.set_num_threads(1)
TOL = 1e-4      # max abs difference where |x| stays O(10)
REL_TOL = 1e-6  # max difference relative to the largest |x| so far, for schedules reaching sigma ~ 4096 or more
# diffusers' third-order SDE update weighs D2 by about -1 (the ODE update by O(h)): its trajectory swings and
# grows (to |x| ~ 100 with 12 beta-ramp steps), float32 rounding with it, so it is compared relative to |x|
SDE3_REL_TOL = 5e-6

_MULTI = "diffusers.schedulers.scheduling_dpmsolver_multistep"
# name -> (diffusers scheduler class, the config it runs with, module whose randn_tensor its step calls or None)
REFERENCES = {
    "dpmpp_2m": (DPMSolverMultistepScheduler, dict(algorithm_type="dpmsolver++", solver_order=2), None),
    "dpmpp_3m": (DPMSolverMultistepScheduler, dict(algorithm_type="dpmsolver++", solver_order=3), None),
    "dpmpp_2m_sde": (DPMSolverMultistepScheduler, dict(algorithm_type="sde-dpmsolver++", solver_order=2), _MULTI),
    "dpmpp_3m_sde": (DPMSolverMultistepScheduler, dict(algorithm_type="sde-dpmsolver++", solver_order=3), _MULTI),
    "dpmpp_2s": (DPMSolverSinglestepScheduler, {}, None),
    "deis": (DEISMultistepScheduler, {}, None),
}
MULTISTEP = ["dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde", "dpmpp_3m_sde"]
ZERO_SNR = dict(SD_CONFIG, timestep_spacing="trailing", rescale_betas_zero_snr=True, prediction_type="v_prediction")
COSINE = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", timestep_spacing="linspace")


def reference_scheduler(name, config, num_steps, **options):
    """diffusers' scheduler for `name`, built as pipelines do (from_config) with set_timesteps called."""
    cls, fixed, _ = REFERENCES[name]
    scheduler = cls.from_config(config, **fixed, **options)
    scheduler.set_timesteps(num_steps)
    return scheduler


def compare_plan(name, scheduler, plan, seed=0):
    """(max abs diff, max diff relative to the largest |x| so far) of the text-to-image trajectories."""
    np.testing.assert_array_equal(plan.timesteps, scheduler.timesteps.numpy())
    assert plan.init_noise_sigma == scheduler.init_noise_sigma and plan.order == scheduler.order
    x, noises = test_inputs(seed, len(plan.timesteps))
    ref = run_diffusers(scheduler, x, noises, REFERENCES[name][2])
    ours = run_ours(samplers.SAMPLERS[name], plan, x, noises)
    assert ours.shape == ref.shape
    diff = np.abs(ours - ref).reshape(len(ref), -1).max(1)
    scale = np.maximum.accumulate(np.maximum(np.abs(ref).reshape(len(ref), -1).max(1), np.abs(x).max()))
    return float(diff.max()), float((diff / np.maximum(scale, 1)).max())


def compare(name, config, num_steps, float64_sigmas=False, **options):
    """compare_plan of our plan and diffusers' scheduler; float64_sigmas: diffusers' step coefficients computed in
    float64 (from its float32 sigmas), the updates themselves still in float32."""
    plan = samplers.SAMPLERS[name].plan(schedules.scheduler_settings(config), num_steps, **options)
    scheduler = reference_scheduler(name, config, num_steps, **options)
    if float64_sigmas:
        scheduler.sigmas = scheduler.sigmas.double()
    return compare_plan(name, scheduler, plan)


def within_tol(name, result):
    return result[1] <= SDE3_REL_TOL if name == "dpmpp_3m_sde" else result[0] <= TOL


@pytest.mark.parametrize("num_steps", [1, 2, 10, 25])  # < 15 steps: lower orders at the end
@pytest.mark.parametrize("name", list(REFERENCES))
def test_sd_config(name, num_steps):
    assert compare(name, SD_CONFIG, num_steps)[0] <= TOL


@pytest.mark.parametrize("spacing", ["linspace", "trailing"])
@pytest.mark.parametrize("name", ["dpmpp_2m", "dpmpp_3m_sde", "deis"])
def test_spacings_v_prediction(name, spacing):
    config = dict(SD_CONFIG, timestep_spacing=spacing, prediction_type="v_prediction")
    assert compare(name, config, 7)[0] <= TOL


@pytest.mark.parametrize("num_steps", [4, 25])
@pytest.mark.parametrize("name", MULTISTEP)
def test_zero_snr(name, num_steps):
    assert compare(name, ZERO_SNR, num_steps)[1] <= (SDE3_REL_TOL if name == "dpmpp_3m_sde" else REL_TOL)


@pytest.mark.parametrize("name,ramp", [(n, r) for n in ["dpmpp_2m", "dpmpp_3m_sde"] for r in ["karras", "exponential",
                                       "beta", "lu"]] + [(n, r) for n in ["dpmpp_2s", "deis"]
                                                         for r in ["karras", "exponential", "beta"]])
def test_sigma_ramps(name, ramp):
    option = "use_lu_lambdas" if ramp == "lu" else f"use_{ramp}_sigmas"
    assert within_tol(name, compare(name, SD_CONFIG, 12, **{option: True}))


@pytest.mark.parametrize("num_steps,option", [(3, "use_karras_sigmas"), (5, "use_lu_lambdas")])
def test_cosine_ramp_timesteps_truncated(num_steps, option):
    # squaredcos_cap_v2: the ramp's fractional timesteps are truncated, not rounded (3 steps: 998, not 999);
    # its sigma_max ~ 6e5 makes x0 ~ 1e5
    assert compare("dpmpp_3m", COSINE, num_steps, **{option: True})[1] <= REL_TOL


@pytest.mark.parametrize("name,num_steps,options", [
    ("dpmpp_2m", 8, dict(solver_type="heun")),
    ("dpmpp_3m", 8, dict(solver_type="heun")),
    ("dpmpp_2m_sde", 8, dict(solver_type="heun")),
    ("dpmpp_3m_sde", 8, dict(solver_type="heun", final_sigmas_type="sigma_min")),
    ("dpmpp_3m", 8, dict(lower_order_final=False, final_sigmas_type="sigma_min")),
    ("dpmpp_3m", 20, dict(euler_at_final=True, final_sigmas_type="sigma_min")),
    ("dpmpp_2m_sde", 9, dict(final_sigmas_type="sigma_min")),
    ("dpmpp_3m", 9, dict(lambda_min_clipped=-3.0, solver_type="bh2")),  # bh2 (UniPC's) runs as midpoint
    ("dpmpp_2s", 9, dict(lambda_min_clipped=-3.0)),
])
def test_solver_options(name, num_steps, options):
    assert within_tol(name, compare(name, SD_CONFIG, num_steps, **options))


@pytest.mark.parametrize("num_steps", [1, 3, 4, 8])  # n % 3 = 0, 1, 2; odd and even
@pytest.mark.parametrize("solver_order", [1, 2, 3])
def test_singlestep_orders(solver_order, num_steps):
    assert compare("dpmpp_2s", SD_CONFIG, num_steps, solver_order=solver_order)[0] <= TOL


@pytest.mark.parametrize("solver_order", [2, 3])
def test_singlestep_heun_full_stages(solver_order):
    options = dict(solver_order=solver_order, solver_type="heun", lower_order_final=False, final_sigmas_type="sigma_min")
    assert compare("dpmpp_2s", dict(SD_CONFIG, prediction_type="v_prediction"), 12, **options)[0] <= TOL


@pytest.mark.parametrize("num_steps", [2, 5, 16])
@pytest.mark.parametrize("solver_order", [1, 2, 3])
def test_deis_orders(solver_order, num_steps):
    assert compare("deis", SD_CONFIG, num_steps, solver_order=solver_order)[0] <= TOL


def test_deis_no_lower_order_final():
    assert compare("deis", SD_CONFIG, 10, solver_order=3, lower_order_final=False)[0] <= TOL


def test_deis_third_order_float32_coefficients():
    # DEIS's third-order weights are differences of Lagrange integrals ~ 1e3 apart by ~ 1: diffusers computes
    # them in float32 and is off by ~ 1e-2 over 25 beta-ramp steps; with its coefficients in float64 it
    # agrees with ours (computed in float64)
    options = dict(solver_order=3, use_beta_sigmas=True)
    assert compare("deis", SD_CONFIG, 25, **options)[0] > 1e-3
    assert compare("deis", SD_CONFIG, 25, float64_sigmas=True, **options)[0] <= TOL


@pytest.mark.parametrize("name", list(REFERENCES))
def test_sample_prediction(name):
    assert compare(name, dict(SD_CONFIG, prediction_type="sample"), 6)[0] <= TOL


def test_singlestep_order_lists():
    for n in range(1, 13):
        for k in (1, 2, 3):
            orders = singlestep_orders(n, k, True)
            assert len(orders) == n and orders[0] == 1 and set(np.diff(orders)[orders[1:] > 1]) <= {1}
            if n % k == 0:
                np.testing.assert_array_equal(singlestep_orders(n, k, False), np.tile(np.arange(1, k + 1), n // k))


@pytest.mark.parametrize("name", list(REFERENCES))
def test_noise_levels_match_add_noise(name):
    scheduler = reference_scheduler(name, SD_CONFIG, 10)
    plan = samplers.SAMPLERS[name].plan(schedules.scheduler_settings(SD_CONFIG), 10)
    assert_noise_levels(scheduler, plan)


@pytest.mark.parametrize("strength", [0.35, 0.75])  # starts at iteration 7 / 3: mid-stage for 2S, warm-up again
@pytest.mark.parametrize("name", list(REFERENCES))
def test_img2img_slice(name, strength):
    """As diffusers' img2img: timesteps[t_start:], set_begin_index, start from add_noise at the first one."""
    num_steps = 10
    scheduler = reference_scheduler(name, SD_CONFIG, num_steps)
    start = num_steps - int(num_steps * strength)
    scheduler.set_begin_index(start)
    plan = slice_plan(samplers.SAMPLERS[name].plan(schedules.scheduler_settings(SD_CONFIG), num_steps), start)
    np.testing.assert_array_equal(plan.timesteps, scheduler.timesteps[start:].numpy())
    x0, noises = test_inputs(2, len(plan.timesteps) + 1)
    x_ref = scheduler.add_noise(torch.from_numpy(x0), torch.from_numpy(noises[-1]), scheduler.timesteps[start:start + 1])
    x = plan.noise_a[0] * x0 + plan.noise_b[0] * noises[-1]
    np.testing.assert_allclose(x, x_ref.numpy(), rtol=0, atol=1e-5)
    ref = run_diffusers(scheduler, x, noises, REFERENCES[name][2], start=start)
    assert np.abs(run_ours(samplers.SAMPLERS[name], plan, x, noises) - ref).max() <= TOL


# A model folder's own scheduler_config.json (the class, some options), as scheduler_sampler chooses for it
NATIVE = {
    "dpmpp_2m": dict(use_karras_sigmas=True), "dpmpp_3m": dict(solver_order=3, euler_at_final=True),
    "dpmpp_2m_sde": dict(algorithm_type="sde-dpmsolver++", use_lu_lambdas=True),
    "dpmpp_3m_sde": dict(algorithm_type="sde-dpmsolver++", solver_order=3, final_sigmas_type="sigma_min"),
    "dpmpp_2s": dict(solver_order=3, use_exponential_sigmas=True), "deis": dict(solver_order=3, use_karras_sigmas=True),
}


@pytest.mark.parametrize("name", list(REFERENCES))
def test_saved_folder(name, tmp_path):
    """A folder with SD 1.5's PNDM scheduler_config.json, run with `name` (configure), and a folder with the
    class's own config (scheduler_sampler picks the sampler), against Class.from_pretrained of the same folder."""
    cls, fixed, _ = REFERENCES[name]
    PNDMScheduler.from_config(SD_CONFIG).save_config(tmp_path / "sd15")
    cls.from_config({**SD_CONFIG, **NATIVE[name]}).save_config(tmp_path / "own")
    for folder, extra in (("sd15", fixed), ("own", {})):
        config = json.loads((tmp_path / folder / "scheduler_config.json").read_text())
        settings, options = samplers.configure(name, config)
        if folder == "own":
            assert samplers.scheduler_sampler(config) == (name, options)
        scheduler = cls.from_pretrained(tmp_path / folder, **extra)
        scheduler.set_timesteps(10)
        assert compare_plan(name, scheduler, samplers.SAMPLERS[name].plan(settings, 10, **options))[0] <= TOL


def test_scheduler_sampler():
    choose = samplers.scheduler_sampler
    multistep = dict(SD_CONFIG, _class_name="DPMSolverMultistepScheduler")
    assert choose(multistep) == ("dpmpp_2m", {})
    assert choose(dict(multistep, solver_order=3, use_karras_sigmas=True)) == ("dpmpp_3m", {"use_karras_sigmas": True})
    assert choose(dict(multistep, algorithm_type="sde-dpmsolver++"))[0] == "dpmpp_2m_sde"
    assert choose(dict(multistep, algorithm_type="sde-dpmsolver++", solver_order=3))[0] == "dpmpp_3m_sde"
    assert choose(dict(SD_CONFIG, _class_name="DPMSolverSinglestepScheduler", solver_order=3)) == (
        "dpmpp_2s", {"solver_order": 3})
    assert choose(dict(SD_CONFIG, _class_name="DEISMultistepScheduler"))[0] == "deis"
    assert choose(dict(SD_CONFIG, _class_name="PNDMScheduler")) == ("pndm", {})
    assert choose(dict(SD_CONFIG, _class_name="EulerDiscreteScheduler", use_karras_sigmas=True)) == (
        "euler", {"use_karras_sigmas": True})
    assert choose(dict(SD_CONFIG, _class_name="NoSuchScheduler")) is None
    assert choose(SD_CONFIG) is None


def test_fixed_keys_warn(caplog):
    config = dict(SD_CONFIG, _class_name="DPMSolverMultistepScheduler", algorithm_type="dpmsolver")
    assert samplers.scheduler_sampler(config)[0] == "dpmpp_2m"
    assert "algorithm_type='dpmsolver'" in caplog.text


def test_errors():
    settings = schedules.scheduler_settings(SD_CONFIG)
    plan = samplers.SAMPLERS
    with pytest.raises(ValueError, match="solver_type"):
        plan["dpmpp_2m"].plan(settings, 4, solver_type="rk4")
    with pytest.raises(ValueError, match="final_sigmas_type"):
        plan["dpmpp_3m_sde"].plan(settings, 4, final_sigmas_type="max")
    with pytest.raises(ValueError, match="solver_order"):
        plan["dpmpp_2s"].plan(settings, 4, solver_order=4)
    with pytest.raises(ValueError, match="only one of"):
        plan["deis"].plan(settings, 4, use_karras_sigmas=True, use_exponential_sigmas=True)
    with pytest.raises(ValueError, match="rescale_betas_zero_snr"):
        plan["deis"].plan(schedules.scheduler_settings(ZERO_SNR), 4)
    with pytest.raises(ValueError, match="num_steps"):
        plan["dpmpp_2s"].plan(settings, 0)
    with pytest.raises(ValueError, match="does not take"):
        samplers.configure("dpmpp_2m", SD_CONFIG, solver_order=3)

"""DPM2, DPM2 a and DPM++ SDE trajectories against diffusers' schedulers (same fake model and noise), and the
Brownian statistics of DPM++ SDE's own draws."""
import contextlib
import importlib
import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DPMSolverSDEScheduler, KDPM2AncestralDiscreteScheduler, KDPM2DiscreteScheduler, PNDMScheduler

from sampler_reference import SD_CONFIG, assert_noise_levels, img2img_start, run_diffusers, run_ours, test_inputs
from sdjax.diffusion import samplers, schedules
from sdjax.diffusion.plan import slice_plan
from sdjax.diffusion.samplers import SAMPLERS

torch.set_num_threads(1)
# diffusers' KDPM2 classes call numpy on torch tensors ~1000 times per scheduler (a DeprecationWarning each);
# torchsde warns when queried a rounding outside its interval
pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:Should have:UserWarning")]
# max abs difference (|x| reaches ~40 here). DPM++ SDE's is up to ~5e-5: diffusers' float32 sigma_up loses ~1e-5
# (relative) to cancellation where sigma_mid / sigma ~ 1 (beta sigmas' first steps); ours is float64 on the host.
TOL = 1e-4
SDE_MODULE = "diffusers.schedulers.scheduling_dpmsolver_sde"
# name -> (diffusers scheduler class, module whose randn_tensor the step calls, or None)
REFERENCES = {
    "dpm2": (KDPM2DiscreteScheduler, None),
    "dpm2_a": (KDPM2AncestralDiscreteScheduler, "diffusers.schedulers.scheduling_k_dpm_2_ancestral_discrete"),
    "dpmpp_sde": (DPMSolverSDEScheduler, None),
}
RAMPS = ["use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"]


@contextlib.contextmanager
def recorded_brownian(calls):
    """Within the block, DPMSolverSDEScheduler's Brownian noise sampler (torchsde) appends each unit noise it
    returns to `calls`, with the sigmas it was queried at."""
    module = importlib.import_module(SDE_MODULE)
    original = module.BrownianTreeNoiseSampler

    class Recording(original):
        def __call__(self, sigma, sigma_next):
            w = super().__call__(sigma, sigma_next)
            calls.append((float(sigma), float(sigma_next), w.numpy().copy()))
            return w

    module.BrownianTreeNoiseSampler = Recording
    try:
        yield
    finally:
        module.BrownianTreeNoiseSampler = original


def reference_run(name, scheduler, x, noises, start=0):
    """(diffusers' trajectory [S,...], the unit noise [S,...] each iteration added): dpm2_a gets `noises`
    injected; dpmpp_sde's are its own torchsde draws, recorded (0 where a step draws none)."""
    if name != "dpmpp_sde":
        return run_diffusers(scheduler, x, noises, REFERENCES[name][1], start=start), noises
    calls = []
    with recorded_brownian(calls):
        ref = run_diffusers(scheduler, x, start=start)
    draws = np.zeros((len(ref),) + x.shape, np.float32)
    assert len(calls) == len(ref) - 1  # every iteration but the last step's (an Euler step to sigma 0)
    for i, (_, _, w) in enumerate(calls):
        draws[i] = w
    return ref, draws


def reference_scheduler(name, config, num_steps, **options):
    """diffusers' scheduler, built as pipelines do (from_config), set_timesteps called; DPM++ SDE's tree seeded."""
    seed = {"noise_sampler_seed": 7} if name == "dpmpp_sde" else {}
    scheduler = REFERENCES[name][0].from_config(config, **options, **seed)
    scheduler.set_timesteps(num_steps)
    return scheduler


def compare(name, config, num_steps, seed=0, **options):
    """Max abs difference of the text-to-image trajectory, after checking timesteps, init_noise_sigma, order."""
    scheduler = reference_scheduler(name, config, num_steps, **options)
    settings = schedules.scheduler_settings(config, samplers.CLASS_DEFAULTS[name])  # keys left out: the class's
    plan = SAMPLERS[name].plan(settings, num_steps, **options)
    # midpoint timesteps come from log-sigma interpolation, sensitive to the last bits of the sigmas
    np.testing.assert_allclose(plan.timesteps, scheduler.timesteps.numpy(), rtol=0, atol=1e-3)
    np.testing.assert_allclose(plan.init_noise_sigma, float(scheduler.init_noise_sigma), rtol=2e-6)
    assert plan.order == scheduler.order == 2
    x, noises = test_inputs(seed, len(plan.timesteps))
    x = x * plan.init_noise_sigma
    ref, noises = reference_run(name, scheduler, x, noises)
    ours = run_ours(SAMPLERS[name], plan, x, noises)
    assert ours.shape == ref.shape
    return float(np.abs(ours - ref).max())


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("num_steps", [1, 2, 4, 10, 25])
@pytest.mark.parametrize("name", list(REFERENCES))
def test_sd_config(name, num_steps, prediction_type):
    assert compare(name, dict(SD_CONFIG, prediction_type=prediction_type), num_steps) <= TOL


@pytest.mark.parametrize("spacing", ["linspace", "trailing"])
@pytest.mark.parametrize("name", list(REFERENCES))
def test_spacings(name, spacing):
    config = dict(SD_CONFIG, timestep_spacing=spacing, prediction_type="v_prediction")
    assert compare(name, config, 7) <= TOL


@pytest.mark.parametrize("num_steps", [4, 25])
@pytest.mark.parametrize("ramp", RAMPS)
@pytest.mark.parametrize("name", list(REFERENCES))
def test_sigma_ramps(name, ramp, num_steps):
    config = dict(SD_CONFIG, timestep_spacing="trailing" if num_steps == 4 else "leading")
    assert compare(name, config, num_steps, **{ramp: True}) <= TOL
    plain = SAMPLERS[name].plan(schedules.scheduler_settings(config), num_steps)
    ramped = SAMPLERS[name].plan(schedules.scheduler_settings(config), num_steps, **{ramp: True})
    assert np.abs(plain.steps["sigma"] - ramped.steps["sigma"]).max() > 0.1  # the option changes the schedule


@pytest.mark.parametrize("name", list(REFERENCES))
def test_class_defaults_and_cosine(name):
    # the classes' own defaults: linear betas 0.00085 .. 0.012, linspace spacing
    assert compare(name, dict(num_train_timesteps=1000), 6) <= TOL
    assert compare(name, dict(SD_CONFIG, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction"), 5) <= TOL


@pytest.mark.parametrize("name", list(REFERENCES))
def test_noise_levels_match_add_noise(name):
    scheduler = reference_scheduler(name, SD_CONFIG, 10)
    plan = SAMPLERS[name].plan(schedules.scheduler_settings(SD_CONFIG), 10)
    assert len(plan.timesteps) == 19  # two stages a step, one Euler step last
    assert_noise_levels(scheduler, plan)


@pytest.mark.parametrize("strength", [0.3, 0.75])
@pytest.mark.parametrize("name", list(REFERENCES))
def test_img2img_slice(name, strength):
    """As diffusers' img2img: timesteps[t_start * order:], set_begin_index, start from add_noise at the first one."""
    num_steps = 10
    scheduler = reference_scheduler(name, SD_CONFIG, num_steps)
    start = (num_steps - int(num_steps * strength)) * scheduler.order
    plan = slice_plan(SAMPLERS[name].plan(schedules.scheduler_settings(SD_CONFIG), num_steps), start)
    np.testing.assert_allclose(plan.timesteps, scheduler.timesteps[start:].numpy(), rtol=0, atol=1e-3)
    x, noises = img2img_start(scheduler, plan, start)
    ref, noises = reference_run(name, scheduler, x, noises, start=start)
    assert np.abs(run_ours(SAMPLERS[name], plan, x, noises) - ref).max() <= TOL


@pytest.mark.parametrize("name", list(REFERENCES))
def test_user_folders(name, tmp_path):
    """A folder's scheduler_config.json with only some keys, loaded as diffusers loads it: natively
    (Class.from_pretrained) and as SD 1.5's PNDM config swapped to the class (Class.from_config(pndm.config))."""
    cls = REFERENCES[name][0]
    some = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", prediction_type="v_prediction",
                use_karras_sigmas=True)
    native, sd15 = tmp_path / "native", tmp_path / "sd15"
    cls.from_config(some).save_config(native)
    written = json.loads((native / "scheduler_config.json").read_text())
    (native / "scheduler_config.json").write_text(json.dumps({k: written[k] for k in ["_class_name", *some]}))
    PNDMScheduler.from_config(SD_CONFIG).save_config(sd15)
    seed = {"noise_sampler_seed": 7} if name == "dpmpp_sde" else {}
    swapped = cls.from_config(PNDMScheduler.from_pretrained(sd15).config, **seed)  # pipe.scheduler = ...
    for folder, ref, expected_options in [(native, cls.from_pretrained(native, **seed), {"use_karras_sigmas": True}),
                                          (sd15, swapped, {})]:
        settings, options = samplers.configure(name, json.loads((folder / "scheduler_config.json").read_text()))
        assert options == expected_options
        plan = SAMPLERS[name].plan(settings, 6, **options)
        ref.set_timesteps(6)
        np.testing.assert_allclose(plan.timesteps, ref.timesteps.numpy(), rtol=0, atol=1e-3)
        x, noises = test_inputs(3, len(plan.timesteps))
        x = x * plan.init_noise_sigma
        expected, noises = reference_run(name, ref, x, noises)
        assert np.abs(run_ours(SAMPLERS[name], plan, x, noises) - expected).max() <= TOL


# ---- DPM++ SDE's Brownian noise ----

def brownian_correlations(plan):
    """[S, S] correlation of the unit noises of a plan's iterations under one Brownian path: 1 on the diagonal,
    sqrt((sigma - s_mid) / (sigma - sigma')) between a step's two stages, 0 across steps."""
    n = len(plan.timesteps)
    corr = np.eye(n)
    for i in range(1, n - 1, 2):
        # stage 1 over [s_mid, sigma], stage 2 over [sigma', sigma]: Cov = (sigma - s_mid)
        sigma, s_mid, nxt = plan.noise_b[i - 1], plan.steps["sigma"][i], plan.noise_b[i]
        corr[i, i - 1] = corr[i - 1, i] = np.sqrt((sigma - s_mid) / (sigma - nxt))
    return corr


def test_torchsde_draws_are_brownian_increments():
    """diffusers' draws (torchsde) have the correlations our `noise` reproduces, queried over those sigmas."""
    config, num_steps = dict(SD_CONFIG, use_karras_sigmas=True), 4
    scheduler = reference_scheduler("dpmpp_sde", config, num_steps)
    plan = SAMPLERS["dpmpp_sde"].plan(schedules.scheduler_settings(config), num_steps, use_karras_sigmas=True)
    calls = []
    with recorded_brownian(calls):
        run_diffusers(scheduler, np.zeros((4096, 4), np.float32))
    queried = np.array([(a, b) for a, b, _ in calls])
    mid, nxt = plan.steps["sigma"][1::2], plan.noise_b[2::2]
    np.testing.assert_allclose(queried[0::2], np.stack([plan.noise_b[0:-1:2], mid], 1), rtol=1e-5)
    np.testing.assert_allclose(queried[1::2], np.stack([plan.noise_b[0:-1:2], nxt], 1), rtol=1e-5)
    draws = np.stack([w.ravel() for _, _, w in calls])
    expected = brownian_correlations(plan)[:-1, :-1]  # the last step draws nothing
    assert np.abs(np.corrcoef(draws) - expected).max() < 0.04  # 16384 samples: standard error ~0.008
    assert expected[1, 0] > 0.5


def test_sde_noise_is_one_brownian_path_per_image():
    plan = SAMPLERS["dpmpp_sde"].plan(schedules.scheduler_settings(SD_CONFIG), 5)
    noise_fn = SAMPLERS["dpmpp_sde"].noise
    keys = jax.random.split(jax.random.PRNGKey(0), 4096)
    steps = jax.tree.map(jnp.asarray, plan.steps)

    @jax.jit
    def draws(keys):  # [S, B, 2, 2]
        return jax.lax.map(lambda step: noise_fn(keys, step, (2, 2)), steps)

    z = np.asarray(draws(keys))
    flat = z.reshape(len(z), -1)
    assert np.abs(flat.mean(1)).max() < 0.04 and np.abs(flat.std(1) - 1).max() < 0.04
    expected = brownian_correlations(plan)
    assert np.abs(np.corrcoef(flat) - expected).max() < 0.04  # 16384 samples: standard error ~0.008
    assert expected[1, 0] > 0.5 and expected[3, 2] > 0.5
    # an image's draws depend on its key only, not on the batch it is drawn in
    np.testing.assert_array_equal(np.asarray(draws(keys[5:6]))[:, 0], z[:, 5])
    np.testing.assert_array_equal(np.asarray(draws(keys[3:9]))[:, 2], z[:, 5])
    # img2img: a sliced plan draws the same noise at the same iterations
    sliced = jax.tree.map(jnp.asarray, slice_plan(plan, 4).steps)
    again = np.asarray(jax.lax.map(lambda step: noise_fn(keys[:8], step, (2, 2)), sliced))
    np.testing.assert_array_equal(again, z[4:, :8])


def test_errors():
    settings = schedules.scheduler_settings(SD_CONFIG)
    for name in REFERENCES:
        with pytest.raises(ValueError, match="only one of"):
            SAMPLERS[name].plan(settings, 4, use_karras_sigmas=True, use_beta_sigmas=True)
        with pytest.raises(ValueError, match="prediction_type"):
            SAMPLERS[name].plan(schedules.scheduler_settings(dict(SD_CONFIG, prediction_type="sample")), 4)
        with pytest.raises(ValueError, match="rescale_betas_zero_snr"):
            SAMPLERS[name].plan(schedules.scheduler_settings(dict(SD_CONFIG, rescale_betas_zero_snr=True)), 4)
        with pytest.raises(ValueError, match="num_steps"):
            SAMPLERS[name].plan(settings, 0)


def test_noise_sampler_seed_is_named(caplog):
    """A config's fixed torchsde seed cannot be reproduced (our Brownian paths come from the images' keys): one warning."""
    config = {"_class_name": "DPMSolverSDEScheduler", "noise_sampler_seed": 1234, "use_beta_sigmas": True}
    with caplog.at_level(logging.WARNING, logger="sdjax"):
        _, options = samplers.configure("dpmpp_sde", config)
        samplers.configure("dpmpp_sde", config)
    assert options == {"use_beta_sigmas": True}
    assert sum("noise_sampler_seed=1234" in r.message for r in caplog.records) == 1

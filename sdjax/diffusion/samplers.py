"""Samplers as pure functions (DDIM, DDPM, PNDM/PLMS here; sigma-based ones in k_samplers.py) and their registry.

How a sampler is driven (the pipeline's loop, one model call per scan iteration, as diffusers loops
over `scheduler.timesteps`):

    plan = sampler.plan(settings, num_steps, **options)       # host, numpy; settings from schedules.scheduler_settings
    plan = slice_plan(plan, start)                             # img2img only
    step_fn = bind(sampler, plan)                              # = partial(sampler.step, **plan.options)
    state = sampler.init(x, plan.steps)                        # x: init_noise_sigma * eps, or noise_a*x0 + noise_b*eps
    for i (lax.scan over plan.steps and plan.timesteps):
        x_in = sampler.model_input(state, step)                # step = {name: plan.steps[name][i]}
        state = step_fn(state, model(x_in, plan.timesteps[i]), step, noise_i)
    result = state["x"]

Conventions every sampler follows:
- `plan.steps` holds only numeric arrays with leading axis [S]; it always has "index" (int32, the iteration's
  position in the UNSLICED plan, so slicing keeps it). Per-iteration coefficients go there.
- Static choices (prediction_type, clip_sample, ...) are plain Python values in `plan.options` and reach
  `step` ONLY as keyword arguments (use `bind`). `init` and `model_input` take no options.
- Anything that counts iterations relative to where sampling started (multistep history, PNDM's
  warm-up) lives in the state pytree, so `slice_plan` is a plain slice of the arrays, which reproduces
  diffusers' img2img (`timesteps[t_start * order:]` with a freshly set scheduler).
- `noise` passed to `step` is unit normal noise shaped like x; deterministic samplers ignore it.
- x, the model output and the noise are float32 (cast a low-precision U-Net's output before `step`), so the
  scan carry keeps its dtype.
"""
import dataclasses
import functools
import inspect
import logging
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sdjax.diffusion import schedules

log = logging.getLogger("sdjax")


class Sampler(NamedTuple):
    """A sampler as pure functions. `plan` runs on the host (numpy); the others inside jit + lax.scan."""
    plan: Callable         # (settings, num_steps, **options) -> Plan
    init: Callable         # (x: [B,h,w,c], steps: dict of [S,...] arrays) -> state pytree with state["x"]
    model_input: Callable  # (state, step) -> x_in [B,h,w,c]
    step: Callable         # (state, model_output [B,h,w,c], step, noise [B,h,w,c], **plan.options) -> state


@dataclasses.dataclass(frozen=True)
class Plan:
    """Host-side schedule of one sampling run: S scan iterations, one model call each."""
    timesteps: np.ndarray     # [S] float32: the U-Net's timestep at iteration i
    steps: dict               # {name: [S, ...] array}: per-iteration coefficients, always with "index" [S] int32
    noise_a: np.ndarray       # [S] float32: x at iteration i's noise level = noise_a[i] * x0 + noise_b[i] * eps
    noise_b: np.ndarray       # [S] float32
    init_noise_sigma: float   # text-to-image starts from init_noise_sigma * unit noise
    order: int                # scan iterations per user step (diffusers' scheduler.order)
    options: dict = dataclasses.field(default_factory=dict)  # static Python values passed to `step` as kwargs


def slice_plan(plan, start):
    """Plan whose iterations begin at `start` (img2img: start = (num_steps - int(num_steps*strength)) * order)."""
    n = len(plan.timesteps)
    if not 0 <= start < n:
        raise ValueError(f"start must be in [0, {n}), got {start}")
    return dataclasses.replace(
        plan, timesteps=plan.timesteps[start:], steps={k: v[start:] for k, v in plan.steps.items()},
        noise_a=plan.noise_a[start:], noise_b=plan.noise_b[start:])


def bind(sampler, plan):
    """The sampler's `step` with the plan's static options applied: (state, model_output, step, noise) -> state."""
    return functools.partial(sampler.step, **plan.options)


# ---- shared host-side pieces of the timestep-based (DDPM-family) samplers ----

def _timestep_plan(acp, timesteps, steps, **options):
    """Plan for samplers that feed the U-Net discrete timesteps and start from unit noise (x = sqrt(abar) x0 + ...)."""
    abar = acp[timesteps]
    steps = {"index": np.arange(len(timesteps), dtype=np.int32), **steps}
    return Plan(timesteps=timesteps.astype(np.float32), steps=steps, noise_a=abar ** 0.5,
                noise_b=(1 - abar) ** 0.5, init_noise_sigma=1.0, order=1, options=options)


def _abar_at(acp, t, below_zero):
    """[len(t)] float32 alphas_cumprod at timesteps t, with `below_zero` where t < 0 (diffusers' final alpha)."""
    return np.where(t >= 0, acp[np.clip(t, 0, len(acp) - 1)], below_zero).astype(np.float32)


def _clip_options(settings):
    return dict(prediction_type=settings["prediction_type"], clip_sample=bool(settings["clip_sample"]),
                clip_sample_range=float(settings["clip_sample_range"]))


def _predict(out, x, abar_t, prediction_type, clip_sample, clip_sample_range):
    """Model output at x with alphas_cumprod abar_t -> (x0, eps), x0 clipped if the config asks."""
    alpha, sigma = abar_t ** 0.5, (1 - abar_t) ** 0.5
    x0 = schedules.to_x0(out, x, alpha, sigma, prediction_type)
    eps = schedules.to_eps(out, x, alpha, sigma, prediction_type)
    if clip_sample:
        x0 = jnp.clip(x0, -clip_sample_range, clip_sample_range)
    return x0, eps


def _x_only(x, steps):
    return {"x": x}


def _x_in(state, step):
    return state["x"]


# ---- DDIM (Song et al. 2021), as diffusers' DDIMScheduler ----

def ddim_plan(settings, num_steps, eta=0.0):
    """DDIM: x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - std^2) eps + std noise, std = eta * posterior std."""
    ts = schedules.spaced_timesteps(settings, num_steps)
    acp = schedules.alphas_cumprod(settings)
    final = np.float32(1.0) if settings["set_alpha_to_one"] else acp[0]
    prev = ts - settings["num_train_timesteps"] // num_steps
    steps = {"abar_t": acp[ts], "abar_prev": _abar_at(acp, prev, final)}
    return _timestep_plan(acp, ts, steps, eta=float(eta), **_clip_options(settings))


def ddim_step(state, out, step, noise, *, eta, **predict_options):
    """One DDIM update from the model output at state["x"]."""
    x, abar_t, abar_prev = state["x"], step["abar_t"], step["abar_prev"]
    x0, eps = _predict(out, x, abar_t, **predict_options)
    variance = (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)
    std = eta * variance ** 0.5
    x = abar_prev ** 0.5 * x0 + (1 - abar_prev - std ** 2) ** 0.5 * eps
    if eta > 0:
        x = x + std * noise
    return {"x": x}


# ---- DDPM ancestral sampling (Ho et al. 2020), as diffusers' DDPMScheduler with variance_type="fixed_small" ----

def ddpm_plan(settings, num_steps):
    """DDPM: sample the posterior q(x_prev | x_t, x0) at the predicted x0; no noise at t = 0."""
    ts = schedules.spaced_timesteps(settings, num_steps)
    acp = schedules.alphas_cumprod(settings)
    abar_t, abar_prev = acp[ts], _abar_at(acp, np.append(ts[1:], -1), np.float32(1.0))
    variance = np.maximum((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev), np.float32(1e-20))
    std = np.where(ts > 0, variance ** 0.5, 0).astype(np.float32)
    steps = {"abar_t": abar_t, "abar_prev": abar_prev, "std": std}
    return _timestep_plan(acp, ts, steps, **_clip_options(settings))


def ddpm_step(state, out, step, noise, **predict_options):
    """One ancestral DDPM update: posterior mean at the predicted x0 plus std * noise."""
    x, abar_t, abar_prev = state["x"], step["abar_t"], step["abar_prev"]
    x0, _ = _predict(out, x, abar_t, **predict_options)
    alpha_t = abar_t / abar_prev
    x0_coeff = abar_prev ** 0.5 * (1 - alpha_t) / (1 - abar_t)
    x_coeff = alpha_t ** 0.5 * (1 - abar_prev) / (1 - abar_t)
    return {"x": x0_coeff * x0 + x_coeff * x + step["std"] * noise}


# ---- PNDM's pseudo linear multistep (Liu et al. 2022), as diffusers' PNDMScheduler(skip_prk_steps=True) ----

def pndm_plan(settings, num_steps):
    """PLMS: Adams-Bashforth on eps with the PNDM transfer; num_steps + 1 iterations (the 2nd step is re-run)."""
    if settings["prediction_type"] not in ("epsilon", "v_prediction"):
        raise ValueError(f"pndm supports prediction_type epsilon or v_prediction, got {settings['prediction_type']!r}")
    user = schedules.spaced_timesteps(settings, num_steps)[::-1]  # ascending
    ts = np.concatenate([user[:-1], user[-2:-1], user[-1:]])[::-1]
    acp = schedules.alphas_cumprod(settings)
    final = np.float32(1.0) if settings["set_alpha_to_one"] else acp[0]
    ratio = settings["num_train_timesteps"] // num_steps
    # Usual iteration: t -> t - ratio. Second iteration after a (re)start: redo t + ratio -> t from the saved sample.
    steps = {"abar_t": acp[ts], "abar_prev": _abar_at(acp, ts - ratio, final),
             "redo_abar_t": _abar_at(acp, ts + ratio, final), "redo_abar_prev": acp[ts]}
    return _timestep_plan(acp, ts, steps, prediction_type=settings["prediction_type"])


def pndm_init(x, steps):
    """PLMS state: x, the sample saved at the first iteration, the last 4 model outputs (newest last) and counters."""
    return {"x": x, "saved": jnp.zeros_like(x), "outs": jnp.zeros((4,) + x.shape, x.dtype),
            "num_outs": jnp.int32(0), "counter": jnp.int32(0)}


def _plms_combine(out, e):
    """Latest output and history e (newest last) -> the 5 estimates: Euler, the redo average, Adams-Bashforth 2-4."""
    return [lambda: out, lambda: (out + e[3]) / 2, lambda: (3 * e[3] - e[2]) / 2,
            lambda: (23 * e[3] - 16 * e[2] + 5 * e[1]) / 12,
            lambda: (1 / 24) * (55 * e[3] - 59 * e[2] + 37 * e[1] - 9 * e[0])]


def _pndm_transfer(x, eps, abar_t, abar_prev):
    """PNDM's transfer from t to prev given eps (eq. 11 of the paper, in diffusers' arrangement)."""
    denom = abar_t * (1 - abar_prev) ** 0.5 + (abar_t * (1 - abar_t) * abar_prev) ** 0.5
    return (abar_prev / abar_t) ** 0.5 * x - (abar_prev - abar_t) * eps / denom


def pndm_step(state, out, step, noise, *, prediction_type):
    """One PLMS iteration; the second iteration after the start redoes the first step with averaged outputs."""
    counter, redo = state["counter"], state["counter"] == 1
    # The redo iteration's output is not kept in the history; every other one is appended.
    outs = jnp.where(redo, state["outs"], jnp.concatenate([state["outs"][1:], out[None]]))
    num_outs = jnp.where(redo, state["num_outs"], jnp.minimum(state["num_outs"] + 1, 4))
    which = jnp.where(redo, 1, jnp.where(num_outs == 1, 0, num_outs))
    combined = jax.lax.switch(which, _plms_combine(out, outs))
    x = jnp.where(redo, state["saved"], state["x"])
    abar_t = jnp.where(redo, step["redo_abar_t"], step["abar_t"])
    abar_prev = jnp.where(redo, step["redo_abar_prev"], step["abar_prev"])
    combined = schedules.to_eps(combined, x, abar_t ** 0.5, (1 - abar_t) ** 0.5, prediction_type)
    return {"x": _pndm_transfer(x, combined, abar_t, abar_prev),
            "saved": jnp.where(counter == 0, state["x"], state["saved"]),
            "outs": outs, "num_outs": num_outs, "counter": counter + 1}


# The diffusers scheduler class each sampler reproduces.
SCHEDULER_CLASSES = {
    "ddim": "DDIMScheduler", "ddpm": "DDPMScheduler", "pndm": "PNDMScheduler", "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler", "heun": "HeunDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
}
# diffusers' defaults of each scheduler class where they differ from schedules.DEFAULTS: they apply to
# keys a model's scheduler_config.json leaves out (SD 1.5's has no timestep_spacing, for one).
CLASS_DEFAULTS = {
    "ddim": {"clip_sample": True}, "ddpm": {"clip_sample": True},
    "pndm": {"set_alpha_to_one": False, "skip_prk_steps": False},
    "euler": {"timestep_spacing": "linspace"}, "euler_a": {"timestep_spacing": "linspace"},
    "heun": {"timestep_spacing": "linspace", "beta_start": 0.00085, "beta_end": 0.012},
    "dpmpp_2m": {"timestep_spacing": "linspace"},
}
# Keys of each class that change its result and that the sampler implements at one value only (its
# class default unless noted). Keys a sampler's plan takes as options (use_karras_sigmas, ...) are honoured.
FIXED_KEYS = {
    "ddim": {"thresholding": False},
    "ddpm": {"thresholding": False, "variance_type": "fixed_small"},
    "pndm": {"skip_prk_steps": True},  # PLMS only (False, the class default, begins with Runge-Kutta steps)
    "euler": {"interpolation_type": "linear", "use_exponential_sigmas": False, "use_beta_sigmas": False,
              "sigma_min": None, "sigma_max": None, "timestep_type": "discrete", "final_sigmas_type": "zero"},
    "euler_a": {},
    "heun": {"use_exponential_sigmas": False, "use_beta_sigmas": False},
    "dpmpp_2m": {"solver_order": 2, "algorithm_type": "dpmsolver++", "solver_type": "midpoint",
                 "thresholding": False, "lower_order_final": True, "euler_at_final": False,
                 "use_exponential_sigmas": False, "use_beta_sigmas": False, "use_lu_lambdas": False,
                 "use_flow_sigmas": False, "variance_type": None, "use_dynamic_shifting": False},
}
# What diffusers' StableDiffusionPipeline sets on its own scheduler when the config is outdated.
_PIPELINE_FIXES = {"steps_offset": 1, "clip_sample": False}


@functools.lru_cache(maxsize=None)
def _warn_once(message):
    log.warning(message)


def configure(name, config, **options):
    """(settings, plan options) of sampler `name` for a model's scheduler_config.json, as diffusers runs
    `StableDiffusionPipeline.from_pretrained(folder)` with `pipe.scheduler = Class.from_config(pipe.scheduler.config)`.

    Keys the config leaves out take the class defaults; outdated steps_offset / clip_sample are updated as the
    pipeline does (on its own scheduler class also where the key is left out); config keys that are plan
    options are honoured unless given in `options`; other keys at a value the sampler does not implement
    give one warning each. Raises ValueError for options the sampler does not take.
    """
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; valid: {', '.join(sorted(SAMPLERS))}")
    plan_keys = set(inspect.signature(SAMPLERS[name].plan).parameters) - {"settings", "num_steps"}
    unknown = sorted(set(options) - plan_keys)
    if unknown:
        raise ValueError(f"sampler {name!r} does not take options {unknown}; it takes {sorted(plan_keys) or 'none'}")
    native = config.get("_class_name") == SCHEDULER_CLASSES[name]
    config = {**config, **{k: v for k, v in _PIPELINE_FIXES.items() if k in config and config[k] != v}}
    settings = schedules.scheduler_settings(config, {**CLASS_DEFAULTS[name], **(_PIPELINE_FIXES if native else {})})
    effective = {**CLASS_DEFAULTS[name], **config}
    for key, value in FIXED_KEYS[name].items():
        if effective.get(key, value) != value:
            _warn_once(f"scheduler config {key}={effective[key]!r}{'' if key in config else ' (left out)'} is not "
                       f"implemented by sampler {name!r}, which runs {key}={value!r}: results differ from "
                       f"diffusers' {SCHEDULER_CLASSES[name]}")
    from_config = {k: config[k] for k in plan_keys if config.get(k) is not None}
    return settings, {**from_config, **options}


SAMPLERS = {
    "ddim": Sampler(ddim_plan, _x_only, _x_in, ddim_step),
    "ddpm": Sampler(ddpm_plan, _x_only, _x_in, ddpm_step),
    "pndm": Sampler(pndm_plan, pndm_init, _x_in, pndm_step),
}

# The sigma-based samplers add themselves to SAMPLERS on import (works whichever module is imported first).
from sdjax.diffusion import k_samplers  # noqa: E402,F401

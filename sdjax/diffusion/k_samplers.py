"""Sigma-based samplers (k-diffusion style): Euler, Euler ancestral, Heun.

Plans reproduce diffusers' EulerDiscrete, EulerAncestralDiscrete and HeunDiscrete schedulers iteration for
iteration. They keep x in the variance-exploding scale x = x0 + sigma * eps (the U-Net sees
x / sqrt(sigma^2 + 1)). Each iteration turns the model output into x0 = c_skip * x + c_out * output with
coefficients the plan computes from the prediction type, so `step` needs no options (Heun's clip_sample aside).
The DPM-Solver family (dpm_solver.py) shares train_sigmas, x0_coefficients and _plan.
"""
import jax.numpy as jnp
import numpy as np

from sdjax.diffusion import schedules
from sdjax.diffusion.plan import Plan, Sampler, x_only

FINAL_SIGMAS_TYPES = ("zero", "sigma_min")


# ---- schedules (host, numpy) ----

def train_sigmas(settings):
    """[T] float32 training noise levels, ascending in t; zero-SNR ends at abar = 2^-24 (finite) as in diffusers."""
    acp = schedules.alphas_cumprod(settings)
    if settings["rescale_betas_zero_snr"]:
        acp[-1] = 2.0 ** -24
    return schedules.sigmas_from_alphas(acp)


def k_sigmas(settings, num_steps, ramp=None, final_sigmas_type="zero", sigma_min=None, sigma_max=None):
    """Euler/Heun schedule: sigmas [N+1] float32 (descending, last 0 or sigma_min) and timesteps [N] float32.

    ramp: a schedules.SIGMA_RAMPS name or None; it runs from sigma_max down to sigma_min, by default the spaced
    schedule's own end points, and its timesteps are the fractional ones of its sigmas."""
    if final_sigmas_type not in FINAL_SIGMAS_TYPES:
        raise ValueError(f"final_sigmas_type must be one of {FINAL_SIGMAS_TYPES}, got {final_sigmas_type!r}")
    train = train_sigmas(settings)
    ts = schedules.spaced_timesteps(settings, num_steps).astype(np.float32)
    if settings["timestep_spacing"] == "linspace":  # these schedulers do not round linspace timesteps
        ts = np.linspace(0, settings["num_train_timesteps"] - 1, num_steps, dtype=np.float32)[::-1].copy()
    sigmas = np.interp(ts, np.arange(len(train)), train)
    if ramp is not None:
        lo = sigmas[-1] if sigma_min is None else sigma_min
        hi = sigmas[0] if sigma_max is None else sigma_max
        sigmas = schedules.SIGMA_RAMPS[ramp](lo, hi, num_steps)
        ts = schedules.sigma_to_t(sigmas, train).astype(np.float32)
    last = train[0] if final_sigmas_type == "sigma_min" else 0.0
    return np.append(sigmas, last).astype(np.float32), ts


def k_init_noise_sigma(settings, sigmas):
    """diffusers' init_noise_sigma of the Euler family: max sigma, or sqrt(max^2 + 1) with 'leading' spacing."""
    m = sigmas.max()
    return float(m if settings["timestep_spacing"] in ("linspace", "trailing") else np.sqrt(m * m + 1))


def x0_coefficients(sigma, prediction_type):
    """(c_skip, c_out) [N] float64 with x0 = c_skip * x + c_out * output, for x = x0 + sigma * eps."""
    s = np.asarray(sigma, np.float64)
    if prediction_type == "epsilon":
        return np.ones_like(s), -s
    if prediction_type == "v_prediction":
        return 1 / (s * s + 1), -s / np.sqrt(s * s + 1)
    return np.zeros_like(s), np.ones_like(s)


def _plan(timesteps, noise_b, init_noise_sigma, order=1, noise_a=None, options=None, **steps):
    """Plan with float32 per-iteration arrays (bools and integers kept) plus "index"."""
    steps = {k: v if v.dtype.kind in "bi" else v.astype(np.float32) for k, v in steps.items()}
    steps["index"] = np.arange(len(timesteps), dtype=np.int32)
    noise_a = np.ones_like(noise_b) if noise_a is None else noise_a
    return Plan(timesteps=timesteps.astype(np.float32), steps=steps, noise_a=noise_a.astype(np.float32),
                noise_b=noise_b.astype(np.float32), init_noise_sigma=init_noise_sigma, order=order,
                options=options or {})


def _euler_scalings(sigma, prediction_type):
    """Per-iteration c_in (model input scale 1/sqrt(sigma^2+1)), c_skip, c_out, sigma as a dict of [S] arrays."""
    c_skip, c_out = x0_coefficients(sigma, prediction_type)
    c_in = 1 / np.sqrt(sigma.astype(np.float64) ** 2 + 1)
    return dict(c_in=c_in, c_skip=c_skip, c_out=c_out, sigma=sigma)


# ---- plans ----

def euler_plan(settings, num_steps, use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
               final_sigmas_type="zero", sigma_min=None, sigma_max=None):
    """EulerDiscreteScheduler (s_churn = 0): N iterations."""
    ramp = schedules.sigma_ramp(use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas)
    sigmas, ts = k_sigmas(settings, num_steps, ramp, final_sigmas_type, sigma_min, sigma_max)
    s, s_next = sigmas[:-1], sigmas[1:]
    return _plan(ts, s, k_init_noise_sigma(settings, sigmas), dt=s_next - s,
                 **_euler_scalings(s, settings["prediction_type"]))


def euler_a_plan(settings, num_steps):
    """EulerAncestralDiscreteScheduler: N iterations; step to sigma_down, then add sigma_up noise."""
    sigmas, ts = k_sigmas(settings, num_steps)
    s, s_next = sigmas[:-1].astype(np.float64), sigmas[1:].astype(np.float64)
    sigma_up = np.sqrt(s_next ** 2 * (s ** 2 - s_next ** 2) / s ** 2)
    sigma_down = np.sqrt(s_next ** 2 - sigma_up ** 2)
    return _plan(ts, sigmas[:-1], k_init_noise_sigma(settings, sigmas), dt=sigma_down - s, sigma_up=sigma_up,
                 **_euler_scalings(sigmas[:-1], settings["prediction_type"]))


def heun_plan(settings, num_steps, use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False):
    """HeunDiscreteScheduler: 2N-1 iterations alternating an Euler predictor and a trapezoid corrector."""
    if settings["rescale_betas_zero_snr"]:
        raise ValueError("heun does not support rescale_betas_zero_snr (diffusers' HeunDiscreteScheduler lacks it)")
    ramp = schedules.sigma_ramp(use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas)
    sigmas, ts = k_sigmas(settings, num_steps, ramp)
    si = np.concatenate([sigmas[:1], np.repeat(sigmas[1:-1], 2), sigmas[-1:]])  # [2N]: s0 s1 s1 s2 s2 ... 0
    ts = np.concatenate([ts[:1], np.repeat(ts[1:], 2)])
    dt = np.diff(si)
    dt[1::2] = dt[0:-1:2]  # the corrector reuses its predictor's step
    first = np.arange(len(ts)) % 2 == 0
    options = dict(clip_sample=bool(settings["clip_sample"]),
                   clip_sample_range=float(settings["clip_sample_range"]))
    return _plan(ts, si[:-1], k_init_noise_sigma(settings, sigmas), order=2, options=options, dt=dt, first=first,
                 **_euler_scalings(si[:-1], settings["prediction_type"]))


# ---- state updates (inside jit / lax.scan) ----

def _scaled_input(state, step):
    """x / sqrt(sigma^2 + 1): the U-Net's input in the variance-exploding samplers."""
    return state["x"] * step["c_in"]


def _denoised(x, out, step):
    """Predicted x0 [B,h,w,c] from the model output."""
    return step["c_skip"] * x + step["c_out"] * out


def euler_step(state, out, step, noise):
    """x <- x + dt * (x - x0) / sigma."""
    x = state["x"]
    d = (x - _denoised(x, out, step)) / step["sigma"]
    return {"x": x + d * step["dt"]}


def euler_a_step(state, out, step, noise):
    """Euler step to sigma_down, then fresh noise of scale sigma_up."""
    x = state["x"]
    d = (x - _denoised(x, out, step)) / step["sigma"]
    return {"x": x + d * step["dt"] + noise * step["sigma_up"]}


def heun_init(x, steps):
    """State {"x", "x_prev" (predictor's start), "d_prev" (predictor's slope)}."""
    return {"x": x, "x_prev": jnp.zeros_like(x), "d_prev": jnp.zeros_like(x)}


def heun_step(state, out, step, noise, clip_sample=False, clip_sample_range=1.0):
    """Predictor (first): Euler step; corrector: restart from x_prev with the mean of both slopes."""
    x = state["x"]
    x0 = _denoised(x, out, step)
    if clip_sample:
        x0 = jnp.clip(x0, -clip_sample_range, clip_sample_range)
    d = (x - x0) / step["sigma"]
    first = step["first"]
    return {"x": jnp.where(first, x + d * step["dt"], state["x_prev"] + (state["d_prev"] + d) / 2 * step["dt"]),
            "x_prev": jnp.where(first, x, state["x_prev"]), "d_prev": jnp.where(first, d, state["d_prev"])}


K_SAMPLERS = {
    "euler": Sampler(euler_plan, x_only, _scaled_input, euler_step),
    "euler_a": Sampler(euler_a_plan, x_only, _scaled_input, euler_a_step),
    "heun": Sampler(heun_plan, heun_init, _scaled_input, heun_step),
}

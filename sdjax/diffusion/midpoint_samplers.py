"""Two-stage (midpoint) samplers of k-diffusion: DPM2, DPM2 ancestral and DPM++ SDE.

Plans reproduce diffusers' KDPM2DiscreteScheduler, KDPM2AncestralDiscreteScheduler and DPMSolverSDEScheduler
iteration for iteration: each user step but the last is two scan iterations (a model call at sigma, one at a
midpoint), the last step a single Euler step to sigma = 0, so N steps run 2N - 1 iterations (diffusers'
order 2). x stays in the variance-exploding scale x = x0 + sigma * eps (the U-Net sees x / sqrt(sigma^2 + 1));
the first stage keeps its starting x in the state, the second restarts from it.

DPM++ SDE's noise is the normalized increment of one Brownian motion W over sigma (diffusers' BrownianTree
noise sampler, queried at sigma itself): the first stage of the step sigma -> sigma' adds
(W(s_mid) - W(sigma)) / sqrt(sigma - s_mid), the second (W(sigma') - W(sigma)) / sqrt(sigma - sigma'), which
contains the first increment. `sde_noise` draws exactly that per image from its key; `step` takes the unit
noise itself, so diffusers' own draws can be replayed.
"""
import jax.numpy as jnp
import numpy as np

from sdjax.diffusion import schedules
from sdjax.diffusion.k_samplers import (_denoised, _plan, _scaled_input, k_init_noise_sigma, train_sigmas,
                                        x0_coefficients)
from sdjax.diffusion.plan import Sampler, iteration_noise

# ---- schedules (host, numpy) ----

def _check(settings, name):
    """ValueError for what these diffusers classes lack: zero-SNR betas, prediction_type 'sample'."""
    if settings["rescale_betas_zero_snr"]:
        raise ValueError(f"{name} does not support rescale_betas_zero_snr (diffusers' class lacks it)")
    if settings["prediction_type"] == "sample":
        raise ValueError(f"{name} does not support prediction_type='sample' (diffusers' class raises for it)")


def step_sigmas(settings, num_steps, ramp=None, round_karras=False, float64_linspace=False):
    """(sigmas [N] float64 descending, timesteps [N] float64) of the user steps, before the final 0.

    A ramp (SIGMA_RAMPS name) spans the spaced schedule's own end points, its timesteps from sigma_to_t
    (rounded for Karras when round_karras, as the KDPM2 classes do)."""
    train = train_sigmas(settings)
    ts = schedules.spaced_timesteps(settings, num_steps).astype(np.float32)  # also validates num_steps, spacing
    if settings["timestep_spacing"] == "linspace":  # not rounded, float32 (KDPM2) or float64 (DPMSolverSDE)
        dtype = np.float64 if float64_linspace else np.float32
        ts = np.linspace(0, settings["num_train_timesteps"] - 1, num_steps, dtype=dtype)[::-1].copy()
    sigmas = np.interp(ts, np.arange(len(train)), train)
    if ramp is not None:
        sigmas = schedules.SIGMA_RAMPS[ramp](sigmas[-1], sigmas[0], num_steps)
        ts = schedules.sigma_to_t(sigmas, train)
        ts = ts.round() if ramp == "karras" and round_karras else ts
    return sigmas, ts.astype(np.float64)


def _interleave(first, second):
    """[N] first-stage and [N-1] second-stage values -> [2N-1]: f0 s0 f1 s1 ... f_{N-1}."""
    out = np.empty(2 * len(first) - 1, np.result_type(first, second))
    out[0::2], out[1::2] = first, second
    return out


def _two_stage_plan(settings, sigmas, ts, sigma_eval, ts_mid, steps):
    """Plan of 2N-1 iterations: model calls at sigma_eval [2N-1] and timesteps ts/ts_mid interleaved."""
    first = np.arange(len(sigma_eval)) % 2 == 0
    noise_b = np.concatenate([sigmas[:1], np.repeat(sigmas[1:-1], 2)])  # diffusers' add_noise sigma per iteration
    c_skip, c_out = x0_coefficients(sigma_eval, settings["prediction_type"])
    return _plan(_interleave(ts, ts_mid), noise_b, k_init_noise_sigma(settings, sigmas), order=2,
                 c_in=1 / np.sqrt(sigma_eval.astype(np.float64) ** 2 + 1), c_skip=c_skip, c_out=c_out,
                 sigma=sigma_eval, first=first, **steps)


def _lerp_log(a, b):
    """exp of the mean of log a and log b in float32, as torch's log().lerp(., 0.5).exp() (0 where either is 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        la, lb = np.log(a), np.log(b)
        out = np.exp(lb - (lb - la) * np.float32(0.5))  # torch's lerp formula for weight >= 0.5
    return np.nan_to_num(out, nan=0.0).astype(np.float32)


# ---- plans ----

def dpm2_plan(settings, num_steps, use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False):
    """KDPM2DiscreteScheduler: Euler to the log-midpoint sqrt(sigma sigma'), then from sigma with its slope."""
    _check(settings, "dpm2")
    ramp = schedules.sigma_ramp(use_karras_sigmas=use_karras_sigmas, use_exponential_sigmas=use_exponential_sigmas,
                      use_beta_sigmas=use_beta_sigmas)
    s, ts = step_sigmas(settings, num_steps, ramp, round_karras=True)
    sigmas = np.append(s, 0.0).astype(np.float32)  # [N+1]
    mid = _lerp_log(sigmas[1:], sigmas[:-1])  # [N]: sqrt(s_j s_{j+1}); 0 for the last step
    ts_mid = schedules.sigma_to_t(mid[:-1], train_sigmas(settings))
    dt = _interleave(mid - sigmas[:-1], sigmas[1:-1] - sigmas[:-2])
    return _two_stage_plan(settings, sigmas, ts, _interleave(sigmas[:-1], mid[:-1]), ts_mid,
                           dict(dt=dt, sigma_up=np.zeros_like(dt)))


def dpm2_a_plan(settings, num_steps, use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False):
    """KDPM2AncestralDiscreteScheduler: DPM2 towards sigma_down, then fresh noise of scale sigma_up.

    Computed in float32 as diffusers does. Its midpoint sqrt(sigma sigma_down) is sigma' itself up to rounding
    (sigma_down = sigma'^2 / sigma), so the second model call sees (about) the next step's noise level."""
    _check(settings, "dpm2_a")
    ramp = schedules.sigma_ramp(use_karras_sigmas=use_karras_sigmas, use_exponential_sigmas=use_exponential_sigmas,
                      use_beta_sigmas=use_beta_sigmas)
    s, ts = step_sigmas(settings, num_steps, ramp, round_karras=True)
    sigmas = np.append(s, 0.0).astype(np.float32)  # [N+1]
    nxt = np.append(sigmas[1:], np.float32(0))
    with np.errstate(divide="ignore", invalid="ignore"):
        up = np.sqrt(nxt ** 2 * (sigmas ** 2 - nxt ** 2) / sigmas ** 2)
        down = np.sqrt(nxt ** 2 - up ** 2)
    down[-1] = 0.0
    mid = _lerp_log(sigmas, down)
    mid[-2:] = 0.0
    ts_mid = schedules.sigma_to_t(mid[:-2], train_sigmas(settings))
    n = num_steps
    dt = _interleave(mid[:n] - sigmas[:n], down[:n - 1] - sigmas[:n - 1])
    sigma_up = _interleave(np.zeros(n, np.float32), up[:n - 1])
    return _two_stage_plan(settings, sigmas, ts, _interleave(sigmas[:n], mid[:n - 1]), ts_mid,
                           dict(dt=dt, sigma_up=sigma_up))


def dpmpp_sde_plan(settings, num_steps, use_karras_sigmas=False, use_exponential_sigmas=False,
                   use_beta_sigmas=False):
    """DPMSolverSDEScheduler (eta = 1, s_noise = 1): two ancestral DPM-Solver-1 stages per step, via the
    log-midpoint; the Brownian noise coefficients (noise_self, noise_prev) for `sde_noise`."""
    _check(settings, "dpmpp_sde")
    ramp = schedules.sigma_ramp(use_karras_sigmas=use_karras_sigmas, use_exponential_sigmas=use_exponential_sigmas,
                      use_beta_sigmas=use_beta_sigmas)
    s, ts = step_sigmas(settings, num_steps, ramp, float64_linspace=True)
    t = -np.log(s)
    ts_mid = schedules.sigma_to_t(np.exp(-(t[:-1] + (t[1:] - t[:-1]) * 0.5)), train_sigmas(settings))
    sigmas = np.append(s, 0.0).astype(np.float32)  # [N+1]
    # The stages in float64 from the float32 sigmas: diffusers' float32 chain of t = -log sigma conversions
    # rounds sigma_up by up to ~1e-5 relative where sigma_mid / sigma ~ 1; float64 stays ~1e-6 from it.
    lt = -np.log(sigmas[:-1].astype(np.float64))  # [N]
    mid_t = lt[:-1] + (lt[1:] - lt[:-1]) * 0.5  # [N-1]
    mid = np.exp(-mid_t)
    s_from = np.repeat(sigmas[:-2].astype(np.float64), 2)  # [2N-2]: each stage starts at its step's sigma ...
    s_to = np.exp(-np.stack([mid_t, lt[1:]], 1).ravel())  # ... to the midpoint, then to sigma'
    up = np.minimum(s_to, np.sqrt(s_to ** 2 * (s_from ** 2 - s_to ** 2) / s_from ** 2))
    ratio = np.sqrt(s_to ** 2 - up ** 2) / s_from  # sigma_down / sigma
    # x' = ratio * start + c_x0 * x0 + sigma_up * noise; the last step (to sigma 0) lands on x0
    ratio, c_x0, up = np.append(ratio, 0), np.append(-np.expm1(np.log(ratio)), 1), np.append(up, 0)
    # Brownian coefficients: stage 2's increment over [sigma', sigma] = stage 1's over [s_mid, sigma] + a new one
    noise_self, noise_prev = np.ones_like(ratio), np.zeros_like(ratio)
    a, m, b = s_from[::2], mid, s_to[1::2]
    noise_prev[1::2], noise_self[1::2] = np.sqrt((a - m) / (a - b)), np.sqrt((m - b) / (a - b))
    return _two_stage_plan(settings, sigmas, ts, _interleave(sigmas[:-1], mid), ts_mid,
                           dict(ratio=ratio, c_x0=c_x0, sigma_up=up, noise_self=noise_self, noise_prev=noise_prev))


# ---- state updates (inside jit / lax.scan) ----

def two_stage_init(x, steps):
    """State {"x", "x_prev" (the current step's starting x)}."""
    return {"x": x, "x_prev": jnp.zeros_like(x)}


def dpm2_step(state, out, step, noise):
    """First stage: x + dt * (x - x0) / sigma; second: from x_prev with the midpoint's slope, + sigma_up * noise."""
    x = state["x"]
    start = jnp.where(step["first"], x, state["x_prev"])
    d = (x - _denoised(x, out, step)) / step["sigma"]
    return {"x": start + d * step["dt"] + noise * step["sigma_up"], "x_prev": start}


def dpmpp_sde_step(state, out, step, noise):
    """x' = ratio * start + c_x0 * x0 + sigma_up * noise, start: x (first stage) or x_prev (second)."""
    x = state["x"]
    start = jnp.where(step["first"], x, state["x_prev"])
    x0 = _denoised(x, out, step)
    return {"x": step["ratio"] * start + step["c_x0"] * x0 + noise * step["sigma_up"], "x_prev": start}


def sde_noise(keys, step, shape):
    """Unit noise [B, *shape] of one iteration: normalized Brownian increments per image, from keys [B]
    (iteration 2k: z_2k; 2k+1: noise_prev * z_2k + noise_self * z_2k+1, z_i = iteration_noise(keys, i))."""
    index = step["index"]
    own = iteration_noise(keys, index, shape)
    prev = iteration_noise(keys, jnp.maximum(index - 1, 0), shape)
    return step["noise_self"] * own + step["noise_prev"] * prev


MIDPOINT_SAMPLERS = {
    "dpm2": Sampler(dpm2_plan, two_stage_init, _scaled_input, dpm2_step),
    "dpm2_a": Sampler(dpm2_a_plan, two_stage_init, _scaled_input, dpm2_step),
    "dpmpp_sde": Sampler(dpmpp_sde_plan, two_stage_init, _scaled_input, dpmpp_sde_step, noise=sde_noise),
}

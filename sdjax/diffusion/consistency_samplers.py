"""Few-step samplers of consistency-distilled models: LCM (Luo et al. 2023) and TCD (Zheng et al. 2024), as
diffusers' LCMScheduler and TCDScheduler.

Both run on timesteps picked from the distillation schedule (original_inference_steps evenly spaced
training timesteps, cut at `strength` for diffusers' LCM img2img), keep x = sqrt(abar) x0 + sqrt(1 - abar) eps,
and re-noise each iteration's estimate with fresh unit noise (`step`'s noise), except at the last.
"""
import numpy as np

from sdjax.diffusion import schedules
from sdjax.diffusion.plan import Sampler, x_itself, x_only
from sdjax.diffusion.timestep_samplers import _clip_options, _predict, _timestep_plan

SIGMA_DATA = 0.5  # the consistency models' boundary-condition data scale (diffusers' sigma_data)


def consistency_timesteps(settings, num_steps, original_inference_steps=50, strength=1.0):
    """[num_steps] int64 timesteps, descending: every (len / num_steps)-th of the distillation schedule's first
    int(original_inference_steps * strength) timesteps k - 1, 2k - 1, ... (k = T // original_inference_steps)."""
    n = settings["num_train_timesteps"]
    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    if not 1 <= original_inference_steps <= n:
        raise ValueError(f"original_inference_steps must be in [1, {n}], got {original_inference_steps}")
    if not 1 <= num_steps <= original_inference_steps:
        raise ValueError(f"num_steps must be in [1, original_inference_steps={original_inference_steps}], "
                         f"got {num_steps}")
    origin = np.arange(1, int(original_inference_steps * strength) + 1) * (n // original_inference_steps) - 1
    if len(origin) < num_steps:
        raise ValueError(f"num_steps {num_steps} exceeds int(original_inference_steps * strength) = {len(origin)} "
                         f"timesteps to choose from: lower num_steps or raise strength")
    picks = np.floor(np.linspace(0, len(origin), num=num_steps, endpoint=False)).astype(np.int64)
    return origin[::-1][picks]


# ---- LCM ----

def lcm_plan(settings, num_steps, original_inference_steps=50, timestep_scaling=10.0, strength=1.0):
    """LCMScheduler: N iterations; denoised = c_skip x + c_out x0, then re-noised to the next timestep."""
    ts = consistency_timesteps(settings, num_steps, original_inference_steps, strength)
    acp = schedules.alphas_cumprod(settings)
    last = np.arange(num_steps) == num_steps - 1
    scaled = ts.astype(np.float32) * np.float32(timestep_scaling)
    c_skip = SIGMA_DATA ** 2 / (scaled ** 2 + SIGMA_DATA ** 2)
    c_out = scaled / (scaled ** 2 + SIGMA_DATA ** 2) ** 0.5
    abar_prev = acp[np.append(ts[1:], ts[-1])]
    steps = {"abar_t": acp[ts], "c_skip": c_skip.astype(np.float32), "c_out": c_out.astype(np.float32),
             "keep": np.where(last, 1, abar_prev ** 0.5).astype(np.float32),
             "fresh": np.where(last, 0, (1 - abar_prev) ** 0.5).astype(np.float32)}
    return _timestep_plan(acp, ts, steps, **_clip_options(settings))


def lcm_step(state, out, step, noise, **predict_options):
    """x <- sqrt(abar_prev) (c_skip x + c_out x0) + sqrt(1 - abar_prev) noise; the last iteration: the estimate."""
    x = state["x"]
    x0, _ = _predict(out, x, step["abar_t"], **predict_options)
    return {"x": step["keep"] * (step["c_out"] * x0 + step["c_skip"] * x) + step["fresh"] * noise}


# ---- TCD ----

def tcd_plan(settings, num_steps, original_inference_steps=50, eta=0.3, strength=1.0):
    """TCDScheduler, step(eta=...): N iterations; x0 and eps re-mixed at s = floor((1 - eta) t_prev), then noised
    forward to t_prev (eta, the paper's gamma: 0 deterministic, 1 as LCM)."""
    if not 0 <= eta <= 1:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    ts = consistency_timesteps(settings, num_steps, original_inference_steps, strength)
    acp = schedules.alphas_cumprod(settings)
    prev = np.append(ts[1:], 0)
    s = np.floor(np.float32(1 - eta) * prev.astype(np.float32)).astype(np.int64)  # float32, as torch
    abar_s = acp[s]
    ratio = acp[prev] / abar_s
    last = (np.arange(num_steps) == num_steps - 1) | (eta == 0)
    steps = {"abar_t": acp[ts], "abar_s": abar_s, "keep": np.where(last, 1, ratio ** 0.5).astype(np.float32),
             "fresh": np.where(last, 0, (1 - ratio) ** 0.5).astype(np.float32)}
    return _timestep_plan(acp, ts, steps, prediction_type=settings["prediction_type"])


def tcd_step(state, out, step, noise, *, prediction_type):
    """x <- sqrt(r) x_s + sqrt(1 - r) noise, x_s = sqrt(abar_s) x0 + sqrt(1 - abar_s) eps, r = abar_prev / abar_s."""
    x0, eps = _predict(out, state["x"], step["abar_t"], prediction_type, False, 1.0)
    abar_s = step["abar_s"]
    x_s = abar_s ** 0.5 * x0 + (1 - abar_s) ** 0.5 * eps
    return {"x": step["keep"] * x_s + step["fresh"] * noise}


CONSISTENCY_SAMPLERS = {
    "lcm": Sampler(lcm_plan, x_only, x_itself, lcm_step),
    "tcd": Sampler(tcd_plan, x_only, x_itself, tcd_step),
}

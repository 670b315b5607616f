"""DDPM-family samplers on discrete timesteps: DDIM, DDPM, PNDM's PLMS, as diffusers' schedulers."""
import jax
import jax.numpy as jnp
import numpy as np

from sdjax.diffusion import schedules
from sdjax.diffusion.plan import Plan, Sampler, x_itself, x_only


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


TIMESTEP_SAMPLERS = {
    "ddim": Sampler(ddim_plan, x_only, x_itself, ddim_step),
    "ddpm": Sampler(ddpm_plan, x_only, x_itself, ddpm_step),
    "pndm": Sampler(pndm_plan, pndm_init, x_itself, pndm_step),
}

"""Noise-schedule math as plain functions: betas, alphas_cumprod, sigmas, SNR, spacings, conversions.

Host-side functions return numpy float32 arrays computed the way diffusers does (float32 torch),
so samplers built on them match diffusers' schedulers; conversion functions work on jnp arrays.
"""
import math

import numpy as np

# The scheduler_config.json keys we read, with diffusers' defaults.
DEFAULTS = dict(
    num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
    prediction_type="epsilon", timestep_spacing="leading", steps_offset=0,
    rescale_betas_zero_snr=False, set_alpha_to_one=True, clip_sample=False, trained_betas=None,
    clip_sample_range=1.0,
)
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def scheduler_settings(config, class_defaults=None):
    """diffusers scheduler_config.json dict -> our settings dict (known keys, defaults filled in).

    A key missing from the config takes the default of the scheduler class that runs (class_defaults,
    e.g. Euler's "linspace" spacing), as diffusers' `SchedulerClass.from_config(config)` does.
    """
    given = {k: v for k, v in config.items() if k in DEFAULTS and v is not None}
    out = {**DEFAULTS, **(class_defaults or {}), **given}
    if out["beta_schedule"] not in BETA_SCHEDULES and out["trained_betas"] is None:
        raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {out['beta_schedule']!r}")
    if out["prediction_type"] not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {out['prediction_type']!r}")
    return out


def betas(settings):
    """[T] float32 betas of a schedule."""
    n, b0, b1 = settings["num_train_timesteps"], settings["beta_start"], settings["beta_end"]
    kind = settings["beta_schedule"]
    if settings.get("trained_betas") is not None:
        out = np.asarray(settings["trained_betas"], np.float32)
    elif kind == "linear":
        out = np.linspace(b0, b1, n, dtype=np.float32)
    elif kind == "scaled_linear":
        out = np.linspace(b0 ** 0.5, b1 ** 0.5, n, dtype=np.float32) ** 2
    else:  # squaredcos_cap_v2 (Nichol & Dhariwal): from a cosine alpha_bar, capped at 0.999
        abar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        out = np.array([min(1 - abar((i + 1) / n) / abar(i / n), 0.999) for i in range(n)], np.float32)
    if settings.get("rescale_betas_zero_snr"):
        out = rescale_zero_terminal_snr(out)
    return out


def rescale_zero_terminal_snr(b):
    """Betas rescaled so the last step has zero SNR (Lin et al. 2023, Algorithm 1)."""
    s = np.sqrt(np.cumprod(1.0 - b, dtype=np.float64).astype(np.float32))
    s0, s_last = s[0].copy(), s[-1].copy()
    s = (s - s_last) * (s0 / (s0 - s_last))  # torch's order of operations
    abar = s ** 2
    alphas = np.concatenate([abar[:1], abar[1:] / abar[:-1]])
    return (1 - alphas).astype(np.float32)


def alphas_cumprod(settings):
    """[T] float32 cumulative product of (1 - beta) (accumulated in float64, as torch's cumprod does)."""
    return np.cumprod(1.0 - betas(settings), dtype=np.float64).astype(np.float32)


def sigmas_from_alphas(acp):
    """k-diffusion noise levels sigma_t = sqrt((1 - abar) / abar)."""
    return ((1 - acp) / acp) ** 0.5


def snr(acp):
    """Signal-to-noise ratio abar / (1 - abar)."""
    return acp / (1 - acp)


def spaced_timesteps(settings, num_steps):
    """[num_steps] int64 discrete timesteps, descending, by the config's `timestep_spacing` (as DDIM/DDPM)."""
    n, spacing = settings["num_train_timesteps"], settings["timestep_spacing"]
    if num_steps < 1 or num_steps > n:
        raise ValueError(f"num_steps must be in [1, {n}], got {num_steps}")
    if spacing == "linspace":
        return np.linspace(0, n - 1, num_steps).round()[::-1].astype(np.int64)
    if spacing == "leading":
        ratio = n // num_steps
        return (np.arange(num_steps) * ratio).round()[::-1].astype(np.int64) + settings["steps_offset"]
    if spacing == "trailing":
        ratio = n / num_steps
        return (np.round(np.arange(n, 0, -ratio)) - 1).astype(np.int64)
    raise ValueError(f"timestep_spacing must be linspace, leading or trailing, got {spacing!r}")


# ---- conversions between what a model predicts (x_t = alpha x0 + sigma eps, alpha^2 + sigma^2 = 1) ----

def add_noise(x0, eps, alpha, sigma):
    """x_t = alpha x0 + sigma eps (diffusers' add_noise with alpha = sqrt(abar_t), sigma = sqrt(1 - abar_t))."""
    return alpha * x0 + sigma * eps


def target(x0, eps, alpha, sigma, prediction_type):
    """What a model of `prediction_type` outputs at x_t = alpha x0 + sigma eps: eps, v = alpha eps - sigma x0
    (Salimans & Ho 2022; diffusers' get_velocity), or x0 ("sample")."""
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return alpha * eps - sigma * x0
    return x0


def to_x0(prediction, x_t, alpha, sigma, prediction_type):
    """Model output -> predicted clean sample x0."""
    if prediction_type == "epsilon":
        return (x_t - sigma * prediction) / alpha
    if prediction_type == "v_prediction":
        return alpha * x_t - sigma * prediction
    return prediction


def to_eps(prediction, x_t, alpha, sigma, prediction_type):
    """Model output -> predicted noise eps."""
    if prediction_type == "epsilon":
        return prediction
    if prediction_type == "v_prediction":
        return alpha * prediction + sigma * x_t
    return (x_t - alpha * prediction) / sigma


def karras_sigmas(sigma_min, sigma_max, num_steps, rho=7.0):
    """[num_steps] float64 noise levels from sigma_max down to sigma_min, evenly spaced in sigma^(1/rho)
    (Karras et al. 2022)."""
    ramp = np.linspace(0, 1, num_steps)
    lo, hi = float(sigma_min) ** (1 / rho), float(sigma_max) ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def exponential_sigmas(sigma_min, sigma_max, num_steps):
    """[num_steps] float64 noise levels from sigma_max down to sigma_min, evenly spaced in log sigma
    (diffusers' use_exponential_sigmas)."""
    return np.exp(np.linspace(math.log(float(sigma_max)), math.log(float(sigma_min)), num_steps))


def beta_sigmas(sigma_min, sigma_max, num_steps, alpha=0.6, beta=0.6):
    """[num_steps] float64 noise levels from sigma_max down to sigma_min at the quantiles of a Beta(alpha, beta)
    distribution (Lee et al. 2024; diffusers' use_beta_sigmas)."""
    import scipy.stats
    ppf = scipy.stats.beta.ppf(1 - np.linspace(0, 1, num_steps), alpha, beta)
    return float(sigma_min) + ppf * (float(sigma_max) - float(sigma_min))


SIGMA_RAMPS = {"karras": karras_sigmas, "exponential": exponential_sigmas, "beta": beta_sigmas}


def sigma_ramp(use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False):
    """The SIGMA_RAMPS name that diffusers' use_*_sigmas flags ask for, or None; at most one may be set."""
    asked = [name for name, on in zip(SIGMA_RAMPS, (use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas)) if on]
    if len(asked) > 1:
        raise ValueError(f"only one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas may be set, "
                         f"got {', '.join(f'use_{n}_sigmas' for n in asked)}")
    return asked[0] if asked else None


def sigma_to_t(sigma, train_sigmas):
    """Fractional timesteps of noise levels `sigma` [N], by linear interpolation of log sigma over the
    training schedule's `train_sigmas` [T] (ascending); clamped to [0, T-1]."""
    log_sigmas = np.log(train_sigmas)
    log_sigma = np.log(np.maximum(np.asarray(sigma), 1e-10))
    low = np.clip((log_sigmas[:, None] <= log_sigma).sum(0) - 1, 0, len(log_sigmas) - 2)
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return (1 - w) * low + w * (low + 1)

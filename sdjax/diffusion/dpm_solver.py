"""Exponential-integrator samplers: diffusers' DPMSolverMultistepScheduler (DPM-Solver++ 2M / 3M and their SDE
variants), DPMSolverSinglestepScheduler (DPM-Solver++ 2S / 3S) and DEISMultistepScheduler (DEIS, log-rho).

All three keep x in diffusers' scale x = alpha x0 + sigma_t eps (alpha = 1 / sqrt(sigma^2 + 1), sigma_t =
sigma alpha), turn each model output into m = skip * x + out * output (x0 for DPM-Solver++, eps for DEIS) and
update x linearly from the current m0 and the two before it:

    x' = ratio[k] * base + w[k, 0] m0 + w[k, 1] m1 + w[k, 2] m2 + noise_scale[k] * z

where k + 1 is the iteration's order: the plan's order (lower near the end, singlestep's 1, 2, 3 cycle), cut
to the number of outputs since sampling began (state "n", so an img2img slice warms up again as diffusers'
fresh scheduler does). base is x itself, or for singlestep solvers the x where the current 2- or 3-stage step
began. The plan computes ratio, w and noise_scale per iteration and order on the host in float64 from the
same float32 sigmas diffusers uses, writing out its formulas in terms of the m's. (diffusers computes them in
float32: DEIS's third-order weights, differences of Lagrange integrals, lose ~1e-2 there over 25 beta-ramp steps;
tests/test_dpm_samplers.py compares those with diffusers' coefficients in float64.)
"""
import math

import jax.numpy as jnp
import numpy as np

from sdjax.diffusion import schedules
from sdjax.diffusion.k_samplers import FINAL_SIGMAS_TYPES, _plan, train_sigmas, x0_coefficients
from sdjax.diffusion.plan import Sampler, x_itself

SOLVER_TYPES = ("midpoint", "heun")
SOLVER_TYPE_ALIASES = {"logrho": "midpoint", "bh1": "midpoint", "bh2": "midpoint"}  # as diffusers maps them


# ---- schedules (host, numpy) ----

def lu_sigmas(sigma_min, sigma_max, num_steps):
    """[num_steps] float64 noise levels evenly spaced in lambda = -log sigma (Lu et al. 2022; diffusers'
    use_lu_lambdas), from the float32 logs of the end points as diffusers takes them."""
    lo, hi = float(np.log(np.float32(sigma_min))), float(np.log(np.float32(sigma_max)))
    return np.exp(hi + np.linspace(0, 1, num_steps) * (lo - hi))


RAMPS = {**schedules.SIGMA_RAMPS, "lu": lu_sigmas}


def solver_sigmas(settings, num_steps, spacing, ramp=None, round_ramp=True, lambda_min_clipped=-math.inf):
    """These classes' set_timesteps without the final sigma: sigmas [N] float64 and integer timesteps [N] int64.

    spacing: linspace / leading / trailing, up to the last timestep whose lambda is >= lambda_min_clipped;
    ramp: a RAMPS name over the whole training range (then timesteps from the ramp's sigmas,
    rounded if round_ramp, else truncated as diffusers' int64 cast does)."""
    n = settings["num_train_timesteps"]
    if not 1 <= num_steps <= n:
        raise ValueError(f"num_steps must be in [1, {n}], got {num_steps}")
    train = train_sigmas(settings)
    last = n - int(np.searchsorted(-np.log(train[::-1]), lambda_min_clipped))  # lambda = -log sigma
    if spacing == "linspace":  # N+1 points with the last (t=0) dropped
        ts = np.linspace(0, last - 1, num_steps + 1).round()[::-1][:-1]
    elif spacing == "leading":
        ts = (np.arange(num_steps + 1) * (last // (num_steps + 1))).round()[::-1][:-1] + settings["steps_offset"]
    elif spacing == "trailing":
        ts = np.arange(last, 0, -n / num_steps).round() - 1
    else:
        raise ValueError(f"timestep_spacing must be linspace, leading or trailing, got {spacing!r}")
    if ramp is None:
        return np.interp(ts, np.arange(n), train), ts.astype(np.int64)
    sigmas = RAMPS[ramp](train[0], train[-1], num_steps)
    ts = schedules.sigma_to_t(sigmas, train)
    return sigmas, (ts.round() if round_ramp else ts).astype(np.int64)


def final_sigma(settings, final_sigmas_type):
    """The last sigma of these schedules: 0, or the training schedule's smallest (final_sigmas_type, checked)."""
    if final_sigmas_type not in FINAL_SIGMAS_TYPES:
        raise ValueError(f"final_sigmas_type must be one of {FINAL_SIGMAS_TYPES}, got {final_sigmas_type!r}")
    return train_sigmas(settings)[0] if final_sigmas_type == "sigma_min" else 0.0


def _solver_type(solver_type):
    solver_type = SOLVER_TYPE_ALIASES.get(solver_type, solver_type)
    if solver_type not in SOLVER_TYPES:
        raise ValueError(f"solver_type must be one of {SOLVER_TYPES}, got {solver_type!r}")
    return solver_type


def _check_order(solver_order):
    if solver_order not in (1, 2, 3):
        raise ValueError(f"solver_order must be 1, 2 or 3, got {solver_order!r}")


def _no_zero_snr(settings, name):
    if settings["rescale_betas_zero_snr"]:
        raise ValueError(f"{name} does not support rescale_betas_zero_snr (diffusers' class lacks it)")


def _lower_order_end(order, lower_order_final):
    """Multistep orders [N] cut to 1 at the last and to 2 at the one before, with fewer than 15 steps."""
    if lower_order_final and len(order) < 15:
        order[-2:] = np.minimum(order[-2:], [2, 1][-len(order):])
    return order


# ---- coefficients (host, float64) ----

def _coefficients(algorithm_type, sig_t, sig_b, h):
    """Terms of diffusers' DPM-Solver++ updates from sigma sig_b to sig_t (h: lambda step): ratio (of x), noise,
    c0 (of D0), mid and heun (of D1 in the midpoint / heun second-order update), c2 (of D2)."""
    a_t, a_b = 1 / np.sqrt(sig_t ** 2 + 1), 1 / np.sqrt(sig_b ** 2 + 1)
    s_t, s_b = sig_t * a_t, sig_b * a_b
    if algorithm_type == "dpmsolver++":
        e = -np.expm1(-h)
        return dict(ratio=s_t / s_b, noise=np.zeros_like(h), c0=a_t * e, mid=0.5 * a_t * e, heun=a_t * (1 - e / h),
                    c2=-a_t * ((h - e) / h ** 2 - 0.5))
    e = -np.expm1(-2 * h)  # sde-dpmsolver++; c2 as diffusers writes it
    return dict(ratio=s_t / s_b * np.exp(-h), noise=s_t * np.sqrt(e), c0=a_t * e, mid=0.5 * a_t * e,
                heun=a_t * (1 - e / (2 * h)), c2=a_t * ((e - 2 * h) / (2 * h) ** 2 - 0.5))


def _multistep_weights(algorithm_type, solver_type, sig):
    """ratio [N,3], noise_scale [N,3], w [N,3,3] of DPMSolverMultistep's order-1/2/3 updates at each iteration."""
    lam = -np.log(sig)
    l0, l1, l2 = lam[:-1], np.roll(lam[:-1], 1), np.roll(lam[:-1], 2)  # lambda at i, i-1, i-2 (rolled: masked)
    h = lam[1:] - l0
    c = _coefficients(algorithm_type, sig[1:], sig[:-1], h)
    r0, r1 = (l0 - l1) / h, (l1 - l2) / h
    c0, c1, heun, c2 = c["c0"], c["mid" if solver_type == "midpoint" else "heun"], c["heun"], c["c2"]
    a = heun * (1 + r0 / (r0 + r1)) + c2 / (r0 + r1)  # of D1_0 = (m0 - m1) / r0 in the third-order update
    b = -(heun * r0 / (r0 + r1) + c2 / (r0 + r1))     # of D1_1 = (m1 - m2) / r1
    zero = np.zeros_like(h)
    w = np.stack([np.stack([c0, zero, zero], -1), np.stack([c0 + c1 / r0, -c1 / r0, zero], -1),
                  np.stack([c0 + a / r0, -a / r0 + b / r1, -b / r1], -1)], 1)
    return np.stack([c["ratio"]] * 3, 1), np.stack([c["noise"]] * 3, 1), w


def _singlestep_weights(solver_type, sig):
    """ratio, noise_scale [N,3], w [N,3,3] of DPMSolverSinglestep's (dpmsolver++) updates from the stage's start
    (i, i-1, i-2)."""
    lam, n = -np.log(sig), len(sig) - 1
    i = np.arange(n)
    ratio, noise, w = np.zeros((n, 3)), np.zeros((n, 3)), np.zeros((n, 3, 3))
    for k in range(3):
        b = np.maximum(i - k, 0)
        h = lam[i + 1] - lam[b]
        c = _coefficients("dpmsolver++", sig[i + 1], sig[b], h)
        ratio[:, k], noise[:, k], c0, heun = c["ratio"], c["noise"], c["c0"], c["heun"]
        if k == 0:
            w[:, 0, 0] = c0
        elif k == 1:  # D0 = m1, D1 = (m0 - m1) / r0
            c1, r0 = c["mid" if solver_type == "midpoint" else "heun"], (lam[i] - lam[b]) / h
            w[:, 1, :2] = np.stack([c1 / r0, c0 - c1 / r0], -1)
        else:  # D0 = m2, D1_0 = (m1 - m2) / r1, D1_1 = (m0 - m2) / r0
            r0, r1 = (lam[i] - lam[b]) / h, (lam[np.maximum(i - 1, 0)] - lam[b]) / h
            if solver_type == "midpoint":  # heun * D1_1
                w[:, 2] = np.stack([heun / r0, np.zeros(n), c0 - heun / r0], -1)
            else:  # heun * D1 + c2 * D2, D1 = (r0 D1_0 - r1 D1_1) / (r0 - r1), D2 = 2 (D1_1 - D1_0) / (r0 - r1)
                a, bb = (heun * r0 - 2 * c["c2"]) / (r0 - r1), (2 * c["c2"] - heun * r1) / (r0 - r1)
                w[:, 2] = np.stack([bb / r0, a / r1, c0 - a / r1 - bb / r0], -1)
    return ratio, noise, w


def _deis_weights(sig):
    """ratio, noise_scale [N,3], w [N,3,3] of DEIS's log-rho updates (rho = sigma_t / alpha = sigma)."""
    log, a = np.log(sig), 1 / np.sqrt(sig ** 2 + 1)
    t, s0, s1, s2 = log[1:], log[:-1], np.roll(log[:-1], 1), np.roll(log[:-1], 2)  # log rho; rolled: masked
    a_t, n = a[1:], len(sig) - 1

    def ind2(t, b, c):  # the integral of the Lagrange basis polynomial through b, c, times e^lambda
        return np.exp(t) * (-c + t - 1) / (b - c)

    def ind3(t, b, c, d):
        return np.exp(t) * (c * (d - t + 1) - d * t + d + t ** 2 - 2 * t + 2) / ((b - c) * (b - d))

    w = np.zeros((n, 3, 3))
    w[:, 0, 0] = -sig[1:] * a_t * np.expm1(s0 - t)  # -sigma_t (e^h - 1), h = lambda_t - lambda_s0 = log rho_s0/rho_t
    w[:, 1, :2] = a_t[:, None] * np.stack([ind2(t, s0, s1) - ind2(s0, s0, s1), ind2(t, s1, s0) - ind2(s0, s1, s0)], -1)
    w[:, 2] = a_t[:, None] * np.stack([ind3(t, s0, s1, s2) - ind3(s0, s0, s1, s2),
                                       ind3(t, s1, s2, s0) - ind3(s0, s1, s2, s0),
                                       ind3(t, s2, s0, s1) - ind3(s0, s2, s0, s1)], -1)
    return np.stack([a_t / a[:-1]] * 3, 1), np.zeros((n, 3)), w


def _solver_plan(settings, ts, sig, order, weights, data, **options):
    """Plan of N iterations from sig [N+1] float64, order [N] and (ratio, noise_scale, w); m = x0 if data else eps."""
    ratio, noise, w = weights
    s = sig[:-1]
    alpha = 1 / np.sqrt(s * s + 1)
    if data:
        skip, out = x0_coefficients(s, settings["prediction_type"])
        skip = skip / alpha
    else:
        skip, out = {"epsilon": (np.zeros_like(s), np.ones_like(s)), "v_prediction": (s * alpha, alpha),
                     "sample": (1 / (s * alpha), -1 / s)}[settings["prediction_type"]]
    usable = np.arange(3) < np.minimum(order, np.arange(len(order)) + 1)[:, None]  # the orders an iteration may run
    return _plan(ts, s * alpha, 1.0, noise_a=alpha, options=options, max_order=order.astype(np.int32),
                 ratio=np.where(usable, ratio, 0), noise_scale=np.where(usable, noise, 0),
                 w=np.where(usable[..., None], w, 0), m_skip=skip, m_out=out)


# ---- plans ----

def multistep_plan(settings, num_steps, algorithm_type, solver_order, solver_type="midpoint", lower_order_final=True,
                   euler_at_final=False, final_sigmas_type="zero", use_karras_sigmas=False,
                   use_exponential_sigmas=False, use_beta_sigmas=False, use_lu_lambdas=False,
                   lambda_min_clipped=-math.inf):
    """DPMSolverMultistepScheduler(algorithm_type = dpmsolver++ or sde-dpmsolver++, solver_order 1-3): N iterations."""
    solver_type, last = _solver_type(solver_type), final_sigma(settings, final_sigmas_type)
    ramp = schedules.sigma_ramp(use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas)
    ramp = "lu" if use_lu_lambdas and ramp != "karras" else ramp  # diffusers: karras, lu, exponential, beta
    rounded = ramp in ("karras", "lu") and settings["beta_schedule"] != "squaredcos_cap_v2"
    sigmas, ts = solver_sigmas(settings, num_steps, settings["timestep_spacing"], ramp, rounded, lambda_min_clipped)
    sig = np.append(sigmas, last).astype(np.float32).astype(np.float64)
    order = _lower_order_end(np.full(len(ts), solver_order), lower_order_final)
    if euler_at_final or final_sigmas_type == "zero":
        order[-1] = 1
    with np.errstate(all="ignore"):
        weights = _multistep_weights(algorithm_type, solver_type, sig)
    return _solver_plan(settings, ts, sig, order, weights, True, singlestep=False,
                        stochastic=algorithm_type == "sde-dpmsolver++")


def _multistep(algorithm_type, solver_order):
    """multistep_plan at one algorithm and order, with the other options as keyword arguments (`configure` reads
    them from the signature)."""
    def plan(settings, num_steps, solver_type="midpoint", lower_order_final=True, euler_at_final=False,
             final_sigmas_type="zero", use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
             use_lu_lambdas=False, lambda_min_clipped=-math.inf):
        return multistep_plan(settings, num_steps, algorithm_type, solver_order, solver_type, lower_order_final,
                              euler_at_final, final_sigmas_type, use_karras_sigmas, use_exponential_sigmas,
                              use_beta_sigmas, use_lu_lambdas, lambda_min_clipped)
    plan.__doc__ = f"DPMSolverMultistepScheduler({algorithm_type}, solver_order={solver_order}): N iterations."
    return plan


def singlestep_orders(num_steps, solver_order, lower_order_final):
    """[N] int: DPMSolverSinglestep's stage orders, cycles 1..order, the tail shortened if lower_order_final."""
    k, n = solver_order, num_steps
    if not lower_order_final or k == 1:
        return np.array(list(range(1, k + 1)) * (n // k), np.int64)
    if n % k == 0:
        return np.array(list(range(1, k + 1)) * (n // k - 1) + list(range(1, k)) + [1], np.int64)
    return np.array(list(range(1, k + 1)) * (n // k) + list(range(1, n % k + 1)), np.int64)


def singlestep_plan(settings, num_steps, solver_order=2, solver_type="midpoint", lower_order_final=False,
                    final_sigmas_type="zero", use_karras_sigmas=False, use_exponential_sigmas=False,
                    use_beta_sigmas=False, lambda_min_clipped=-math.inf):
    """DPMSolverSinglestepScheduler(dpmsolver++): N iterations in stages of 1, 2 (, 3) model calls; linspace
    timesteps whatever the config's timestep_spacing, as diffusers."""
    _no_zero_snr(settings, "dpmpp_2s")
    _check_order(solver_order)
    solver_type, last = _solver_type(solver_type), final_sigma(settings, final_sigmas_type)
    ramp = schedules.sigma_ramp(use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas)
    sigmas, ts = solver_sigmas(settings, num_steps, "linspace", ramp, ramp == "karras", lambda_min_clipped)
    sig = np.append(sigmas, last).astype(np.float32).astype(np.float64)
    # diffusers turns lower_order_final on for a step count the order does not divide, and for a zero final sigma
    lower = lower_order_final or num_steps % solver_order != 0 or final_sigmas_type == "zero"
    order = singlestep_orders(num_steps, solver_order, lower)
    if final_sigmas_type == "zero":
        order[-1] = 1
    with np.errstate(all="ignore"):
        weights = _singlestep_weights(solver_type, sig)
    return _solver_plan(settings, ts, sig, order, weights, True, singlestep=True, stochastic=False)


def deis_plan(settings, num_steps, solver_order=2, lower_order_final=True, use_karras_sigmas=False,
              use_exponential_sigmas=False, use_beta_sigmas=False):
    """DEISMultistepScheduler (log-rho): N iterations; the last sigma is sigma_min, or a ramp's last repeated."""
    _no_zero_snr(settings, "deis")
    _check_order(solver_order)
    ramp = schedules.sigma_ramp(use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas)
    sigmas, ts = solver_sigmas(settings, num_steps, settings["timestep_spacing"], ramp, ramp == "karras")
    last = sigmas[-1] if ramp else train_sigmas(settings)[0]
    sig = np.append(sigmas, last).astype(np.float32).astype(np.float64)
    order = _lower_order_end(np.full(len(ts), solver_order), lower_order_final)
    with np.errstate(all="ignore"):
        weights = _deis_weights(sig)
    return _solver_plan(settings, ts, sig, order, weights, False, singlestep=False, stochastic=False)


# ---- state updates (inside jit / lax.scan) ----

def solver_init(x, steps):
    """State {"x", "base" (x where a singlestep stage began), "m1", "m2" (earlier converted outputs),
    "n" (outputs since sampling began, at most 2)}."""
    return {"x": x, "base": x, "m1": jnp.zeros_like(x), "m2": jnp.zeros_like(x), "n": jnp.array(0, jnp.int32)}


def solver_step(state, out, step, noise, singlestep=False, stochastic=False):
    """x' = ratio base + w . (m0, m1, m2) (+ noise_scale z) at order min(max_order, n + 1)."""
    x = state["x"]
    m0 = step["m_skip"] * x + step["m_out"] * out
    k = jnp.minimum(step["max_order"], state["n"] + 1) - 1
    base = jnp.where(k == 0, x, state["base"]) if singlestep else x
    w = step["w"][k]
    x_next = step["ratio"][k] * base + (w[0] * m0 + w[1] * state["m1"] + w[2] * state["m2"])
    if stochastic:
        x_next = x_next + step["noise_scale"][k] * noise
    return {"x": x_next, "base": base, "m1": m0, "m2": state["m1"], "n": jnp.minimum(state["n"] + 1, 2)}


def _sampler(plan):
    return Sampler(plan, solver_init, x_itself, solver_step)


DPM_SAMPLERS = {
    "dpmpp_2m": _sampler(_multistep("dpmsolver++", 2)),
    "dpmpp_3m": _sampler(_multistep("dpmsolver++", 3)),
    "dpmpp_2m_sde": _sampler(_multistep("sde-dpmsolver++", 2)),
    "dpmpp_3m_sde": _sampler(_multistep("sde-dpmsolver++", 3)),
    "dpmpp_2s": _sampler(singlestep_plan),
    "deis": _sampler(deis_plan),
}

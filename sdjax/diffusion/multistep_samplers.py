"""Multistep samplers that keep a history of model outputs in the state: UniPC (Zhao et al. 2023) and LMS
(k-diffusion's linear multistep), as diffusers' UniPCMultistepScheduler and LMSDiscreteScheduler.

Both turn each update into a linear combination of x and the stored outputs whose weights the plan
computes on the host (float64) for every order the update may run at; the state says which order runs
(multistep warm-up counts iterations since sampling began, so a sliced plan is diffusers' img2img).

UniPC keeps diffusers' scale x = alpha x0 + sigma_t eps (alpha = 1 / sqrt(sigma^2 + 1), sigma_t = sigma alpha).
One model call per iteration: the call at iteration i first corrects x_i (UniC, with the output at x_i and
the sample before the last predictor), then predicts x_{i+1} (UniP) from the corrected x_i; the last
iteration's prediction is the result, uncorrected, as in diffusers.
LMS keeps x = x0 + sigma eps (the U-Net sees x / sqrt(sigma^2 + 1)) and integrates the Lagrange polynomial
through the last 4 slopes d = (x - x0) / sigma over [sigma_i, sigma_{i+1}] (diffusers' step(order=4)).
"""
import jax.numpy as jnp
import numpy as np

from sdjax.diffusion import schedules
from sdjax.diffusion.dpm_solver import final_sigma, solver_sigmas
from sdjax.diffusion.k_samplers import _euler_scalings, _plan, _scaled_input, k_init_noise_sigma, k_sigmas, train_sigmas
from sdjax.diffusion.plan import Sampler, x_itself

SOLVER_TYPES = ("bh1", "bh2")
LMS_ORDER = 4  # LMSDiscreteScheduler.step's default `order`, which diffusers' pipelines leave as it is


def _convert_coefficients(sigma, prediction_type, predict_x0):
    """(c_skip, c_out) [N] float64: x0 (predict_x0) or eps = c_skip x + c_out output at x = alpha x0 + sigma_t eps."""
    alpha = 1 / np.sqrt(sigma * sigma + 1)
    to = schedules.to_x0 if predict_x0 else schedules.to_eps
    zero = np.zeros_like(sigma)  # to_x0 / to_eps may return a constant
    return (zero + to(0.0, 1.0, alpha, sigma * alpha, prediction_type),
            zero + to(1.0, 0.0, alpha, sigma * alpha, prediction_type))


# ---- UniPC (host) ----

def unipc_sigmas(settings, num_steps, ramp=None, final_sigmas_type="zero"):
    """UniPCMultistepScheduler schedule: sigmas [N+1] float32 (last 0 or sigma_min), integer timesteps [N] float32:
    DPM-Solver's spacings; a ramp over the whole training range, its timesteps truncated but Karras' rounded."""
    sigmas, ts = solver_sigmas(settings, num_steps, settings["timestep_spacing"], ramp, round_ramp=ramp == "karras")
    last = final_sigma(settings, final_sigmas_type)
    last = sigmas[-1] if ramp is not None and final_sigmas_type == "sigma_min" else last
    return np.append(sigmas, last).astype(np.float32), ts.astype(np.float32)


def _unipc_update(alpha, sig, j0, jt, order, predict_x0, solver_type, corrector):
    """Weights [order + 2] float64 of one UniP (UniC if corrector) update from level j0 to jt over (x, m_t, m_j0,
    m_j0-1, ...): x_jt = w0 x + w1 m_t + sum_k w_{k+2} m_{j0-k} (m_t, the output at jt, only in the corrector).
    alpha, sig [N+1]: alpha and sigma_t of the levels."""
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(sig)  # +inf at a zero final sigma
    h = lam[jt] - lam[j0]
    rks = np.array([(lam[j0 - k] - lam[j0]) / h for k in range(1, order)] + [1.0])
    hh = -h if predict_x0 else h
    h_phi_1 = np.expm1(hh)
    h_phi_k, factorial = h_phi_1 / hh - 1, 1
    b_h = hh if solver_type == "bh1" else np.expm1(hh)
    rows, b = [], []
    for i in range(1, order + 1):
        rows.append(rks ** (i - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    r, b = np.array(rows), np.array(b)
    if corrector:  # rhos over the order-1 differences and the new output's
        rhos = np.array([0.5]) if order == 1 else np.linalg.solve(r, b)
    else:
        rhos = np.zeros(0) if order == 1 else np.array([0.5]) if order == 2 else np.linalg.solve(r[:-1, :-1], b[:-1])
    w = np.zeros(order + 2)
    # the first-order part, scale * h_phi_1 in closed form: finite at a zero final sigma (h = inf), where
    # diffusers' bh1 (B_h = -inf times a zero correction) and predict_x0=False (0 * inf) give NaN
    a_t, s_t, a_0, s_0 = alpha[jt], sig[jt], alpha[j0], sig[j0]
    scale = a_t if predict_x0 else s_t
    if predict_x0:
        w[0], w[2] = s_t / s_0, a_t - s_t * a_0 / s_0
    else:
        w[0], w[2] = a_t / a_0, s_t - a_t * s_0 / a_0
    for k in range(1, len(rhos) + 1):  # D1_k = (m_{j0-k} - m_j0) / r_k, or D1_t = m_t - m_j0 for the last rho
        c = -scale * b_h * rhos[k - 1] / (rks[k - 1] if k < order else 1.0)
        w[k + 2 if k < order else 1] += c
        w[2] -= c
    return w


def unipc_plan(settings, num_steps, solver_order=2, predict_x0=True, solver_type="bh2", lower_order_final=True,
               disable_corrector=(), final_sigmas_type="zero", use_karras_sigmas=False, use_exponential_sigmas=False,
               use_beta_sigmas=False):
    """UniPCMultistepScheduler (B(h) predictor-corrector): N iterations, x in the scale alpha x0 + sigma_t eps."""
    if int(solver_order) != solver_order or solver_order < 1:
        raise ValueError(f"solver_order must be a positive integer, got {solver_order!r}")
    solver_type = "bh2" if solver_type in ("midpoint", "heun", "logrho") else solver_type  # as diffusers maps them
    if solver_type not in SOLVER_TYPES:
        raise ValueError(f"solver_type must be one of {SOLVER_TYPES}, got {solver_type!r}")
    if not isinstance(disable_corrector, (list, tuple)) or not all(isinstance(i, int) for i in disable_corrector):
        raise ValueError(f"disable_corrector must be a list of step indices, got {disable_corrector!r}")
    if final_sigmas_type == "zero" and not lower_order_final and solver_order > 1:
        raise ValueError("lower_order_final=False with solver_order > 1 needs final_sigmas_type='sigma_min': a "
                         "multistep update to a zero sigma diverges (diffusers' UniPCMultistepScheduler returns inf)")
    ramp = schedules.sigma_ramp(use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas)
    if ramp and final_sigmas_type == "sigma_min" and not lower_order_final and solver_order > 1:
        raise ValueError(f"use_{ramp}_sigmas with final_sigmas_type='sigma_min' ends on a step of zero length, which "
                         f"a multistep update divides by: it needs lower_order_final=True (diffusers returns NaN)")
    sigmas, ts = unipc_sigmas(settings, num_steps, ramp, final_sigmas_type)
    s, p = sigmas.astype(np.float64), int(solver_order)
    alpha = 1 / np.sqrt(s * s + 1)
    n = len(ts)
    # the predictor's order cap at iteration i; the warm-up (iterations since the start) lowers it in `step`
    p_cap = np.array([min(p, n - i) if lower_order_final else p for i in range(n)], np.int32)
    pred, corr = np.zeros((n, p, p + 2)), np.zeros((n, p, p + 2))  # weights over (x, m_i, m_i-1, ..., m_i-p)
    with np.errstate(divide="ignore", invalid="ignore"):
        for i in range(n):
            for order in range(1, min(p_cap[i], i + 1) + 1):
                w = _unipc_update(alpha, s * alpha, i, i + 1, order, predict_x0, solver_type, corrector=False)
                pred[i, order - 1, :order + 1] = np.delete(w, 1)  # no m_t term
            for order in range(1, min(p_cap[i - 1], i) + 1) if i else ():  # corrects with the last predictor's order
                corr[i, order - 1, :order + 2] = _unipc_update(alpha, s * alpha, i - 1, i, order, predict_x0,
                                                               solver_type, corrector=True)
    c_skip, c_out = _convert_coefficients(s[:-1], settings["prediction_type"], predict_x0)
    corrector = np.array([i > 0 and i - 1 not in set(disable_corrector) for i in range(n)])
    return _plan(ts, s[:-1] * alpha[:-1], 1.0, noise_a=alpha[:-1], c_skip=c_skip, c_out=c_out, pred=pred, corr=corr,
                 p_cap=p_cap.astype(np.float32), c_cap=np.concatenate([[0], p_cap[:-1]]).astype(np.float32),
                 corrector=corrector)


# ---- UniPC (inside jit / lax.scan) ----

def unipc_init(x, steps):
    """State {"x", "x_last" (x before the last predictor), "ms" [P, ...] (previous converted outputs, newest first),
    "count" (iterations since sampling began)}."""
    p = steps["pred"].shape[1]
    return {"x": x, "x_last": jnp.zeros_like(x), "ms": jnp.zeros((p,) + x.shape, x.dtype), "count": jnp.int32(0)}


def _combine(w, x, ms):
    """w[0] * x + sum_j w[j+1] * ms[j]: w [P+2], x [B,h,w,c], ms [P+1, B,h,w,c]."""
    return w[0] * x + jnp.tensordot(w[1:], ms, axes=1)


def unipc_step(state, out, step, noise):
    """Correct x_i with the output at it (UniC), then predict x_{i+1} (UniP), each at its warm-up-limited order."""
    count, x = state["count"], state["x"]
    m = step["c_skip"] * x + step["c_out"] * out
    ms = jnp.concatenate([m[None], state["ms"]])
    use = step["corrector"] & (count > 0)
    c = jnp.clip(jnp.minimum(step["c_cap"].astype(jnp.int32), count), 1, None)
    x = jnp.where(use, _combine(step["corr"][c - 1], state["x_last"], ms), x)
    p = jnp.minimum(step["p_cap"].astype(jnp.int32), count + 1)
    return {"x": _combine(step["pred"][p - 1], x, ms), "x_last": x, "ms": ms[:-1], "count": count + 1}


# ---- LMS ----

def _lms_weights(sigmas, i, order):
    """[order] float64: integrals over [sigma_i, sigma_{i+1}] of the Lagrange basis on sigma_i ... sigma_{i-order+1}."""
    nodes = sigmas[i - np.arange(order)]
    out = np.zeros(order)
    for j in range(order):
        basis = np.polynomial.Polynomial([1.0])
        for node in np.delete(nodes, j):
            basis *= np.polynomial.Polynomial([-node, 1.0]) / (nodes[j] - node)
        integral = basis.integ()
        out[j] = integral(sigmas[i + 1]) - integral(sigmas[i])
    return out


def lms_plan(settings, num_steps, use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False):
    """LMSDiscreteScheduler, step(order=4): N iterations."""
    if settings["rescale_betas_zero_snr"]:
        raise ValueError("lms does not support rescale_betas_zero_snr (diffusers' LMSDiscreteScheduler lacks it)")
    ramp = schedules.sigma_ramp(use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas)
    sigmas, ts = k_sigmas(settings, num_steps)
    if ramp is not None:  # between the spaced schedule's own end points
        ramped = schedules.SIGMA_RAMPS[ramp](sigmas[-2], sigmas[0], num_steps)
        ts = schedules.sigma_to_t(ramped, train_sigmas(settings)).astype(np.float32)
        sigmas = np.append(ramped, 0.0).astype(np.float32)
    s = sigmas.astype(np.float64)
    weights = np.zeros((num_steps, LMS_ORDER))
    for i in range(num_steps):
        order = min(i + 1, LMS_ORDER)  # from the iteration's place in the whole schedule, as diffusers
        weights[i, :order] = _lms_weights(s, i, order)
    return _plan(ts, sigmas[:-1], k_init_noise_sigma(settings, sigmas), weights=weights,
                 **_euler_scalings(sigmas[:-1], settings["prediction_type"]))


def lms_init(x, steps):
    """State {"x", "ds" [4, ...] (slopes, newest first), "count" (iterations since sampling began)}."""
    return {"x": x, "ds": jnp.zeros((LMS_ORDER,) + x.shape, x.dtype), "count": jnp.int32(0)}


def lms_step(state, out, step, noise):
    """x <- x + sum_j w_j d_{i-j} over the slopes stored since sampling began (at most 4)."""
    x = state["x"]
    d = (x - (step["c_skip"] * x + step["c_out"] * out)) / step["sigma"]
    ds = jnp.concatenate([d[None], state["ds"][:-1]])
    w = jnp.where(jnp.arange(LMS_ORDER) <= state["count"], step["weights"], 0.0)
    return {"x": x + jnp.tensordot(w, ds, axes=1), "ds": ds, "count": state["count"] + 1}


MULTISTEP_SAMPLERS = {
    "unipc": Sampler(unipc_plan, unipc_init, x_itself, unipc_step),
    "lms": Sampler(lms_plan, lms_init, _scaled_input, lms_step),
}

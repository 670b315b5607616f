"""What a sampler is: a host-side `Plan` and pure functions of a scan iteration (timestep_samplers.py,
k_samplers.py implement them; samplers.py is the registry).

How a sampler is driven (the pipeline's loop, one model call per scan iteration, as diffusers loops
over `scheduler.timesteps`):

    plan = sampler.plan(settings, num_steps, **options)       # host, numpy; settings from schedules.scheduler_settings
    plan = slice_plan(plan, start)                             # img2img only
    step_fn = bind(sampler, plan.options)                      # = partial(sampler.step, **plan.options)
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
from typing import Callable, NamedTuple

import jax
import numpy as np


class Sampler(NamedTuple):
    """A sampler as pure functions. `plan` runs on the host (numpy); the others inside jit + lax.scan."""
    plan: Callable         # (settings, num_steps, **options) -> Plan
    init: Callable         # (x: [B,h,w,c], steps: dict of [S,...] arrays) -> state pytree with state["x"]
    model_input: Callable  # (state, step) -> x_in [B,h,w,c]
    step: Callable         # (state, model_output [B,h,w,c], step, noise [B,h,w,c], **plan.options) -> state
    # (keys [B], step, shape) -> [B, *shape]: the unit noise `step` gets at an iteration, drawn from the images'
    # keys; None: independent normals per iteration (`iteration_noise`). Samplers whose draws are correlated
    # across iterations (increments of one Brownian path) say how here.
    noise: Callable = None


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


def iteration_noise(keys, index, shape):
    """Independent unit normal noise per image for iteration `index`: keys [B] -> [B, *shape]."""
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, index), shape))(keys)


def bind(sampler, options):
    """The sampler's `step` with a plan's static options applied: (state, model_output, step, noise) -> state."""
    return functools.partial(sampler.step, **options)


def x_only(x, steps):
    """The state of samplers that carry nothing but x: {"x": [B,h,w,c]}."""
    return {"x": x}


def x_itself(state, step):
    """The U-Net's input is x itself (no input scaling)."""
    return state["x"]


def span(plan, train_steps, num_steps, strength=None, denoising_start=None, denoising_end=None):
    """(start, end): the plan's iterations that run. img2img (strength not None) skips the first
    num_steps - int(num_steps * strength) steps; denoising_start instead begins at the first timestep below
    that fraction of the training timesteps, denoising_end stops before the first below its fraction, as
    diffusers' SDXL pipelines cut `scheduler.timesteps` (a 2nd-order sampler begins on a whole step)."""
    t, start, end = plan.timesteps, 0, len(plan.timesteps)
    cutoff = lambda fraction: int(round(train_steps - fraction * train_steps))  # noqa: E731
    if denoising_start is not None:
        count = int((t < cutoff(denoising_start)).sum())
        count += plan.order == 2 and count % 2 == 0
        start = max(len(t) - count, 0)
    elif strength is not None:
        start = (num_steps - int(num_steps * strength)) * plan.order
    if denoising_end is not None:
        end = start + int((t[start:] >= cutoff(denoising_end)).sum())
    if end <= start:
        raise ValueError(f"no sampling step lies between denoising_start={denoising_start} and "
                         f"denoising_end={denoising_end} with {num_steps} steps")
    return start, end

"""The sampling loop as the pipeline runs it: its compiled function (iterations [lo, hi) of a plan) and the host
side that calls it in chunks of iterations, with progress shown between calls."""
import time

import jax
import numpy as np
from tqdm.auto import tqdm

from sdjax import sampling
from sdjax.diffusion import samplers as samplers_lib
from sdjax.models.conv import loop_constant_kernels
from sdjax.pipeline import denoiser as denoiser_lib

# The most a call's overhead may add to its iterations' time: the loop runs in calls of as many iterations as keep
# it below this (one when calls cost little beyond their iterations, as on accelerators), progress shown between
# calls. None of it changes a bit of the result (README, bench/sample_compile.py).
MAX_OVERHEAD = 0.01
CHUNK = None  # a fixed number of iterations per call instead (bench/sample_compile.py)


def chunk_size(overhead, iteration):
    """Iterations per call of the loop for which `overhead` (seconds a call costs beyond its iterations) stays under
    MAX_OVERHEAD of a call's time, an iteration taking `iteration` seconds."""
    return max(1, int(np.ceil(overhead / (MAX_OVERHEAD * max(iteration, 1e-9)))))


def start_state(steps, batch, first, *, sampler):
    """Sampler `sampler`'s state where the loop starts: x = first[0] * image latents + first[1] * noise."""
    x = first[1] * batch["noise"]
    if "image_latents" in batch:
        x = x + first[0] * batch["image_latents"]
    return samplers_lib.SAMPLERS[sampler].init(x, steps)


def run_iterations(unet, params, steps, timesteps, batch, state, lo, hi, scale, rescale, adapter_params=(), *,
                   sampler, options, rescaled, groups, adapters=()):
    """Iterations [lo, hi) of the sampling loop on a batch (`Pipeline._batch`) from `state`; the keyword
    arguments are static. adapters: wrappers `adapter(fn, params) -> fn` of the U-Net call, inside guidance
    (controlnets.ControlNetCall), each with its params in adapter_params."""
    fn = denoiser_lib.unet_call(unet, params)
    for adapter, p in zip(adapters, adapter_params):
        fn = adapter(fn, p)
    fn = denoiser_lib.with_channels(denoiser_lib.images_apart(denoiser_lib.guided(fn, scale, rescale if rescaled
                                                                                 else None), groups))
    conditioning = {k: batch.get(k) for k in ("cond", "uncond", "concat", "control_images")}
    with loop_constant_kernels():  # the U-Net's weights are constants of the loop: transform them once
        return sampling.run(fn, samplers_lib.SAMPLERS[sampler], dict(options), steps, timesteps, state,
                            conditioning, batch["keys"], lo, hi, blend=batch.get("blend"),
                            noise=batch.get("step_noise"), per_iteration=batch.get("per_iteration"))


def run_in_calls(loop, state, start, end, progress):
    """The state after iterations [start, end), `loop(lo, hi, state)` running [lo, hi) in one call; progress is
    shown between calls (when `progress` is a description), the next call already queued."""
    bar = tqdm(total=end - start, desc=progress, disable=progress is None, leave=False)
    # what a call costs beyond its iterations (dispatch; on CPU the convolution kernels' Winograd transforms,
    # hoisted out of the loop, once a call): from a call of one iteration and one of two, each timed alone
    lo, times, chunk = start, [], CHUNK or 1
    while lo < end and len(times) < 2 and CHUNK is None:
        t = time.perf_counter()
        hi = min(lo + len(times) + 1, end)
        state = jax.block_until_ready(loop(lo, hi, state))
        times.append(time.perf_counter() - t)
        bar.update(hi - lo)
        lo = hi
    if len(times) == 2:
        iteration = max(times[1] - times[0], 1e-9)
        chunk = chunk_size(max(times[0] - iteration, 0.0), iteration)
    done = None  # the call in flight and its iteration count: the bar moves when it is ready
    for lo in range(lo, end, chunk):
        hi = min(lo + chunk, end)
        state = loop(lo, hi, state)
        if done is not None:
            jax.block_until_ready(done[0])
            bar.update(done[1])
        done = (state, hi - lo)
    jax.block_until_ready(state)
    bar.update(done[1] if done else 0)
    bar.close()
    return state

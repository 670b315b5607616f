"""The sampling loop: a sampler's plan run iteration by iteration, one denoiser call each.

Pure and jit-able: params and every per-iteration array are arguments, nothing is read from outside. The loop
knows the denoiser only as a function of (x, t, conditioning) (sdjax.pipeline.denoiser composes the U-Net,
classifier-free guidance and whatever else wraps it) and runs iterations [lo, hi) of the plan from a state, so
that a caller may run it in pieces (progress between them) with one compiled executable.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sdjax.diffusion.plan import bind, iteration_noise


class Blend(NamedTuple):
    """Inpainting by latent blending (4-channel U-Nets, as diffusers): after each iteration the unmasked region
    is replaced by the image noised to the level of the next iteration."""
    image: jax.Array   # [B,h,w,c] image latents
    noise: jax.Array   # [B,h,w,c] the unit noise they are noised with
    mask: jax.Array    # [B,h,w,1] 1 = repaint
    next_a: jax.Array  # [S] x at the next iteration's level = next_a * image + next_b * noise; (1, 0) after the last
    next_b: jax.Array

    @classmethod
    def from_plan(cls, plan, image, noise, mask, end=None):
        """The blend of a plan that runs up to iteration `end` (None: all): next_a / next_b are its noise levels
        shifted by one iteration, and (1, 0) (the image itself) after the last that runs."""
        end = len(plan.timesteps) if end is None else end
        next_a = np.append(plan.noise_a[1:], 1).astype(np.float32)
        next_b = np.append(plan.noise_b[1:], 0).astype(np.float32)
        next_a[end - 1], next_b[end - 1] = 1, 0
        return cls(image, noise, mask, next_a, next_b)


def run(denoiser, sampler, options, steps, timesteps, state, conditioning, keys, lo, hi, *, blend=None,
        noise=None, per_iteration=None):
    """The sampler's state after iterations [lo, hi) of its plan (lo, hi may be traced).

    denoiser(x [B,h,w,C], t, conditioning) -> prediction [B,h,w,C]; sampler/options: a `plan.Sampler` and its
    plan's static options; steps/timesteps: the plan's per-iteration arrays [S, ...]; state: the sampler's state
    (`sampler.init(x, steps)` before the first iteration run: img2img begins at a later one, as a sliced plan
    would); keys: [B] per-image PRNG keys of the iteration noise, or noise: [S, B,h,w,c] the unit noise of every
    iteration instead; blend: a `Blend` for inpainting by latent blending; per_iteration: {name: [S, B, ...]},
    conditioning that changes by iteration (row i joins the conditioning at iteration i: ControlNets' scales).
    """
    step_fn = bind(sampler, options)
    xs = {"step": steps, "t": timesteps}
    if blend is not None:
        xs.update(next_a=blend.next_a, next_b=blend.next_b)
    if noise is not None:
        xs["noise"] = noise
    if per_iteration:
        xs["conditioning"] = per_iteration
    xs = jax.tree.map(jnp.asarray, xs)  # a plan's numpy arrays are indexed by the traced iteration
    shape = state["x"].shape[1:]

    def body(i, state):
        it = jax.tree.map(lambda a: a[i], xs)
        step = it["step"]
        out = denoiser(sampler.model_input(state, step), it["t"], {**conditioning, **it.get("conditioning", {})})
        if noise is not None:
            eps = it["noise"]
        elif sampler.noise is not None:
            eps = sampler.noise(keys, step, shape)
        else:
            eps = iteration_noise(keys, step["index"], shape)
        state = step_fn(state, out.astype(jnp.float32), step, eps)
        if blend is not None:
            proper = it["next_a"] * blend.image + it["next_b"] * blend.noise
            state = {**state, "x": (1 - blend.mask) * proper + blend.mask * state["x"]}
        return state

    return jax.lax.fori_loop(lo, hi, body, state)


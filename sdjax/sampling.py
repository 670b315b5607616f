"""The sampling loop: one `lax.scan` over a sampler's plan, the guided U-Net call inside.

Pure and jit-able: params and every per-step array are arguments, nothing is read from outside.
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


def rescale_guidance(guided, cond, rescale):
    """Guidance rescale (Lin et al. 2023, eq. 15-16): match the std of the conditional prediction."""
    axes = tuple(range(1, guided.ndim))
    std = lambda x: jnp.std(x, axis=axes, keepdims=True, ddof=1)  # noqa: E731 (torch's unbiased std)
    return rescale * guided * (std(cond) / std(guided)) + (1 - rescale) * guided


def map_images(fn, groups, *xs):
    """fn(*xs) for batch-leading arrays or pytrees of them (None passes through), computed one image per group
    at a time: the batch is `groups` groups (the devices it is sharded over; a multiple of them) and `lax.map`
    runs through each group's images in turn, so every call of fn sees one image per group, whatever the
    batch. XLA rounds dots and reductions differently for other batch sizes; this way an image's bits do not
    depend on the batch it is in. fn takes and returns batch-leading pytrees; it is called on one image
    (vmapped over the groups, which stay where they are sharded)."""
    b = jax.tree.leaves(xs)[0].shape[0]
    split = lambda x: x.reshape(groups, b // groups, *x.shape[1:]).swapaxes(0, 1)  # noqa: E731 [b/g, g, ...]
    one = lambda *a: jax.tree.map(lambda y: y[0], fn(*jax.tree.map(lambda y: y[None], a)))  # noqa: E731
    out = jax.lax.map(lambda a: jax.vmap(one)(*a), jax.tree.map(split, xs))
    return jax.tree.map(lambda y: y.swapaxes(0, 1).reshape(b, *y.shape[2:]), out)


def guided_prediction(unet_fn, x_in, t, cond, uncond, guidance_scale, guidance_rescale, groups=None):
    """U-Net output with classifier-free guidance (none when uncond is None).

    x_in: [B,h,w,C]; cond, uncond: the U-Net's conditioning, pytrees of batch-leading arrays (text [B,L,D],
    SDXL's pooled text and time ids). Each image's unconditional and conditional rows go through the U-Net
    together (a batch of 2 per image); groups: compute image by image (`map_images`), else the whole batch.
    """
    def guided(x, c, u):
        if u is None:
            return unet_fn(x, t, c)
        both = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), u, c)
        uncond_out, cond_out = jnp.split(unet_fn(jnp.concatenate([x, x]), t, both), 2)
        out = uncond_out + guidance_scale * (cond_out - uncond_out)
        return out if guidance_rescale is None else rescale_guidance(out, cond_out, guidance_rescale)
    return guided(x_in, cond, uncond) if groups is None else map_images(guided, groups, x_in, cond, uncond)


def sample(unet_fn, sampler, options, steps, timesteps, x, cond, keys, *, guidance_scale=1.0, uncond=None,
           start=0, end=None, guidance_rescale=None, concat=None, blend=None, noise=None, progress=None, groups=None):
    """Run a sampler from iteration `start` to `end` (None: the last); returns the final latents [B,h,w,c] (float32, unscaled
    by the VAE factor).

    unet_fn(x, t, cond) -> prediction, cond / uncond: the conditioning pytrees (`guided_prediction`); sampler/options: a `plan.Sampler` and its plan's static
    options; steps/timesteps: the plan's per-iteration arrays [S, ...]; start: the first iteration run (may be
    traced: img2img's strength then needs no recompilation; the sampler's state begins there, as a sliced
    plan's would); x: starting latents in the sampler's scale; keys: [B] per-image PRNG keys for stochastic
    samplers, or noise: [S, B,h,w,c] the unit noise of every iteration instead. concat: [B,h,w,k] channels
    appended to the U-Net input (mask + masked-image latents of 9-channel inpainting U-Nets). blend: a `Blend`
    for inpainting by latent blending.
    progress(index) is called from the loop body through `jax.debug.callback`.
    """
    step_fn = bind(sampler, options)
    dtype = jax.tree.leaves(cond)[0].dtype
    xs = {"step": steps, "t": timesteps}
    if blend is not None:
        xs.update(next_a=blend.next_a, next_b=blend.next_b)
    if noise is not None:
        xs["noise"] = noise

    xs = jax.tree.map(jnp.asarray, xs)  # a plan's numpy arrays are indexed by the traced iteration

    def body(i, state):
        it = jax.tree.map(lambda a: a[i], xs)
        step, t = it["step"], it["t"]
        x_in = sampler.model_input(state, step)
        if concat is not None:
            x_in = jnp.concatenate([x_in, concat], axis=-1)
        out = guided_prediction(unet_fn, x_in.astype(dtype), t, cond, uncond, guidance_scale, guidance_rescale,
                                  groups)
        if noise is not None:
            eps = it["noise"]
        elif sampler.noise is not None:
            eps = sampler.noise(keys, step, x.shape[1:])
        else:
            eps = iteration_noise(keys, step["index"], x.shape[1:])
        state = step_fn(state, out.astype(jnp.float32), step, eps)
        if blend is not None:
            proper = it["next_a"] * blend.image + it["next_b"] * blend.noise
            state = {**state, "x": (1 - blend.mask) * proper + blend.mask * state["x"]}
        if progress is not None:
            jax.debug.callback(progress, step["index"])
        return state

    end = len(timesteps) if end is None else end
    return jax.lax.fori_loop(start, end, body, sampler.init(x, steps))["x"]

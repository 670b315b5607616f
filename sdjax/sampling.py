"""The sampling loop: one `lax.scan` over a sampler's plan, the guided U-Net call inside.

Pure and jit-able: params and every per-step array are arguments, nothing is read from outside.
"""
import functools

import jax
import jax.numpy as jnp

from sdjax.models.conv import loop_constant_kernels


def rescale_guidance(guided, cond, rescale):
    """Guidance rescale (Lin et al. 2023, eq. 15-16): match the std of the conditional prediction."""
    axes = tuple(range(1, guided.ndim))
    std = lambda x: jnp.std(x, axis=axes, keepdims=True, ddof=1)  # noqa: E731 (torch's unbiased std)
    return rescale * guided * (std(cond) / std(guided)) + (1 - rescale) * guided


def guided_prediction(unet_fn, x_in, t, context, guidance_scale, guidance_rescale, cfg):
    """U-Net output with classifier-free guidance.

    x_in: [B,h,w,C]; context: [2B,L,D] (unconditional rows first) when cfg, else [B,L,D].
    The two halves go through the U-Net as one batch of 2B.
    """
    if not cfg:
        return unet_fn(x_in, t, context)
    out = unet_fn(jnp.concatenate([x_in, x_in]), t, context)
    uncond, cond = jnp.split(out, 2)
    out = uncond + guidance_scale * (cond - uncond)
    return out if guidance_rescale is None else rescale_guidance(out, cond, guidance_rescale)


def step_noise(keys, index, shape):
    """Unit normal noise per image for scan iteration `index`: keys [B] -> [B, *shape]."""
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, index), shape))(keys)


def sample(unet_fn, sampler, options, steps, timesteps, x, context, keys, *, guidance_scale, cfg, start=0,
           guidance_rescale=None, concat=None, blend=None, noise=None, progress=None):
    """Run a sampler from iteration `start` to the end; returns the final latents [B,h,w,c] (float32, unscaled
    by the VAE factor).

    unet_fn(x, t, context) -> prediction; sampler/options: a `samplers.Sampler` and its plan's static
    options; steps/timesteps: the plan's per-iteration arrays [S, ...]; start: the first iteration run (may be
    traced: img2img's strength then needs no recompilation; the sampler's state begins there, as a sliced
    plan's would); x: starting latents in the sampler's scale; keys: [B] per-image PRNG keys for stochastic
    samplers, or noise: [S, B,h,w,c] the unit noise of every iteration instead. concat: [B,h,w,k] channels
    appended to the U-Net input (mask + masked-image latents of 9-channel inpainting U-Nets). blend:
    (image_latents, noise, mask, next_a, next_b) for inpainting by latent blending: after each step the
    unmasked region is replaced by the image noised to the next level (next_a/next_b: [S], (1, 0) last).
    progress(index) is called from the loop body through `jax.debug.callback`.
    """
    step_fn = functools.partial(sampler.step, **options)
    dtype = jax.tree.leaves(context)[0].dtype
    xs = {"step": steps, "t": timesteps}
    if blend is not None:
        xs.update(next_a=blend[3], next_b=blend[4])
    if noise is not None:
        xs["noise"] = noise

    def body(i, state):
        it = jax.tree.map(lambda a: a[i], xs)
        step, t = it["step"], it["t"]
        x_in = sampler.model_input(state, step)
        if concat is not None:
            x_in = jnp.concatenate([x_in, concat], axis=-1)
        out = guided_prediction(unet_fn, x_in.astype(dtype), t, context, guidance_scale, guidance_rescale, cfg)
        eps = it["noise"] if noise is not None else step_noise(keys, step["index"], x.shape[1:])
        state = step_fn(state, out.astype(jnp.float32), step, eps)
        if blend is not None:
            image, first_noise, mask, _, _ = blend
            proper = it["next_a"] * image + it["next_b"] * first_noise
            state = {**state, "x": (1 - mask) * proper + mask * state["x"]}
        if progress is not None:
            jax.debug.callback(progress, step["index"])
        return state

    with loop_constant_kernels():  # the U-Net's weights are constants of the loop
        state = jax.lax.fori_loop(start, len(timesteps), body, sampler.init(x, steps))
    return state["x"]

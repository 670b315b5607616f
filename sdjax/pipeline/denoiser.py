"""The denoiser the sampling loop calls: a function (x, t, conditioning) -> prediction, composed of the U-Net call
and what wraps it. Each wrapper takes and returns such a function:

    denoiser = with_channels(images_apart(guided(unet_call(unet, params), scale, rescale), groups))

conditioning is a dict: "cond" (the U-Net's keyword arguments: text states [B,L,D], SDXL's pooled text and time
ids), "uncond" (the same for the negative prompts; absent without guidance) and "concat" ([B,h,w,k] channels
appended to the input: 9-channel inpainting U-Nets). Adapters are further wrappers of the U-Net call, inside
`guided` (controlnets.ControlNetCall: ControlNets' residuals, read from c["control_images"], c["control_scales"]).
"""
import jax
import jax.numpy as jnp


def unet_call(unet, params):
    """The U-Net as a denoiser: (x, t, {"cond": kwargs}) -> prediction, x cast to the conditioning's dtype."""
    def fn(x, t, c):
        dtype = jax.tree.leaves(c["cond"])[0].dtype
        return unet.apply({"params": params}, x.astype(dtype), t, **c["cond"])
    return fn


def rescale_guidance(guided, cond, rescale):
    """Guidance rescale (Lin et al. 2023, eq. 15-16): match the std of the conditional prediction."""
    axes = tuple(range(1, guided.ndim))
    std = lambda x: jnp.std(x, axis=axes, keepdims=True, ddof=1)  # noqa: E731 (torch's unbiased std)
    return rescale * guided * (std(cond) / std(guided)) + (1 - rescale) * guided


def guided(fn, scale, rescale=None):
    """Classifier-free guidance around fn: each image's unconditional (c["uncond"]) and conditional (c["cond"])
    rows go through fn together (a batch of 2 per image); none without c["uncond"]. rescale: guidance rescale,
    or None."""
    def denoise(x, t, c):
        if c.get("uncond") is None:
            return fn(x, t, c)
        both = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), c["uncond"], c["cond"])
        uncond_out, cond_out = jnp.split(fn(jnp.concatenate([x, x]), t, {**c, "cond": both}), 2)
        out = uncond_out + scale * (cond_out - uncond_out)
        return out if rescale is None else rescale_guidance(out, cond_out, rescale)
    return denoise


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


def images_apart(fn, groups):
    """fn image by image (`map_images` over x and the conditioning), or fn itself when groups is None."""
    if groups is None:
        return fn
    return lambda x, t, c: map_images(lambda x, c: fn(x, t, c), groups, x, c)


def with_channels(fn):
    """c["concat"] (when present) appended to fn's input channels."""
    def denoise(x, t, c):
        if c.get("concat") is None:
            return fn(x, t, c)
        x = jnp.concatenate([x, c["concat"].astype(x.dtype)], axis=-1)
        return fn(x, t, {k: v for k, v in c.items() if k != "concat"})
    return denoise

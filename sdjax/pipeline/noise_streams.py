"""The noise of a run: every unit-normal draw comes from image i's seed `seed + i`, by purpose, or is given."""
import jax
import jax.numpy as jnp
import numpy as np

SEEDS = 2 ** 32  # seeds are 0 .. 2^32 - 1, as UIs write them
NOISE_KINDS = ("initial", "steps", "image", "masked_image")


def image_keys(seed, n):
    """Keys of images seed..seed+n-1 by purpose: {kind: [n] keys} for kind in NOISE_KINDS (modulo 2^32).

    initial: the starting noise; steps: the per-iteration noise (folded with the iteration); image /
    masked_image: the VAE posterior samples of img2img and inpainting. Seed s gives jax.random.key(s).
    """
    seeds = jnp.asarray((np.arange(n, dtype=np.uint64) + np.uint64(seed)) % SEEDS, jnp.uint32)

    def per_image(s):
        root = jax.random.key(s)
        initial, steps = jax.random.split(root)
        image, masked = jax.random.split(jax.random.fold_in(root, 1))
        return dict(initial=initial, steps=steps, image=image, masked_image=masked)
    return jax.vmap(per_image)(seeds)


def check(given, shape, iterations, f):
    """Raise ValueError for unknown kinds or wrong shapes of given noise; shape (N, h, w, c), `iterations` the
    count that runs (noise["steps"] is [iterations, N, h, w, c])."""
    unknown = sorted(set(given) - set(NOISE_KINDS))
    if unknown:
        raise ValueError(f"noise: unknown kinds {unknown}; valid: {', '.join(NOISE_KINDS)}")
    for kind, value in given.items():
        want = ((iterations,) if kind == "steps" else ()) + tuple(shape)
        if tuple(np.shape(value)) != want:
            where = "latents" if kind == "initial" else f"noise[{kind!r}]"
            raise ValueError(f"{where} must have shape {want} ({'S, ' if kind == 'steps' else ''}N, H/{f}, "
                             f"W/{f}, C), got {np.shape(value)}")


def draw(given, shape, pad, start, end, iterations, seed):
    """{"initial", "image", "masked_image": [b,h,w,c]; "keys": [b] step keys; "steps": [iterations,b,h,w,c] if
    given, for the iterations [start, end) that run}: the given unit noise (checked by `check`), the rest drawn
    from image i's seed + i; b = N + pad rows (the pad rows repeat the last image's)."""
    keys = image_keys(seed, shape[0] + pad)
    out = {"keys": keys["steps"]}
    for kind in ("initial", "image", "masked_image"):
        if kind in given:
            x = np.asarray(given[kind], np.float32)
            out[kind] = jnp.asarray(np.concatenate([x, np.repeat(x[-1:], pad, 0)]))
        else:
            out[kind] = jax.vmap(lambda k: jax.random.normal(k, shape[1:]))(keys[kind])
    if "steps" in given:  # the iterations outside [start, end) do not run: their noise is never read
        x = np.asarray(given["steps"], np.float32)
        x = np.concatenate([x, np.repeat(x[:, -1:], pad, 1)], 1)
        out["steps"] = jnp.asarray(np.concatenate([np.zeros((start,) + x.shape[1:], np.float32), x,
                                                   np.zeros((iterations - end,) + x.shape[1:], np.float32)]))
    return out

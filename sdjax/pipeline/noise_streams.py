"""The noise of a run: every unit-normal draw comes from image i's seed (`seed + i`, or the i-th of a list of
seeds), by purpose, or is given."""
import jax
import jax.numpy as jnp
import numpy as np

SEEDS = 2 ** 32  # seeds are 0 .. 2^32 - 1, as UIs write them
# Every stream of draws of an image has its number here, never reused: the stream's key is
# fold_in(jax.random.key(seed), number); a stream drawn once per iteration (the steps', a sampler's Brownian path)
# folds the iteration index into that key. Keys made along different paths of fold_in are independent; split is
# not used (with jax's partitionable threefry, split(k)[i] is fold_in(k, i), which made the posterior keys equal
# to the step keys of iterations 0 and 1 before; "initial" and "steps" kept their keys, and text-to-image its bits).
STREAMS = {"initial": 0, "steps": 1, "image": 2, "masked_image": 3}
NOISE_KINDS = tuple(STREAMS)


def image_seeds(seed, n):
    """uint32 [n]: seed, seed + 1, ... (modulo 2^32) for an int `seed`; a list of seeds as given, its last repeated
    up to n."""
    if np.ndim(seed) == 0:
        return ((np.arange(n, dtype=np.uint64) + np.uint64(seed)) % SEEDS).astype(np.uint32)
    seeds = np.asarray(seed, np.uint64)
    return np.concatenate([seeds, np.repeat(seeds[-1:], n - len(seeds))]).astype(np.uint32)


def image_keys(seed, n):
    """Keys of images seed..seed+n-1 (or of the list `seed`, `image_seeds`) by stream: {kind: [n] keys} for kind in
    NOISE_KINDS (seeds modulo 2^32).

    initial: the starting noise; steps: the per-iteration noise (folded with the iteration); image /
    masked_image: the VAE posterior samples of img2img and inpainting. Seed s is jax.random.key(s)'s.
    """
    root = jax.vmap(jax.random.key)(jnp.asarray(image_seeds(seed, n)))
    return {kind: jax.vmap(lambda k, i=i: jax.random.fold_in(k, i))(root) for kind, i in STREAMS.items()}


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
    from image i's seed (`image_seeds`); b = N + pad rows (the pad rows repeat the last image's)."""
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

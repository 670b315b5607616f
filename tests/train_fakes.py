"""Stand-ins for the training tests: an in-memory checkpointable batch iterator and toy models."""
import os
import signal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sdjax.diffusion import schedules
from sdjax.models.autoencoder import DiagonalGaussian

# SD's noise schedule, and the CLIP ids of the empty caption.
ABAR = schedules.alphas_cumprod(schedules.scheduler_settings(
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)))
EMPTY = {"input_ids": np.r_[49406, np.full(76, 49407)].astype(np.int32)}  # the empty caption's ids


class ArrayIterator:
    """Batches {"images": float32 [b, S, S, 3] in [-1, 1], "input_ids": int32 [b, 77]} (the pipeline's format).

    Global example i is a function of (seed, i) only; process p of n takes rows [p*b, (p+1)*b) of each
    global batch of n*b, so the processes together see exactly what one process with batch n*b sees.
    From step `nan_from` on, images are NaN (to test the bad-step handling); at step `sigterm_at`
    the iterator sends this process a SIGTERM (to test preemption at a known step).
    """

    def __init__(self, batch_size, process_index=0, process_count=1, seed=0, size=16, nan_from=None,
                 sigterm_at=None):
        self.b, self.p, self.n, self.seed, self.size, self.nan_from = (
            batch_size, process_index, process_count, seed, size, nan_from)
        self.sigterm_at = sigterm_at
        self.step = 0

    def example(self, i):
        rng = np.random.default_rng([self.seed, i])
        coarse = rng.uniform(-1, 1, (4, 4, 3)).astype(np.float32)
        image = np.repeat(np.repeat(coarse, self.size // 4, 0), self.size // 4, 1)
        ids = np.full(77, 49407, np.int32)
        ids[0], ids[1:6], ids[6] = 49406, rng.integers(300, 2000, 5), 2
        return image, ids

    def __iter__(self):
        return self

    def __next__(self):
        start = self.step * self.b * self.n + self.p * self.b
        images, ids = zip(*(self.example(i) for i in range(start, start + self.b)))
        images = np.stack(images)
        if self.nan_from is not None and self.step >= self.nan_from:
            images = np.full_like(images, np.nan)
        if self.step == self.sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)
        self.step += 1
        return {"images": images, "input_ids": np.stack(ids)}

    def get_state(self):
        return {"step": self.step}

    def set_state(self, state):
        self.step = state["step"]


def fake_data(nan_from=None, sigterm_at=None):
    """A `make_data` for sdjax.train.loop.train using ArrayIterator."""
    def make(config, tokenizer, batch_size, seed, process_index, process_count):
        return ArrayIterator(batch_size, process_index, process_count, seed, config.data.image_size, nan_from,
                             sigterm_at)
    return make


class ToyVAE(nn.Module):
    """encode: images [B, H, W, 3] -> posterior over [B, H/2, W/2, 4] (a strided conv)."""
    scaling_factor: float = 0.5
    shift_factor: float | None = None
    latents_mean: tuple | None = None
    latents_std: tuple | None = None
    force_upcast: bool = False
    block_out_channels: tuple = (8, 8)  # as AutoencoderKL's: the downsampling factor 2

    @nn.compact
    def encode(self, images):
        moments = nn.Conv(8, (2, 2), strides=2, name="conv")(images)
        return DiagonalGaussian.from_moments(moments)


class ToyText(nn.Module):
    """input_ids [B, L] -> {"last_hidden_state": [B, L, 8]}."""

    @nn.compact
    def __call__(self, ids):
        return {"last_hidden_state": nn.Embed(49408, 8, name="embed")(ids)}


class ToyUNet(nn.Module):
    """x [B, h, w, 4], t [B], text [B, L, 8] -> a * x + conv(x) + dense(mean text); `a` a scalar param."""

    @nn.compact
    def __call__(self, x, t, encoder_hidden_states):
        a = self.param("a", nn.initializers.constant(0.3), ())
        bias = nn.Dense(4, name="ctx")(encoder_hidden_states.mean(1))[:, None, None, :]
        return a * x + nn.Conv(4, (3, 3), padding=1, name="conv")(x) + bias + 1e-4 * t[:, None, None, None]


def toy_setup():
    """(toy modules, their params, a batch of 8 16x16 images with per-example keys)."""
    modules = dict(unet=ToyUNet(), vae=ToyVAE(), text_encoder=ToyText())
    batch = next(ArrayIterator(8, size=16))
    z0, ids = jnp.zeros((1, 8, 8, 4)), jnp.zeros((1, 77), jnp.int32)
    params = dict(unet=ToyUNet().init(jax.random.key(0), z0, jnp.zeros((1,)), jnp.zeros((1, 77, 8)))["params"],
                  vae=ToyVAE().init(jax.random.key(1), batch["images"][:1], method="encode")["params"],
                  text_encoder=ToyText().init(jax.random.key(2), ids)["params"])
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(7), i))(jnp.arange(8))
    return modules, params, {**batch, "key": keys}

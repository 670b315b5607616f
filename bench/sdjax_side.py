"""The sdjax side of the benchmark: each case compiled ahead of time, with XLA's FLOP count and memory."""
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench import common


def analysis(compiled):
    """(XLA's FLOP count, bytes of arguments + outputs + temporaries less aliased ones) of a compiled function."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    mem = compiled.memory_analysis()
    return (float(cost.get("flops", 0.0)) if cost else 0.0,
            (mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
             - mem.alias_size_in_bytes) if mem is not None else 0)


class Case:
    """A compiled function and its arguments; `run()` executes it once and waits for the result."""

    def __init__(self, fn, *args, donate=()):
        t0 = time.perf_counter()
        self.compiled = jax.jit(fn, donate_argnums=donate).lower(*args).compile()
        self.compile_s = time.perf_counter() - t0
        self.args, self.donate = list(args), donate
        self.flops, self.xla_bytes = analysis(self.compiled)

    def run(self):
        out = jax.block_until_ready(self.compiled(*self.args))
        for i in self.donate:  # donated inputs are consumed: feed the outputs back in (train state)
            self.args[i] = out[i]


class Sdjax:
    name = "sdjax"

    def __init__(self, folder, dtype):
        from sdjax.pipeline import StableDiffusion
        self.sd = StableDiffusion.load(folder, dtype=dtype)
        self.dtype = dtype

    def text_encode(self, spec):
        from sdjax.text.tokenizer import tokenize
        ids, _ = tokenize(self.sd.tokenizer, [common.PROMPT, ""], self.sd.text_encoder.max_position_embeddings)
        te = self.sd.text_encoder
        return Case(lambda p, i: te.apply({"params": p}, i)["last_hidden_state"],
                    self.sd.params["text_encoder"], jnp.asarray(ids))

    def _context(self):
        te = self.sd.text_encoder
        return jnp.zeros((2, te.max_position_embeddings, te.hidden_size), jnp.dtype(self.dtype))

    def unet_cfg(self, spec):
        """The guided U-Net call of the sampling loop (one image and its unconditional twin, batch 2)."""
        from sdjax.pipeline.denoiser import guided
        unet = self.sd.unet

        def fn(p, x, t, ctx):
            unet_fn = lambda x, t, c: unet.apply({"params": p}, x, t, c["cond"])  # noqa: E731
            return guided(unet_fn, common.GUIDANCE)(x, t, {"cond": ctx[1:], "uncond": ctx[:1]})
        x = jnp.asarray(common.latents(spec, self.sd.latent_channels, self.sd.vae_scale_factor))
        return Case(fn, self.sd.params["unet"], x.astype(jnp.dtype(self.dtype)), jnp.asarray(500), self._context())

    def vae_decode(self, spec):
        from sdjax.models.autoencoder import from_latents
        vae = self.sd.vae
        z = common.latents(spec, self.sd.latent_channels, self.sd.vae_scale_factor)
        return Case(lambda p, z: from_latents(vae, p, z), self.sd.params["vae"], jnp.asarray(z, jnp.dtype(self.dtype)))

    def sample(self, spec):
        """The whole pipeline: text encoding, `steps` DPM++ steps with guidance, VAE decoding.

        It compiles in the harness's warm-up call; FLOPs and memory are read after that."""
        pipe = self.sd

        class Sample:
            compile_s = None

            def run(self):
                pipe.generate([common.PROMPT] * spec.get("batch", 1), num_steps=spec["steps"], guidance_scale=common.GUIDANCE,
                              sampler="dpmpp_2m", height=spec["size"], width=spec["size"], progress=False)
                self.compile_s = pipe.last_timings.get("compile_sample", self.compile_s)
                self.loop_s = pipe.last_timings["sample"]  # the denoising loop alone

            @property
            def _analysis(self):
                return analysis(pipe.last_compiled["sample"])

            @property
            def flops(self):  # XLA counts a loop body once: the denoising loop is about `steps` times that
                return self._analysis[0] * spec["steps"]

            @property
            def xla_bytes(self):
                return self._analysis[1]
        return Sample()

    def train_step(self, spec):
        """One U-Net step at spec["size"] / spec["batch"]: forward, backward, AdamW; state donated."""
        import optax
        from sdjax.train.ldm import ldm_losses as losses
        unet, b = self.sd.unet, spec["batch"]
        params = jax.tree.map(lambda x: x.astype(jnp.float32), self.sd.params["unet"])  # fp32 masters
        compute = unet.clone(dtype=jnp.dtype(self.dtype))
        tx = optax.adamw(**common.ADAMW)

        def step(params, opt_state, x, t, ctx, eps):
            def loss_fn(p):
                return losses.weighted_mse(compute.apply({"params": p}, x, t, ctx), eps, jnp.ones((b,)))
            loss, grads = jax.value_and_grad(loss_fn)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss
        x = jnp.asarray(common.latents(spec, self.sd.latent_channels, self.sd.vae_scale_factor, b))
        te = self.sd.text_encoder
        ctx = jnp.asarray(np.random.default_rng(1).standard_normal((b, 77, te.hidden_size), np.float32))
        self.sd.params["unet"] = None  # the step owns the (fp32) weights now: keep one copy in memory
        return Case(step, params, tx.init(params), x, jnp.full((b,), 500), ctx, jnp.asarray(x), donate=(0, 1))


def device_peak_bytes():
    """Peak memory in use on the first device since the process started (GPU/TPU allocator stats), or None."""
    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def matmul_peak(dtype, n=4096, repeats=5):
    """Measured FLOP/s of an n x n matmul in `dtype` (the machine's practical peak)."""
    a = jnp.ones((n, n), jnp.dtype(dtype))
    f = jax.jit(lambda a, b: a @ b).lower(a, a).compile()
    jax.block_until_ready(f(a, a))
    t = common.median([common.timed(lambda: jax.block_until_ready(f(a, a))) for _ in range(repeats)])
    return 2 * n ** 3 / t

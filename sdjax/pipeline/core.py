"""The pipeline's machinery, common to the model families: a loaded model on the local devices, its compiled pieces,
and `generate` from prompts (a family's conditioning) to images. The public classes are in api.py."""
import dataclasses
import functools
import logging
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sdjax import sampling
from sdjax.diffusion import plan as plan_lib, samplers as samplers_lib
from sdjax.models.attention import implementation as attention_implementation
from sdjax.models.autoencoder import from_latents, to_latents
from sdjax.pipeline import denoiser as denoiser_lib, image_inputs, loop_calls, noise_streams, prompts as prompts_lib
from sdjax.pipeline.arguments import validate
from sdjax.pipeline.controlnets import ControlNets
from sdjax.pipeline.embeddings import Embeddings
from sdjax.pipeline.executables import ExecutableCache
from sdjax.pipeline.loras import Loras

log = logging.getLogger("sdjax")
def _host(x):
    """A (global) array as numpy: with several processes, every one takes part."""
    return np.asarray(x if x.is_fully_addressable else multihost_utils.process_allgather(x, tiled=True))


def _put(x, sharding):
    """x laid out by `sharding`. Over several processes' devices (a training run's mesh), a value of this
    process's (numpy, or on its devices; the same in every process) is put where each of them holds its part."""
    if sharding.is_fully_addressable or (isinstance(x, jax.Array) and not x.is_fully_addressable):
        return jax.device_put(x, sharding)
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return jax.random.wrap_key_data(_put(jax.random.key_data(x), sharding), impl=jax.random.key_impl(x))
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


class Pipeline:
    """A loaded model (`weights.pretrained.Pretrained`) and its family's `conditioning` (conditioning.py,
    conditioning_xl.py) on all local devices, or on `mesh`. Thread-safe: a call keeps its state to itself."""

    def __init__(self, pretrained, conditioning, mesh=None):
        self.unet, self.vae = pretrained.modules["unet"], pretrained.modules["vae"]
        self.conditioning = conditioning
        self.scheduler_config = dict(pretrained.scheduler)
        self.vae_scale_factor = 2 ** (len(self.vae.block_out_channels) - 1)
        self.latent_channels = self.vae.latent_channels
        if mesh is None:  # the local devices, each with the whole model
            self.mesh = Mesh(np.array(jax.local_devices()), ("data",))
            self.params = jax.device_put(pretrained.params, NamedSharding(self.mesh, P()))
        else:  # the caller's mesh and the params as laid out on it (a training run's shards): no copy is made;
            self.mesh, self.params = mesh, pretrained.params  # with several processes, all of them call generate
        self._rows = P(self.mesh.axis_names)  # a batch is split over every device
        self.pretrained = dataclasses.replace(pretrained, params=self.params)  # the host copies can go
        # image by image (denoiser.map_images): an image's bits do not depend on its batch. On CPU that costs
        # little (an image is a large matmul already); accelerators keep whole batches
        self.per_image = jax.default_backend() == "cpu"
        self.attention = "auto"  # attention.IMPLEMENTATIONS: "auto" chooses per platform when compiling
        # what defines every compiled piece besides its arguments: the modules (their configurations) and params
        self._executables = ExecutableCache(repr((sorted((k, repr(m)) for k, m in pretrained.modules.items()),
                                                  jax.tree.structure(self.params))))
        self._calls = threading.local()  # per thread: the timings and executables of its last call
        # adapters: functions of the params (and of the towers' vocabularies), applied outside the compiled pieces
        self._loras, self._embeddings = Loras(self.params), Embeddings(self.params, conditioning)
        self._controlnets = ControlNets(self.unet, self.latent_channels,
                                        lambda p: _put(p, NamedSharding(self.mesh, P())))

    def replicate(self, mesh):
        """Lay the params (LoRAs and embeddings as loaded) out whole on every device of `mesh`, which may span several
        processes (each calls this with the same model), before the first `generate`: a batch is then split over
        all the mesh's devices; every process calls `generate` with the same arguments and gets all the images."""
        sharding = NamedSharding(mesh, P())
        self.params.update(jax.tree.map(lambda x: _put(np.asarray(x), sharding), dict(self.params)))
        self.mesh, self._rows = mesh, P(mesh.axis_names)

    @property
    def compile_count(self):
        """Compilations so far (a repeated call with the same shapes and options compiles nothing)."""
        return self._executables.count

    @property
    def last_timings(self):
        """Compile and run seconds of this thread's last call, by part."""
        return getattr(self._calls, "timings", {})

    @property
    def last_compiled(self):
        """The compiled executables of this thread's last call, by part (XLA's cost/memory analyses)."""
        return getattr(self._calls, "compiled", {})

    def default_sampler(self):
        """The sampler diffusers would run with this model's scheduler_config.json (a class no sampler reproduces:
        "ddim", with a warning)."""
        chosen = samplers_lib.scheduler_sampler(self.scheduler_config)
        if chosen is None:
            log.warning("the model's scheduler %s is not one sdjax reproduces: sampling with 'ddim' (choose one with "
                        "sampler=)", self.scheduler_config.get("_class_name"))
            return "ddim"
        return chosen[0]

    # ---- compiled pieces ----

    def _compile(self, name, fn, *args, **static):
        """fn(*args, **static) compiled once per (name, static, argument shapes), under this pipeline's attention
        setting; whole batches (accelerators) are attended device by device, image by image each image is."""
        if not hasattr(self._calls, "timings"):
            self._calls.timings, self._calls.compiled = {}, {}
        context = (self.per_image, self.attention)
        scope = lambda: attention_implementation(self.attention, None if self.per_image else self.mesh)  # noqa: E731
        compiled = self._executables.get(name, fn, args, static, context, scope, self._calls.timings)
        self._calls.compiled[name] = compiled
        return compiled

    def _run(self, name, fn, *args, **static):
        """Call `fn(*args, **static)`, compiled once per (name, static, argument shapes)."""
        return self._compile(name, fn, *args, **static)(*args)

    def _batched(self, fn):
        """fn(params, *batch-leading arrays, **static), image by image when `per_image`."""
        if not self.per_image:
            return fn
        groups = self.mesh.devices.size
        return lambda p, *xs, **static: denoiser_lib.map_images(functools.partial(fn, p, **static), groups, *xs)

    def _shard(self, x):
        """Put a batch-leading array on the mesh's devices, split along the batch axis."""
        return _put(x, NamedSharding(self.mesh, self._rows))

    def chunks(self, text_lists, weighting=True):
        """The token chunks the longest prompt of `text_lists` (lists of prompts) needs (each tower alike)."""
        _, _, tokenizer = self.conditioning.towers[0]
        expand = self._embeddings.expand
        return max(prompts_lib.chunk_count(tokenizer, [expand(t) for t in texts], weighting) for texts in text_lists)

    def encode_text(self, texts, clip_skip=0, chunks=None, weighting=True):
        """texts: a list of B prompts per text tower -> the towers' states [B, K*L, D] (SDXL: (states, pooled
        [B, P])) of the prompts in K chunks (`chunks`, or as many as the longest needs)."""
        towers = self.conditioning.towers
        chunks = chunks or self.chunks(texts, weighting)
        texts = [[self._embeddings.expand(t) for t in tower_texts] for tower_texts in texts]
        ids, weights = zip(*(prompts_lib.token_chunks(tok, t, tower.max_position_embeddings, weighting, chunks)
                             for (_, tower, tok), t in zip(towers, texts)))
        weights = None if (weights[0] == 1).all() else jnp.asarray(weights[0])
        fn = prompts_lib.encoder([(name, tower) for name, tower, _ in towers], self.conditioning.xl)
        params = {name: self.params[name] for name, _, _ in towers}
        return self._run("text", self._batched(fn), params, [jnp.asarray(i) for i in ids], weights,
                         clip_skip=clip_skip)

    def encode_images(self, images, noise=None):
        """[B,H,W,3] in [-1, 1] -> scaled latents [B,H/f,W/f,c]: the posterior mean, or with unit `noise`
        [B,H/f,W/f,c] the posterior sample mean + std * noise (diffusers' retrieve_latents)."""
        fn = functools.partial(to_latents, self.vae)
        return self._run("vae_encode", self._batched(fn), self.params["vae"], jnp.asarray(images, jnp.float32), noise)

    def decode_latents(self, latents):
        """Scaled latents [B,h,w,c] -> images float32 [B,H,W,3] in [0, 1]."""
        fn = lambda p, z: jnp.clip(from_latents(self.vae, p, z).astype(jnp.float32) / 2 + 0.5, 0, 1)  # noqa: E731
        return self._run("vae_decode", self._batched(fn), self.params["vae"], latents)

    # ---- generation ----

    def generate(self, prompt, negative_prompt=None, num_steps=50, guidance_scale=7.5, sampler=None,
                 seed=0, height=None, width=None, latents=None, eta=0.0, image=None, mask=None,
                 strength=None, guidance_rescale=0.0, num_images_per_prompt=1, clip_skip=0, sample_posterior=True,
                 noise=None, denoising_start=None, denoising_end=None, output_type="uint8", progress=True,
                 prompt_weighting=True, conditioning=None, control_image=None, controlnet_conditioning_scale=1.0,
                 guess_mode=False, control_guidance_start=0.0, control_guidance_end=1.0, **sampler_options):
        """Images for `prompt` (str or list): uint8 [N, H, W, 3] (or float32 in [0, 1] with output_type="np",
        or the final latents [N, H/f, W/f, c] with output_type="latent").

        sampler: a name of diffusion.samplers.SAMPLERS; None: the model's own scheduler (`default_sampler`), as
        diffusers. Image i of the batch is drawn from seed `seed + i` (seeds in [0, 2^32)), or from `seed[i]`
        when `seed` is a list of one seed per image, so it is the same picture alone or in a batch. Prompts may be longer than the text tower's 77 tokens (75-token chunks) and
        use AUTOMATIC1111's emphasis, `(word:1.3)`, `[word]`, `BREAK` (prompt_weighting=False: read literally).
        image (+ mask, white = repaint): img2img with `strength` (default 0.8, SDXL 0.3; the output keeps the
        image's size, rounded down to a multiple of the VAE's factor, unless height/width are given), or
        inpainting (strength 1.0, at the model's default size); the image is encoded as a posterior sample
        (sample_posterior=False: its mean); it may also be latents [1 or N, H/f, W/f, c] (output_type="latent"'s).
        clip_skip: condition on the text encoder's layer that many before the last (the prompt's; the negative
        prompt's is the last, as diffusers).
        denoising_end / denoising_start (fractions of the training timesteps, as diffusers' SDXL pipelines):
        stop where that fraction of the noise is removed, and continue from there on image= latents, which
        are then taken as they are (strength is ignored): a base model hands its latents to a refiner.
        noise: {kind: unit noise} replacing the draws from the seed (noise_streams.NOISE_KINDS; "initial",
        "image", "masked_image": [N, H/f, W/f, c]; "steps": [S, N, H/f, W/f, c] for the S iterations that run);
        latents= is noise={"initial": latents} (diffusers' `latents=`). conditioning: what a model family adds
        to the prompts (StableDiffusionXL.generate fills it).
        control_image: one image per loaded ControlNet (PIL, uint8 array: resized; float [H, W, 3] in [0, 1] at the
        output size), which sets the output size when nothing else does; controlnet_conditioning_scale,
        control_guidance_start / _end (fractions of the iterations that run): one value, or one per ControlNet;
        guess_mode: the ControlNets see the conditional half of guidance only (diffusers' names and meaning).
        """
        self._calls.timings, self._calls.compiled = {}, {}
        if output_type not in ("uint8", "np", "latent"):
            raise ValueError(f"output_type must be 'uint8', 'np' or 'latent', got {output_type!r}")
        prompts, negatives = prompts_lib.prompt_lists(prompt, negative_prompt, num_images_per_prompt)
        n, f = len(prompts), self.vae_scale_factor
        control = self._controlnets.control(control_image, controlnet_conditioning_scale, guess_mode,
                                            control_guidance_start, control_guidance_end)
        default = control.default_size(image, f) or (self.unet.sample_size * f,) * 2
        height, width = image_inputs.output_size(image, mask, height, width, default, f)
        sampler = self.default_sampler() if sampler is None else sampler
        if strength is None:
            strength = self.conditioning.default_strength["inpaint" if mask is not None else "img2img"]
        validate(self, num_steps, sampler, height, width, strength, image, mask, seed, n, clip_skip,
                 guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, eta=eta,
                 denoising_start=denoising_start, denoising_end=denoising_end)
        noise = {**(noise or {}), **({} if latents is None else {"initial": latents})}

        # Host-side plan; every array goes into the compiled loop as an argument.
        # eta goes to every sampler that takes one (DDIM, TCD), as diffusers' pipelines pass theirs
        options = dict(sampler_options, eta=eta) if "eta" in samplers_lib.plan_options(sampler) else sampler_options
        settings, options = samplers_lib.configure(sampler, self.scheduler_config, **options)
        plan = samplers_lib.SAMPLERS[sampler].plan(settings, num_steps, **options)
        start, end = plan_lib.span(plan, settings["num_train_timesteps"], num_steps,
                                   strength if image is not None else None, denoising_start, denoising_end)
        shape = (n, height // f, width // f, self.latent_channels)
        noise_streams.check(noise, shape, end - start, f)
        pad = -n % self.mesh.devices.size  # the batch is padded to a multiple of the device count
        noise = noise_streams.draw(noise, shape, pad, start, end, len(plan.timesteps), seed)
        rows, per_iteration = control.inputs(height, width, n + pad, len(plan.timesteps), start, end)
        cond, uncond = self.conditioning.unet_inputs(self, prompts, negatives, guidance_scale > 1, clip_skip,
                                                     (height, width), conditioning, pad, prompt_weighting)
        batch = self._batch(cond, uncond, noise, image, mask, height, width, n + pad, sample_posterior, plan, end,
                            rows, per_iteration)
        # Where the loop starts: from the image noised to the first level that runs (diffusers' add_noise),
        # or, for inpainting at full strength, from pure noise, as diffusers does; denoising_start: from the
        # given latents as they are.
        pure = image is None or (mask is not None and strength == 1 and denoising_start is None)
        first = ((1.0, 0.0) if denoising_start is not None else (0.0, plan.init_noise_sigma) if pure
                 else (plan.noise_a[start], plan.noise_b[start]))
        out = self._sample(plan, batch, start, end, first, guidance_scale, guidance_rescale, sampler,
                           f"{sampler} x{n}" if progress else None, control.adapters())
        if output_type == "latent":
            return _host(out)[:n]
        images = _host(self.decode_latents(out))[:n]
        return images if output_type == "np" else (images * 255).round().astype(np.uint8)

    def _sample(self, plan, batch, start, end, first, scale, rescale, sampler, progress, adapters=((), ())):
        """The final latents of the loop over iterations [start, end), run in calls of one compiled executable, a
        number of iterations each (`chunk_size`); progress is shown between calls (when `progress` is a
        description), the next call already queued. adapters: (the loop's static wrappers of the U-Net call,
        their params)."""
        options = tuple(sorted(plan.options.items()))
        replicated = NamedSharding(self.mesh, P())
        steps, timesteps, first, scale, rescale = jax.tree.map(  # once, not at every call
            lambda x: _put(x, replicated),
            (plan.steps, plan.timesteps, np.asarray(first, np.float32), np.float32(scale), np.float32(rescale)))
        init = self._compile("sample", loop_calls.start_state, steps, batch, first, sampler=sampler)
        state = init(steps, batch, first)
        args = lambda lo, hi, state: (self.params["unet"], steps, timesteps, batch, state, np.int32(lo),  # noqa: E731
                                      np.int32(hi), scale, rescale, adapters[1])
        loop = self._compile("sample", functools.partial(loop_calls.run_iterations, self.unet),
                             *args(start, end, state),
                             sampler=sampler, options=options, rescaled=bool(rescale),
                             groups=self.mesh.devices.size if self.per_image else None, adapters=adapters[0])
        t0 = time.perf_counter()
        state = loop_calls.run_in_calls(lambda lo, hi, state: loop(*args(lo, hi, state)), state, start, end,
                                        progress)
        self._calls.timings["sample"] = time.perf_counter() - t0
        return state["x"]

    def _batch(self, cond, uncond, noise, image, mask, height, width, b, sample_posterior, plan, end, rows,
               per_iteration):
        """The loop's per-image inputs, on the devices: noise, step keys (or step noise), the conditioning, image /
        mask inputs of img2img and inpainting, adapters' `rows` ({name: [b, ...]}) and `per_iteration`
        conditioning ({name: [S, b, ...]})."""
        batch = dict(noise=noise["initial"], keys=noise["keys"], cond=cond, **rows)
        if uncond is not None:
            batch["uncond"] = uncond
        if image is not None:
            batch.update(self._image_inputs(image, mask, height, width, b, noise, sample_posterior))
        batch = jax.tree.map(self._shard, batch)
        if "mask" in batch:
            batch["blend"] = sampling.Blend.from_plan(plan, batch["image_latents"], batch["noise"], batch.pop("mask"),
                                                      end)
        by_iteration = lambda x: _put(x, NamedSharding(self.mesh, P(None, *self._rows)))  # noqa: E731
        if "steps" in noise:
            batch["step_noise"] = by_iteration(noise["steps"])
        if per_iteration:
            batch["per_iteration"] = jax.tree.map(by_iteration, per_iteration)
        return batch

    def _image_inputs(self, image, mask, height, width, b, noise, sample_posterior):
        """Batch inputs of img2img / inpainting: image latents (encoded, or given), and the mask (blending) or
        the mask + masked-image latents appended to a 9-channel U-Net's input."""
        eps = lambda kind: noise[kind] if sample_posterior else None  # noqa: E731
        if image_inputs.is_latents(image):
            z = np.asarray(image, np.float32)
            z = np.repeat(z, b, 0) if len(z) == 1 else np.concatenate([z, np.repeat(z[-1:], b - len(z), 0)])
            out = {"image_latents": jnp.asarray(z)}
        else:
            img = image_inputs.to_image_array(image, height, width)
            out = {"image_latents": self.encode_images(np.repeat(img[None], b, 0), eps("image"))}
        if mask is not None:
            f = self.vae_scale_factor
            m = image_inputs.to_mask_array(mask, height, width)
            m_lat = np.broadcast_to(m[::f, ::f, None], (b, height // f, width // f, 1)).astype(np.float32)
            if self.unet.in_channels == 2 * self.latent_channels + 1:
                masked = self.encode_images(np.repeat((img * (m[..., None] < 0.5))[None], b, 0), eps("masked_image"))
                out["concat"] = jnp.concatenate([jnp.asarray(m_lat), masked], axis=-1)
            else:
                out["mask"] = jnp.asarray(m_lat)
        return out

"""The public API: `StableDiffusion.load(path)` and `generate(prompt, ...)` -> uint8 images."""
import dataclasses
import functools
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from PIL import Image
from tqdm.auto import tqdm

from sdjax import sampling
from sdjax.diffusion import samplers as samplers_lib
from sdjax.models.attention import IMPLEMENTATIONS, implementation as attention_implementation
from sdjax.models.autoencoder import from_latents, to_latents
from sdjax.models.conv import loop_constant_kernels
from sdjax.text.tokenizer import tokenize
from sdjax.weights.pretrained import load_pretrained

log = logging.getLogger("sdjax")


def _as_list(x, name):
    if isinstance(x, str):
        return [x]
    if not x or not all(isinstance(p, str) for p in x):
        raise ValueError(f"{name} must be a string or a non-empty list of strings, got {x!r}")
    return list(x)


def to_image_array(image, height, width):
    """PIL image / array [H,W,3] (uint8 or float in [0,1]) -> float32 [H,W,3] in [-1, 1], resized to (height, width)."""
    if not isinstance(image, Image.Image):
        a = np.asarray(image)
        image = Image.fromarray(a if a.dtype == np.uint8 else (np.clip(a, 0, 1) * 255).round().astype(np.uint8))
    image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.LANCZOS)
    return np.asarray(image, np.float32) / 127.5 - 1


def to_mask_array(mask, height, width):
    """PIL image / array [H,W] (white = repaint) -> float32 [H,W] of {0, 1}."""
    if not isinstance(mask, Image.Image):
        a = np.asarray(mask)
        a = a if a.dtype == np.uint8 else (np.clip(a, 0, 1) * 255).round().astype(np.uint8)
        mask = Image.fromarray(a[..., 0] if a.ndim == 3 else a)
    mask = mask.convert("L")
    if mask.size != (width, height):
        mask = mask.resize((width, height), Image.LANCZOS)
    return (np.asarray(mask, np.float32) / 255 >= 0.5).astype(np.float32)


def _prompt_lists(prompt, negative_prompt, per_prompt):
    """(prompts, negative prompts), one per image: each prompt repeated `per_prompt` times."""
    given = _as_list(prompt, "prompt")
    negatives = [""] if negative_prompt is None else _as_list(negative_prompt, "negative_prompt")
    negatives = negatives * len(given) if len(negatives) == 1 else negatives
    if len(negatives) != len(given):
        raise ValueError(f"{len(negatives)} negative prompts for {len(given)} prompts")
    repeat = lambda items: [x for x in items for _ in range(per_prompt)]  # noqa: E731
    return repeat(given), repeat(negatives)


def denoise(unet, params, steps, timesteps, batch, start, end, first, scale, rescale, *, sampler, options, rescaled,
            groups, progress):
    """The sampling loop on a batch (`StableDiffusion._batch`) -> final latents [b,h,w,c], from x =
    first[0] * image_latents + first[1] * noise at iteration `start` to before `end`. The keyword arguments
    are static."""
    x = first[1] * batch["noise"]
    if "image_latents" in batch:
        x = x + first[0] * batch["image_latents"]
    with loop_constant_kernels():  # the U-Net's weights are constants of the loop: transform them once
        return sampling.sample(
            lambda x, t, c: unet.apply({"params": params}, x, t, **c), samplers_lib.SAMPLERS[sampler], dict(options),
            steps, timesteps, x, batch["cond"], batch["keys"], guidance_scale=scale, uncond=batch.get("uncond"),
            start=start, end=end, guidance_rescale=rescale if rescaled else None, concat=batch.get("concat"),
            blend=batch.get("blend"), noise=batch.get("step_noise"), progress=progress, groups=groups)


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


class StableDiffusion:
    """Text-to-image, img2img and inpainting with a loaded Stable Diffusion checkpoint (SDXL: pipeline_xl)."""

    def __new__(cls, pretrained=None):
        """StableDiffusion(pretrained) of an SDXL model is a `pipeline_xl.StableDiffusionXL`."""
        if cls is StableDiffusion and pretrained is not None and "text_encoder_2" in pretrained.modules:
            from sdjax.pipeline_xl import StableDiffusionXL
            cls = StableDiffusionXL
        return super().__new__(cls)

    def __init__(self, pretrained):
        self.unet, self.vae = pretrained.modules["unet"], pretrained.modules["vae"]
        self.text_encoder = pretrained.modules.get("text_encoder")  # None: the SDXL refiner's
        self.tokenizer = pretrained.tokenizer
        self.scheduler_config = dict(pretrained.scheduler)
        self.vae_scale_factor = 2 ** (len(self.vae.block_out_channels) - 1)
        self.latent_channels = self.vae.latent_channels
        self.mesh = Mesh(np.array(jax.local_devices()), ("data",))
        self.params = jax.device_put(pretrained.params, NamedSharding(self.mesh, P()))
        self.pretrained = dataclasses.replace(pretrained, params=self.params)  # the host copies can go
        # image by image (sampling.map_images): an image's bits do not depend on its batch. On CPU that costs
        # little (an image is a large matmul already); accelerators keep whole batches
        self.per_image = jax.default_backend() == "cpu"
        self.attention = "auto"  # attention.IMPLEMENTATIONS: "auto" chooses per platform when compiling
        self._compiled = {}
        self.compile_count = 0
        self.last_timings = {}  # compile and run seconds of the last call, by part
        self.last_compiled = {}  # the compiled executables of the last call, by part (XLA's cost/memory analyses)

    @classmethod
    def load(cls, path, dtype="float32", attention="auto", **options):
        """A pipeline over a diffusers folder or a single-file checkpoint; options as `load_pretrained`'s;
        attention: one of models.attention.IMPLEMENTATIONS ("auto": the platform's fastest)."""
        if attention not in IMPLEMENTATIONS:
            raise ValueError(f"attention must be one of {IMPLEMENTATIONS}, got {attention!r}")
        if attention in ("flash", "cudnn") and jax.default_backend() == "cpu":
            raise ValueError(f"attention {attention!r} is a GPU/TPU kernel and jax computes on the CPU here; "
                             "use 'auto', 'chunked' or 'xla'")
        sd = cls(load_pretrained(path, dtype=dtype, **options))  # an SDXL model: a StableDiffusionXL
        sd.attention = attention
        return sd

    # ---- compiled pieces ----

    def _compile(self, name, fn, *args, **static):
        """fn(*args, **static) compiled once per (name, static, argument shapes); compile time is recorded.
        The static keyword arguments are the compile key and what fn receives: nothing else may vary."""
        sig = (name, tuple(sorted(static.items())), self.per_image, self.attention, jax.tree.structure(args),
               tuple((x.shape, x.dtype) for x in jax.tree.leaves(args)))
        if sig not in self._compiled:
            t0 = time.perf_counter()
            # whole batches (accelerators) are attended device by device; image by image, each image is
            with attention_implementation(self.attention, None if self.per_image else self.mesh):
                self._compiled[sig] = jax.jit(functools.partial(fn, **static)).lower(*args).compile()
            self.compile_count += 1
            self.last_timings[f"compile_{name}"] = time.perf_counter() - t0
        self.last_compiled[name] = self._compiled[sig]
        return self._compiled[sig]

    def _run(self, name, fn, *args, **static):
        """Call `fn(*args, **static)`, compiled once per (name, static, argument shapes)."""
        return self._compile(name, fn, *args, **static)(*args)

    def _batched(self, fn):
        """fn(params, *batch-leading arrays, **static), image by image when `per_image`."""
        if not self.per_image:
            return fn
        groups = self.mesh.devices.size
        return lambda p, *xs, **static: sampling.map_images(functools.partial(fn, p, **static), groups, *xs)

    def _shard(self, x):
        """Put a batch-leading array on all local devices along the batch axis."""
        return jax.device_put(x, NamedSharding(self.mesh, P("data")))

    def encode_prompts(self, prompts, clip_skip=0):
        """list of str -> text embeddings [B, 77, D]: the final-normed output of the text encoder's last layer,
        or, with clip_skip=k, of the layer k before it (diffusers' clip_skip)."""
        ids, truncated = tokenize(self.tokenizer, prompts, self.text_encoder.max_position_embeddings)
        if truncated:
            log.warning("a prompt is longer than %d tokens and was truncated (as the reference does)",
                        self.text_encoder.max_position_embeddings)
        fn = lambda p, i, clip_skip: self.text_encoder.apply({"params": p}, i, clip_skip)["last_hidden_state"]  # noqa: E731
        return self._run("text", self._batched(fn), self.params["text_encoder"], jnp.asarray(ids), clip_skip=clip_skip)

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

    def _validate(self, num_steps, sampler, height, width, strength, image, mask, seed=0, n=1, clip_skip=0,
                  guidance_scale=0.0, guidance_rescale=0.0, eta=0.0, denoising_start=None, denoising_end=None):
        numbers = dict(guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, eta=eta, strength=strength)
        for name, value in numbers.items():  # NaN passes every comparison below; it would sample NaN images
            if not np.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value}")
        f = self.vae_scale_factor
        if height % f or width % f or height <= 0 or width <= 0:
            raise ValueError(f"height and width must be positive multiples of {f}, got {height}x{width}")
        if not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
        if sampler not in samplers_lib.SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; valid: {', '.join(sorted(samplers_lib.SAMPLERS))}")
        for name, value in (("denoising_start", denoising_start), ("denoising_end", denoising_end)):
            if value is not None and not (isinstance(value, (int, float)) and 0 < value < 1):
                raise ValueError(f"{name} must be a fraction in (0, 1), got {value!r}")
        if denoising_start is not None and image is None:
            raise ValueError("denoising_start continues from an image: give image= (latents from output_type='latent')")
        if None not in (denoising_start, denoising_end) and denoising_start >= denoising_end:
            raise ValueError(f"denoising_start {denoising_start} must be below denoising_end {denoising_end}")
        if image is not None and not 0 < strength <= 1:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        if mask is not None and image is None:
            raise ValueError("a mask needs an image to inpaint")
        if image is not None and denoising_start is None and int(num_steps * strength) < 1:
            raise ValueError(f"num_steps * strength must be >= 1 (got {num_steps} * {strength}): nothing to denoise")
        if _is_latents(image):
            want = (height // f, width // f, self.latent_channels)
            if tuple(np.shape(image)[1:]) != want or np.shape(image)[0] not in (1, n):
                raise ValueError(f"image latents must have shape (1 or {n}, {', '.join(map(str, want))}) for "
                                 f"{height}x{width} images, got {np.shape(image)}")
        if mask is not None and np.asarray(_size(mask)).tolist() != np.asarray(_size(image, f)).tolist():
            raise ValueError(f"mask size {_size(mask)} differs from image size {_size(image, f)}")
        inpaint_unet = self.unet.in_channels == 2 * self.latent_channels + 1
        if inpaint_unet and mask is None:
            raise ValueError("this is an inpainting U-Net (9 input channels): give image= and mask=")
        if inpaint_unet and _is_latents(image):
            raise ValueError("an inpainting U-Net (9 input channels) needs the image itself, not latents")
        if not isinstance(seed, (int, np.integer)) or not 0 <= seed <= SEEDS - n:
            raise ValueError(f"seed must be an integer in [0, 2^32 - {n}] for {n} image(s), got {seed!r}")
        self._validate_clip_skip(clip_skip)

    def _validate_clip_skip(self, clip_skip):
        layers = self.text_encoder.num_hidden_layers
        if not isinstance(clip_skip, int) or not 0 <= clip_skip < layers:
            raise ValueError(f"clip_skip must be an integer in [0, {layers - 1}], got {clip_skip!r}")

    def generate(self, prompt, negative_prompt=None, num_steps=50, guidance_scale=7.5, sampler="ddim",
                 seed=0, height=None, width=None, latents=None, eta=0.0, image=None, mask=None,
                 strength=0.8, guidance_rescale=0.0, num_images_per_prompt=1, clip_skip=0, sample_posterior=True,
                 noise=None, denoising_start=None, denoising_end=None, output_type="uint8", progress=True,
                 conditioning=None, **sampler_options):
        """Images for `prompt` (str or list): uint8 [N, H, W, 3] (or float32 in [0, 1] with output_type="np",
        or the final latents [N, H/f, W/f, c] with output_type="latent").

        Image i of the batch is drawn from seed `seed + i` (seeds in [0, 2^32)), so it is the same picture
        alone or in a batch. image (+ mask, white = repaint): img2img with `strength`, or inpainting; the image
        is encoded as a posterior sample (sample_posterior=False: its mean); it may also be latents [1 or N,
        H/f, W/f, c] (output_type="latent"'s). clip_skip: condition on the text encoder's layer that many
        before the last (the prompt's; the negative prompt's is the last, as diffusers).
        denoising_end / denoising_start (fractions of the training timesteps, as diffusers' SDXL pipelines):
        stop where that fraction of the noise is removed, and continue from there on image= latents, which
        are then taken as they are (strength is ignored): a base model hands its latents to a refiner.
        noise: {kind: unit noise} replacing the draws from the seed (NOISE_KINDS; "initial", "image",
        "masked_image": [N, H/f, W/f, c]; "steps": [S, N, H/f, W/f, c] for the S iterations that run);
        latents= is noise={"initial": latents} (diffusers' `latents=`). conditioning: what a model family adds
        to the prompts (StableDiffusionXL.generate fills it).
        """
        if output_type not in ("uint8", "np", "latent"):
            raise ValueError(f"output_type must be 'uint8', 'np' or 'latent', got {output_type!r}")
        prompts, negatives = _prompt_lists(prompt, negative_prompt, num_images_per_prompt)
        n, f = len(prompts), self.vae_scale_factor
        given = np.shape(image)[1:3] if _is_latents(image) and np.ndim(image) == 4 else None
        height = height or (given[0] * f if given else self.unet.sample_size * f)
        width = width or (given[1] * f if given else self.unet.sample_size * f)
        self._validate(num_steps, sampler, height, width, strength, image, mask, seed, n, clip_skip,
                       guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, eta=eta,
                       denoising_start=denoising_start, denoising_end=denoising_end)
        noise = {**(noise or {}), **({} if latents is None else {"initial": latents})}

        # Host-side plan; every array goes into the compiled loop as an argument.
        options = dict(sampler_options, eta=eta) if sampler == "ddim" else dict(sampler_options)
        settings, options = samplers_lib.configure(sampler, self.scheduler_config, **options)
        plan = samplers_lib.SAMPLERS[sampler].plan(settings, num_steps, **options)
        start, end = _span(plan, settings["num_train_timesteps"], num_steps, strength if image is not None else None,
                           denoising_start, denoising_end)
        pad = -n % self.mesh.devices.size  # the batch is padded to a multiple of the device count
        noise = self._noise(noise, (n, height // f, width // f, self.latent_channels), pad, start, end,
                            len(plan.timesteps), seed)
        cfg = guidance_scale > 1
        cond, uncond = self._conditions(prompts, negatives, cfg, clip_skip, (height, width), conditioning, pad)
        batch = self._batch(cond, uncond, noise, image, mask, height, width, n + pad, sample_posterior, plan, end)
        # Where the loop starts: from the image noised to the first level that runs (diffusers' add_noise),
        # or, for inpainting at full strength, from pure noise, as diffusers does; denoising_start: from the
        # given latents as they are.
        pure = image is None or (mask is not None and strength == 1 and denoising_start is None)
        first = ((1.0, 0.0) if denoising_start is not None else (0.0, plan.init_noise_sigma) if pure
                 else (plan.noise_a[start], plan.noise_b[start]))
        args = (self.params["unet"], plan.steps, plan.timesteps, batch, np.int32(start), np.int32(end),
                np.asarray(first, np.float32), np.float32(guidance_scale), np.float32(guidance_rescale))
        static = dict(sampler=sampler, options=tuple(sorted(plan.options.items())), rescaled=bool(guidance_rescale),
                      groups=self.mesh.devices.size if self.per_image else None,
                      progress=self._tick if progress else None)
        self.last_timings = {}
        compiled = self._compile("sample", functools.partial(denoise, self.unet), *args, **static)
        self._first_index = start
        self._bar = tqdm(total=end - start, desc=f"{sampler} x{n}", disable=not progress, leave=False)
        t0 = time.perf_counter()
        out = jax.block_until_ready(compiled(*args))
        self.last_timings["sample"] = time.perf_counter() - t0
        self._bar.close()
        if output_type == "latent":
            return np.asarray(out)[:n]
        images = np.asarray(self.decode_latents(out))[:n]
        return images if output_type == "np" else (images * 255).round().astype(np.uint8)

    def _conditions(self, prompts, negatives, cfg, clip_skip, size, conditioning, pad):
        """(cond, uncond): the U-Net's conditioning keyword arguments for the prompts and (with guidance) the
        negative prompts, each padded by `pad` copies of its last row; uncond None without guidance."""
        if conditioning is not None:
            raise TypeError(f"conditioning is for model families with more than text; this is {type(self).__name__}")
        padded = lambda items: items + items[-1:] * pad  # noqa: E731
        cond = {"encoder_hidden_states": self.encode_prompts(padded(prompts), clip_skip)}
        uncond = {"encoder_hidden_states": self.encode_prompts(padded(negatives))} if cfg else None  # no skip, as diffusers
        return cond, uncond

    def _batch(self, cond, uncond, noise, image, mask, height, width, b, sample_posterior, plan, end):
        """The loop's per-image inputs, on the devices: noise, step keys (or step noise), the conditioning, and
        image / mask inputs of img2img and inpainting."""
        batch = dict(noise=noise["initial"], keys=noise["keys"], cond=cond)
        if uncond is not None:
            batch["uncond"] = uncond
        if image is not None:
            batch.update(self._image_inputs(image, mask, height, width, b, noise, sample_posterior))
        batch = jax.tree.map(self._shard, batch)
        if "mask" in batch:
            batch["blend"] = sampling.Blend.from_plan(plan, batch["image_latents"], batch["noise"], batch.pop("mask"),
                                                      end)
        if "steps" in noise:
            batch["step_noise"] = jax.device_put(noise["steps"], NamedSharding(self.mesh, P(None, "data")))
        return batch

    def _noise(self, given, shape, pad, start, end, iterations, seed):
        """{"initial", "image", "masked_image": [b,h,w,c]; "keys": [b] step keys; "steps": [iterations,b,h,w,c] if
        given, for the iterations [start, end) that run}:
        the given unit noise (shapes checked), the rest drawn from image i's seed + i; b = n + pad rows."""
        unknown = sorted(set(given) - set(NOISE_KINDS))
        if unknown:
            raise ValueError(f"noise: unknown kinds {unknown}; valid: {', '.join(NOISE_KINDS)}")
        f = self.vae_scale_factor
        for kind, value in given.items():
            want = ((end - start,) if kind == "steps" else ()) + shape
            if tuple(np.shape(value)) != want:
                where = "latents" if kind == "initial" else f"noise[{kind!r}]"
                raise ValueError(f"{where} must have shape {want} ({'S, ' if kind == 'steps' else ''}N, H/{f}, "
                                 f"W/{f}, C), got {np.shape(value)}")
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

    def _tick(self, index):
        """Progress callback from inside the compiled loop (once per device: keep the furthest)."""
        self._bar.n = max(self._bar.n, int(index) - self._first_index + 1)
        self._bar.refresh()

    def _image_inputs(self, image, mask, height, width, b, noise, sample_posterior):
        """Batch inputs of img2img / inpainting: image latents (encoded, or given), and the mask (blending) or
        the mask + masked-image latents appended to a 9-channel U-Net's input."""
        eps = lambda kind: noise[kind] if sample_posterior else None  # noqa: E731
        if _is_latents(image):
            z = np.asarray(image, np.float32)
            z = np.repeat(z, b, 0) if len(z) == 1 else np.concatenate([z, np.repeat(z[-1:], b - len(z), 0)])
            out = {"image_latents": jnp.asarray(z)}
        else:
            img = to_image_array(image, height, width)
            out = {"image_latents": self.encode_images(np.repeat(img[None], b, 0), eps("image"))}
        if mask is not None:
            f = self.vae_scale_factor
            m = to_mask_array(mask, height, width)
            m_lat = np.broadcast_to(m[::f, ::f, None], (b, height // f, width // f, 1)).astype(np.float32)
            if self.unet.in_channels == 2 * self.latent_channels + 1:
                masked = self.encode_images(np.repeat((img * (m[..., None] < 0.5))[None], b, 0), eps("masked_image"))
                out["concat"] = jnp.concatenate([jnp.asarray(m_lat), masked], axis=-1)
            else:
                out["mask"] = jnp.asarray(m_lat)
        return out


def _is_latents(image):
    """Whether img2img's `image` is latents (an array [N, h, w, c]) rather than a picture."""
    return image is not None and not isinstance(image, Image.Image) and np.ndim(image) == 4


def _span(plan, train_steps, num_steps, strength, denoising_start, denoising_end):
    """(start, end): the plan's iterations that run. img2img (strength not None) skips the first
    num_steps - int(num_steps * strength) steps; denoising_start instead begins at the first timestep below
    that fraction of the training timesteps, denoising_end stops before the first below its fraction, as
    diffusers' SDXL pipelines cut `scheduler.timesteps` (a 2nd-order sampler begins on a whole step)."""
    t, start, end = plan.timesteps, 0, len(plan.timesteps)
    cutoff = lambda fraction: int(round(train_steps - fraction * train_steps))  # noqa: E731
    if denoising_start is not None:
        count = int((t < cutoff(denoising_start)).sum())
        count += plan.order == 2 and count % 2 == 0
        start = max(len(t) - count, 0)
    elif strength is not None:
        start = (num_steps - int(num_steps * strength)) * plan.order
    if denoising_end is not None:
        end = start + int((t[start:] >= cutoff(denoising_end)).sum())
    if end <= start:
        raise ValueError(f"no sampling step lies between denoising_start={denoising_start} and "
                         f"denoising_end={denoising_end} with {num_steps} steps")
    return start, end


def _size(x, f=1):
    """(height, width) of a picture, a mask, or (times f) latents [N, h, w, c]."""
    if _is_latents(x):
        return tuple(d * f for d in np.shape(x)[1:3])
    return x.size[::-1] if isinstance(x, Image.Image) else np.shape(x)[:2]

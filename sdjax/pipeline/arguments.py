"""What `generate` accepts: its arguments checked where they enter, with errors that name them."""
import numpy as np

from sdjax.diffusion import samplers as samplers_lib
from sdjax.pipeline import image_inputs, noise_streams


def validate(pipe, num_steps, sampler, height, width, strength, image, mask, seed=0, n=1, clip_skip=0,
             guidance_scale=0.0, guidance_rescale=0.0, eta=0.0, denoising_start=None, denoising_end=None):
    """Raise ValueError for arguments of `generate` that cannot make images with `pipe` (a core.Pipeline), before
    anything is compiled."""
    numbers = dict(guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, eta=eta, strength=strength)
    for name, value in numbers.items():  # NaN passes every comparison below; it would sample NaN images
        if not np.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value}")
    f = pipe.vae_scale_factor
    if height % f or width % f or height <= 0 or width <= 0:
        raise ValueError(f"height and width must be positive multiples of {f}, got {height}x{width}")
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    if sampler not in samplers_lib.SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; valid: {', '.join(sorted(samplers_lib.SAMPLERS))}")
    if "eta" in samplers_lib.plan_options(sampler) and not 0 <= eta <= 1:  # DDIM's sqrt(1 - abar - std^2) < 0
        raise ValueError(f"eta must be in [0, 1], got {eta}")
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
    latents = image_inputs.is_latents(image)
    if latents:
        want = (height // f, width // f, pipe.latent_channels)
        if tuple(np.shape(image)[1:]) != want or np.shape(image)[0] not in (1, n):
            raise ValueError(f"image latents must have shape (1 or {n}, {', '.join(map(str, want))}) for "
                             f"{height}x{width} images, got {np.shape(image)}")
    if mask is not None and (np.asarray(image_inputs.size(mask)).tolist()
                             != np.asarray(image_inputs.size(image, f)).tolist()):
        raise ValueError(f"mask size {image_inputs.size(mask)} differs from image size {image_inputs.size(image, f)}")
    inpaint_unet = pipe.unet.in_channels == 2 * pipe.latent_channels + 1
    if inpaint_unet and mask is None:
        raise ValueError("this is an inpainting U-Net (9 input channels): give image= and mask=")
    if inpaint_unet and latents:
        raise ValueError("an inpainting U-Net (9 input channels) needs the image itself, not latents")
    if isinstance(seed, (list, tuple, np.ndarray)):
        if len(seed) != n or not all(isinstance(s, (int, np.integer)) and 0 <= s < noise_streams.SEEDS for s in seed):
            raise ValueError(f"seed: a list of seeds must hold {n} integers in [0, 2^32), one per image; got {seed!r}")
    elif not isinstance(seed, (int, np.integer)) or not 0 <= seed <= noise_streams.SEEDS - n:
        raise ValueError(f"seed must be an integer in [0, 2^32 - {n}] for {n} image(s), got {seed!r}")
    pipe.conditioning.validate_clip_skip(clip_skip)

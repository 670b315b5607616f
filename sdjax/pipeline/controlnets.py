"""ControlNets in sampling, as diffusers' StableDiffusion(XL)ControlNet{,Img2Img,Inpaint}Pipeline run them: the
ControlNets a pipeline holds (several: diffusers' MultiControlNetModel, their residuals summed), a call's inputs
prepared on the host (control images at the output size in [0, 1]; each ControlNet's scale at every iteration, 0
outside its guidance window), and the denoiser wrapper that runs them and hands their residuals to the U-Net call.
The params, images and scales enter the compiled loop as arguments: a new image, scale or window compiles nothing."""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from sdjax.pipeline import image_inputs
from sdjax.weights.controlnet_files import load_controlnet

# The U-Net fields a ControlNet must share with the U-Net it steers: its residuals' shapes, the text it reads, SDXL's
# added embedding.
_MATCHING = ("block_out_channels", "layers_per_block", "down_block_types", "cross_attention_dim",
             "addition_embed_type", "projection_class_embeddings_input_dim")


@dataclasses.dataclass(frozen=True)
class ControlNetCall:
    """The denoiser wrapper (a static argument of the compiled loop: hashable): `self(fn, params)` runs the
    ControlNets `nets` (params: theirs, in order) on the denoiser's input and passes their summed residuals to fn (the
    U-Net call) in c["cond"]. Inside `denoiser.guided` (c["uncond"] present: rows [uncond; cond]) they run on both
    halves, or in guess mode on the conditional half only, zeros for the other. c["control_images"]: one [B,H,W,3]
    in [0, 1] per ControlNet; c["control_scales"]: [B, K] this iteration's scales (the same in every row)."""
    nets: tuple
    guess_mode: bool

    def __call__(self, fn, params):
        def denoise(x, t, c):
            text, images, halves = c["cond"], c["control_images"], c.get("uncond") is not None
            if halves and self.guess_mode:
                b = x.shape[0] // 2
                x_in, text = x[b:], jax.tree.map(lambda a: a[b:], text)
            else:
                x_in = x
                images = [jnp.concatenate([im, im]) for im in images] if halves else images
            down = mid = None
            for k, (net, p, image) in enumerate(zip(self.nets, params, images)):
                # a 9-channel U-Net's input: the ControlNet sees the latents only (diffusers' control_model_input)
                d, m = net.apply({"params": p}, x_in[..., :net.in_channels], t, controlnet_cond=image,
                                 conditioning_scale=c["control_scales"][0, k], guess_mode=self.guess_mode, **text)
                down, mid = (d, m) if down is None else ([a + r for a, r in zip(down, d)], mid + m)
            if halves and self.guess_mode:
                pad = lambda r: jnp.concatenate([jnp.zeros_like(r), r])  # noqa: E731
                down, mid = [pad(r) for r in down], pad(mid)
            return fn(x, t, {**c, "cond": {**c["cond"], "down_residuals": down, "mid_residual": mid}})
        return denoise


def _per_net(value, name, count, fraction=False):
    """A number for every ControlNet (in [0, 1]: `fraction`) from one number or a list of `count`."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * count
    if len(values) != count:
        raise ValueError(f"{name}: {count} ControlNet(s) take {count} value(s), got {len(values)}")
    for v in values:
        if (isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)) or not math.isfinite(v)
                or (fraction and not 0 <= v <= 1)):
            raise ValueError(f"{name} must be {'fractions in [0, 1]' if fraction else 'finite numbers'} (one, or one "
                             f"per ControlNet), got {value!r}")
    return [float(v) for v in values]


@dataclasses.dataclass(frozen=True)
class Control:
    """One call's ControlNet inputs, checked: empty (no ControlNets) gives nothing to every method."""
    nets: tuple = ()
    params: tuple = ()
    images: tuple = ()
    scales: tuple = ()
    windows: tuple = ()  # (start, end) per ControlNet
    guess_mode: bool = False

    def default_size(self, image, f):
        """The output size diffusers' ControlNet pipelines make without height/width: the image's (img2img and
        inpainting alike), else the first control image's, rounded down to a multiple of f; None without ControlNets."""
        if not self.nets:
            return None
        return tuple(d - d % f for d in image_inputs.size(self.images[0] if image is None else image, f))

    def inputs(self, height, width, rows, iterations, start, end):
        """(per-image inputs {"control_images": K x [rows,H,W,3]}, per-iteration inputs {"control_scales":
        [S, rows, K]}) of a run of iterations [start, end) of S. ControlNet k runs at scale s_k at iteration i of the
        N run (diffusers' controlnet_keep) unless i/N < start_k or (i+1)/N > end_k."""
        if not self.nets:
            return {}, {}
        arrays = [image_inputs.to_control_array(im, height, width, f"control_image[{k}]" if len(self.nets) > 1
                                                else "control_image") for k, im in enumerate(self.images)]
        n = end - start
        keep = np.zeros((iterations, len(self.nets)), np.float32)
        for i in range(n):
            keep[start + i] = [1.0 - float(i / n < s or (i + 1) / n > e) for s, e in self.windows]
        scales = np.broadcast_to((keep * np.float32(self.scales))[:, None], (iterations, rows, len(self.nets)))
        return ({"control_images": [np.broadcast_to(a, (rows, *a.shape)) for a in arrays]},
                {"control_scales": np.ascontiguousarray(scales)})

    def adapters(self):
        """(the loop's static wrappers, their params): the ControlNets' call, or nothing."""
        if not self.nets:
            return (), ()
        return (ControlNetCall(self.nets, self.guess_mode),), (list(self.params),)


class ControlNets:
    """The ControlNets a pipeline holds, in the order their images are given; params on the pipeline's devices
    (`place`), in its U-Net's dtype."""

    def __init__(self, unet, latent_channels, place):
        self.unet, self.latent_channels, self._place = unet, latent_channels, place
        self.nets, self.params, self.sources = [], [], []

    def load(self, path, variant=None):
        """Add the ControlNet at `path` (a diffusers ControlNet folder or a single file)."""
        net, params = load_controlnet(path, np.dtype(self.unet.dtype), variant)
        wrong = [f"{k} {getattr(net, k)!r} (the U-Net's {getattr(self.unet, k)!r})" for k in _MATCHING
                 if getattr(net, k) != getattr(self.unet, k)]
        if net.in_channels != self.latent_channels:
            wrong.append(f"in_channels {net.in_channels} (the latents have {self.latent_channels})")
        if wrong:
            raise ValueError(f"{path}: a ControlNet for another model: {', '.join(wrong)}")
        self.nets.append(net.clone(dtype=self.unet.dtype, param_dtype=self.unet.param_dtype))
        self.params.append(self._place(params))
        self.sources.append(path)

    def unload(self):
        self.nets, self.params, self.sources = [], [], []

    def control(self, image, scale, guess_mode, start, end):
        """A call's `Control` from generate's arguments, checked (ValueError naming the argument)."""
        k = len(self.nets)
        if not k:
            given = dict(control_image=image is not None, controlnet_conditioning_scale=scale != 1.0,
                         guess_mode=guess_mode is not False, control_guidance_start=start != 0.0,
                         control_guidance_end=end != 1.0)
            if any(given.values()):
                raise ValueError(f"{', '.join(n for n, g in given.items() if g)}: for ControlNets, and none is loaded "
                                 "(StableDiffusion.load(..., controlnet=PATH) or load_controlnet(PATH))")
            return Control()
        if image is None:
            raise ValueError(f"control_image: this pipeline holds {k} ControlNet(s); give one image for each")
        images = list(image) if isinstance(image, (list, tuple)) else [image]
        if len(images) != k:
            raise ValueError(f"control_image: {k} ControlNet(s) take {k} image(s), one each, got {len(images)}")
        if not isinstance(guess_mode, bool):
            raise ValueError(f"guess_mode must be True or False, got {guess_mode!r}")
        scales = _per_net(scale, "controlnet_conditioning_scale", k)
        starts = _per_net(start, "control_guidance_start", k, fraction=True)
        ends = _per_net(end, "control_guidance_end", k, fraction=True)
        for s, e in zip(starts, ends):
            if s >= e:
                raise ValueError(f"control_guidance_start {s} must be below control_guidance_end {e}")
        # diffusers: the first ControlNet's global pooling (shuffle) puts the call in guess mode
        return Control(tuple(self.nets), tuple(self.params), tuple(images), tuple(scales), tuple(zip(starts, ends)),
                       guess_mode or self.nets[0].global_pool_conditions)

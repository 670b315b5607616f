"""CLIP's image preprocessing of uint8 images, as transformers' CLIPProcessor and open_clip's transform do it.

Both resize the shortest side to `size` (the other to int(size * long / short)) with an antialiased bicubic filter
(Keys' a = -0.5, Pillow's) on uint8, one axis at a time with a rounding to uint8 between the passes, centre-crop,
scale by 1/255 and normalise. They differ in details, kept here:
- the resize: transformers >= 5 (its CLIPImageProcessor resizes tensors with torchvision) does the width first, with
  torch's fixed-point weights (int16, `bicubic_axis`); open_clip resizes a PIL image: Pillow's weights (22-bit),
  and Pillow picks the order of the passes itself. For some sizes (100x37 -> 64x24) the two orders differ by
  several levels in many pixels; the weights, by one level in under 1% of them.
- the crop offset: transformers takes int((H - h) / 2), torchvision (open_clip) round((H - h) / 2).
"""
import dataclasses
import os

import numpy as np
from PIL import Image

from sdjax.errors import UnsupportedConfig, WeightLoadError
from sdjax.weights.diffusers import read_json

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # both libraries' default normalisation (OpenAI's CLIP)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, as transformers' configs write `resample`


@dataclasses.dataclass(frozen=True)
class ImageTransform:
    """uint8 images -> their centre crops [B, crop, crop, 3] uint8; `normalize` then gives the pixel values."""
    size: int                  # of the shortest side after resizing
    crop: int                  # side of the centre crop
    mean: tuple = OPENAI_MEAN
    std: tuple = OPENAI_STD
    library: str = "transformers"  # or "open_clip": which resize order and crop rounding (module docstring)

    def __post_init__(self):
        if self.crop > self.size:
            raise UnsupportedConfig(f"CLIP preprocessing: crop size {self.crop} exceeds the resized shortest side "
                                    f"{self.size} (padding is not implemented)")

    def resize(self, image):
        """[H, W, 3] uint8 -> the shortest side at `size`, [h, w, 3] uint8."""
        h, w = image.shape[:2]
        short, long = min(h, w), max(h, w)
        new_long = int(self.size * long / short)
        nh, nw = (self.size, new_long) if h <= w else (new_long, self.size)
        if self.library == "open_clip":
            return np.asarray(Image.fromarray(image).resize((nw, nh), Image.Resampling.BICUBIC))
        return bicubic_axis(bicubic_axis(image, 1, nw), 0, nh)

    def centre_crop(self, image):
        """[h, w, 3] -> [crop, crop, 3], the offsets rounded as `library` does."""
        h, w = image.shape[:2]
        offset = (lambda d: int(round(d / 2.0))) if self.library == "open_clip" else (lambda d: int(d / 2.0))
        top, left = offset(h - self.crop), offset(w - self.crop)
        return image[top:top + self.crop, left:left + self.crop]

    def __call__(self, images):
        """images: [B, H, W, 3] uint8 (or a list of [H, W, 3] of several sizes) -> [B, crop, crop, 3] uint8."""
        out = []
        for i, image in enumerate(images):
            image = np.asarray(image)
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
                raise ValueError(f"CLIP score: image {i} is {image.dtype} {image.shape}; expected uint8 [H, W, 3]")
            out.append(self.centre_crop(self.resize(image)))
        return np.stack(out) if out else np.zeros((0, self.crop, self.crop, 3), np.uint8)

    def normalize(self, crops, xp=np):
        """uint8 crops [B, S, S, 3] -> float32 pixel values (x / 255 - mean) / std, with numpy or jax.numpy `xp`."""
        mean, std = xp.asarray(self.mean, xp.float32), xp.asarray(self.std, xp.float32)
        return (crops.astype(xp.float32) / 255 - mean) / std


def _cubic(x, a=-0.5):
    x = np.abs(x)
    return np.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                    np.where(x < 2, ((a * x - 5 * a) * x + 8 * a) * x - 4 * a, 0.0))


def bicubic_axis(x, axis, size):
    """uint8 `x` resized to `size` along `axis` as torch's antialiased bicubic interpolation of uint8 does it (what
    torchvision's resize of a uint8 tensor runs): each output a weighted sum of the inputs within 2 * max(scale, 1)
    of its centre, the weights (Keys' cubic, normalised) rounded to int16 at the most bits that fit, the sum
    rounded and clamped to uint8."""
    n = x.shape[axis]
    if n == size:
        return x
    scale = n / size
    support, stretch = 2.0 * max(scale, 1.0), 1.0 / max(scale, 1.0)
    centres = scale * (np.arange(size) + 0.5)
    first = np.maximum((centres - support + 0.5).astype(np.int64), 0)
    end = np.minimum((centres + support + 0.5).astype(np.int64), n)
    taps = first[:, None] + np.arange(int((end - first).max()))
    weights = _cubic((taps - centres[:, None] + 0.5) * stretch) * (taps < end[:, None])
    weights /= weights.sum(1, keepdims=True)
    bits = 0
    while bits < 22 and int(0.5 + weights.max() * (1 << (bits + 1))) < 1 << 15:
        bits += 1
    scaled = weights * (1 << bits)
    fixed = np.trunc(scaled + np.where(scaled < 0, -0.5, 0.5)).astype(np.int64)  # rounded half away from 0
    gathered = np.moveaxis(x, axis, 0).astype(np.int64)[np.minimum(taps, n - 1)]  # [size, taps, ...]
    out = (np.einsum("st,st...->s...", fixed, gathered) + (1 << (bits - 1))) >> bits
    return np.moveaxis(np.clip(out, 0, 255).astype(np.uint8), 0, axis)


def _side(value, key, path):
    """An int side of a transformers size dict (or an old config's int)."""
    if isinstance(value, int):
        return value
    side = value.get("shortest_edge") if key == "size" else value.get("height")
    if side is None or (key == "crop_size" and value.get("width") != side):
        raise UnsupportedConfig(f"{path}: {key} = {value!r}; expected {{'shortest_edge': N}}"
                                if key == "size" else f"{path}: {key} = {value!r}; expected a square crop")
    return side


def transformers_transform(folder):
    """The ImageTransform of a CLIPModel folder's processor: preprocessor_config.json, or (transformers >= 5)
    processor_config.json's "image_processor"."""
    path = os.path.join(folder, "preprocessor_config.json")
    if os.path.isfile(path):
        cfg = read_json(path)
    else:
        path = os.path.join(folder, "processor_config.json")
        if not os.path.isfile(path):
            raise WeightLoadError(f"{folder}: no preprocessor_config.json nor processor_config.json (the CLIP "
                                  "processor's settings; save the CLIPProcessor into the folder)")
        cfg = read_json(path).get("image_processor", {})
    for key, expected in (("do_resize", True), ("do_center_crop", True), ("do_rescale", True),
                          ("do_normalize", True), ("resample", BICUBIC)):
        if cfg.get(key, expected) != expected:
            raise UnsupportedConfig(f"{path}: {key} = {cfg[key]!r}; only {expected!r} is implemented")
    if abs(cfg.get("rescale_factor", 1 / 255) - 1 / 255) > 1e-12:
        raise UnsupportedConfig(f"{path}: rescale_factor = {cfg['rescale_factor']!r}; only 1/255 is implemented")
    return ImageTransform(_side(cfg.get("size", 224), "size", path), _side(cfg.get("crop_size", 224), "crop_size", path),
                          tuple(cfg.get("image_mean", OPENAI_MEAN)), tuple(cfg.get("image_std", OPENAI_STD)))


def open_clip_transform(preprocess, image_size):
    """The ImageTransform of open_clip's inference transform: its preprocess config (open_clip_config.json's
    "preprocess_cfg"; {}: the defaults) for a model of `image_size`."""
    for key, expected in (("interpolation", "bicubic"), ("resize_mode", "shortest"), ("mode", "RGB")):
        if preprocess.get(key, expected) != expected:
            raise UnsupportedConfig(f"open_clip preprocess_cfg: {key} = {preprocess[key]!r}; only {expected!r} "
                                    "is implemented")
    size = preprocess.get("size", image_size)
    if not isinstance(size, int) and len(set(size)) != 1:
        raise UnsupportedConfig(f"open_clip preprocess_cfg: size = {size!r}; only square sizes are implemented")
    size = size if isinstance(size, int) else size[0]
    return ImageTransform(size, size, tuple(preprocess.get("mean", OPENAI_MEAN)),
                          tuple(preprocess.get("std", OPENAI_STD)), library="open_clip")

"""Images and masks as the pipeline takes them: PIL images or arrays, or latents [N, h, w, c] (img2img's hand-off)."""
import numpy as np
from PIL import Image


def _picture(image, height, width):
    """PIL image / array [H,W,3] or [H,W] (uint8, or float in [0,1]) -> uint8 [height,width,3]: RGB, resized with
    Lanczos (diffusers' image processors)."""
    if not isinstance(image, Image.Image):
        a = np.asarray(image)
        image = Image.fromarray(a if a.dtype == np.uint8 else (np.clip(a, 0, 1) * 255).round().astype(np.uint8))
    image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.LANCZOS)
    return np.asarray(image)


def to_image_array(image, height, width):
    """PIL image / array [H,W,3] (uint8 or float in [0,1]) -> float32 [H,W,3] in [-1, 1], resized to (height, width)."""
    return _picture(image, height, width).astype(np.float32) / 127.5 - 1


def to_control_array(image, height, width, what="control_image"):
    """A ControlNet's conditioning image -> float32 [height,width,3] in [0, 1] (not [-1, 1]): a PIL image, or a uint8
    array [H,W,3] / [H,W] (the same picture), resized with Lanczos; a float array [height,width(,3)] in [0, 1] as
    it is. ValueError naming `what` for anything else."""
    if isinstance(image, Image.Image):
        return _picture(image, height, width).astype(np.float32) / 255
    a = np.asarray(image)
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] != 3):
        raise ValueError(f"{what} must be a PIL image or an array [H, W, 3] / [H, W], got {type(image).__name__} "
                         f"of shape {a.shape}")
    if a.dtype == np.uint8:
        return _picture(a, height, width).astype(np.float32) / 255
    if not np.issubdtype(a.dtype, np.floating):
        raise ValueError(f"{what}: an array must be uint8 (0..255) or float (0..1), got {a.dtype}")
    if not (np.isfinite(a).all() and a.min() >= 0 and a.max() <= 1):
        raise ValueError(f"{what}: a float array must hold values in [0, 1], got [{a.min()}, {a.max()}]")
    if a.shape[:2] != (height, width):
        raise ValueError(f"{what}: a float array is taken as it is and must be {height}x{width} (the output size), "
                         f"got {a.shape[0]}x{a.shape[1]}; give a PIL image or uint8 array to have it resized")
    return np.broadcast_to(a[..., None] if a.ndim == 2 else a, (height, width, 3)).astype(np.float32)


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


def is_latents(image):
    """Whether img2img's `image` is latents (an array [N, h, w, c]) rather than a picture."""
    return image is not None and not isinstance(image, Image.Image) and np.ndim(image) == 4


def size(x, f=1):
    """(height, width) of a picture, a mask, or (times f) latents [N, h, w, c]."""
    if is_latents(x):
        return tuple(d * f for d in np.shape(x)[1:3])
    return x.size[::-1] if isinstance(x, Image.Image) else np.shape(x)[:2]


def output_size(image, mask, height, width, default, f):
    """(height, width) of the images a call makes: as given; else the latents' size times f, or img2img's picture's
    size rounded down to a multiple of f (diffusers' image processor); else (inpainting too, as diffusers) `default`
    (height, width): the model's (square), or with ControlNets diffusers' ControlNet pipelines'."""
    if is_latents(image) or (image is not None and mask is None):
        h, w = size(image, f)
        h, w = h - h % f, w - w % f
    else:
        h, w = default
    return height or h, width or w

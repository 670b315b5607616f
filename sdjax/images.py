"""A user's images in; generated images out: PNGs with their settings as text metadata, and grids."""
import os

import numpy as np
from PIL import Image, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo


def open_image(path, what="image"):
    """The PIL image in `path`, decoded now; FileNotFoundError / ValueError naming `what` and the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: no such file: {path}")
    try:
        image = Image.open(path)
        image.load()  # a truncated file fails here, not halfway through a run
    except UnidentifiedImageError:
        raise ValueError(f"{what}: {path} is not an image Pillow can read") from None
    except OSError as e:
        raise ValueError(f"{what}: {path} cannot be decoded ({e})") from None
    return image


def canny_edges(image, low=100, high=200):
    """A PIL image -> its edges, white on black, as an RGB PIL image: OpenCV's Canny with the thresholds of diffusers'
    ControlNet documentation (the optional extra `sdjax[canny]`)."""
    import cv2
    edges = cv2.Canny(np.asarray(image.convert("RGB")), low, high)
    return Image.fromarray(np.repeat(edges[..., None], 3, axis=-1))


def save_png(image, path, metadata):
    """image: uint8 [H, W, 3]; metadata: {key: value} stored as PNG text chunks. The file appears whole or not at all
    (written beside it, then renamed): an interrupted run leaves no half image under `path`."""
    info = PngInfo()
    for key, value in metadata.items():
        info.add_text(key, str(value))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(image).save(f"{path}.part", format="PNG", pnginfo=info)
    os.replace(f"{path}.part", path)
    return path


def make_grid(images, cols=None):
    """uint8 [N, H, W, 3] -> one uint8 [rows*H, cols*W, 3] picture (blank cells black)."""
    n, h, w, c = images.shape
    cols = cols or int(np.ceil(np.sqrt(n)))
    rows = -(-n // cols)
    grid = np.zeros((rows * h, cols * w, c), np.uint8)
    for i, img in enumerate(images):
        r, q = divmod(i, cols)
        grid[r * h:(r + 1) * h, q * w:(q + 1) * w] = img
    return grid


def read_png_metadata(path):
    """The text metadata of a PNG as a dict."""
    with Image.open(path) as im:
        return dict(im.text)

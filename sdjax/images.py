"""Writing generated images: PNGs with their generation settings as text metadata, and grids."""
import os

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo


def save_png(image, path, metadata):
    """image: uint8 [H, W, 3]; metadata: {key: value} stored as PNG text chunks."""
    info = PngInfo()
    for key, value in metadata.items():
        info.add_text(key, str(value))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(image).save(path, pnginfo=info)
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

"""One example: decoded, resized, cropped and flipped; examples stacked into a batch."""
import io

import grain
import numpy as np
from PIL import Image

from sdjax.text.tokenizer import tokenize


def decode_image(data):
    """Encoded image bytes -> uint8 [H, W, 3], or None when Pillow cannot read them."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"))
    except Exception:  # pylint: disable=broad-except  # Pillow raises many types for bad files.
        return None


def resize_crop(image, size, rng=None):
    """uint8 [H, W, 3] -> (uint8 [th, tw, 3], (top, left), (h, w)) for size th = tw, or (th, tw): resized
    (bilinear, to h x w) by the smallest scale that covers th x tw, then a centre crop, or a random one drawn
    from `rng` (np.random.Generator), which begins at (top, left)."""
    th, tw = (size, size) if isinstance(size, int) else size
    h, w = image.shape[:2]
    scale = max(th / h, tw / w)
    if scale != 1:
        h, w = max(th, int(h * scale)), max(tw, int(w * scale))
        image = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))
    if rng is None:
        top, left = int(round((h - th) / 2)), int(round((w - tw) / 2))
    else:
        top, left = int(rng.integers(h - th + 1)), int(rng.integers(w - tw + 1))
    return image[top:top + th, left:left + tw], (top, left), (h, w)


class Preprocess(grain.transforms.RandomMap):
    """tfds example -> {"image": uint8 [S, S, 3] or None if undecodable, "caption": str, "name": str,
    "original_size": (H, W) decoded, "crop_top_left": (top, left) in the resized image, mirrored by a flip}; an
    example with a "conditioning_image" (ControlNet training) gets it resized to the image's resized size, then
    the image's crop and flip (an undecodable one: the example's "image" None; a missing one, None: ValueError)."""

    def __init__(self, image_size, center_crop, random_flip):
        self.image_size, self.center_crop, self.random_flip = image_size, center_crop, random_flip

    def random_map(self, element, rng, size=None):
        return self.view(element, None if self.center_crop else rng, rng if self.random_flip else False, size)

    def view(self, element, crop_rng=None, flip=False, size=None):
        """The example's crop (centred, or drawn from crop_rng) of `size` (h, w) (default: the square one),
        flipped if `flip` (a bool, or a Generator to draw it from after the crop's draws)."""
        image = element["image"]
        caption = element["caption"].decode("utf-8")
        name = element.get("name", b"").decode("utf-8")
        if isinstance(image, bytes):
            image = decode_image(image)
            if image is None:
                return {"image": None, "caption": caption, "name": name}
        original = image.shape[:2]
        image, (top, left), resized = resize_crop(image, size or self.image_size, crop_rng)
        cond = _conditioning(element, name, resized, (top, left), image.shape[:2])
        if cond is None:
            return {"image": None, "caption": caption, "name": f"{name} (its conditioning image)"}
        out = {"image": image, **({"conditioning_image": cond} if cond is not False else {})}
        if flip if isinstance(flip, bool) else flip.random() < 0.5:  # (left: the crop as the flipped image has it)
            out, left = {k: v[:, ::-1] for k, v in out.items()}, resized[1] - left - image.shape[1]
        return {**{k: np.ascontiguousarray(v) for k, v in out.items()}, "caption": caption, "name": name,
                "original_size": original, "crop_top_left": (top, left)}


def _conditioning(element, name, resized, top_left, crop):
    """The example's conditioning image resized to `resized` (h, w) and cropped as its image (uint8 [h, w, 3]); None
    when undecodable, False when the example has none."""
    if "conditioning_image" not in element:
        return False
    data = element["conditioning_image"]
    if data is None:
        raise ValueError(f"data: {name} has no conditioning image (data.conditioning_image is set: the ControlNet "
                         "stage needs one per example)")
    cond = decode_image(data) if isinstance(data, bytes) else data
    if cond is None:
        return None
    if cond.shape[:2] != resized:
        cond = np.asarray(Image.fromarray(cond).resize(resized[::-1], Image.BILINEAR))
    (top, left), (h, w) = top_left, crop
    return cond[top:top + h, left:left + w]


def collate(examples, tokenizers):
    """Preprocessed examples -> a batch (see the module docstring); captions tokenized ({batch key: tokenizer})."""
    column = lambda key: [e[key] for e in examples]  # noqa: E731
    batch = {key: np.asarray(column(key), np.int32 if key in ("original_size", "crop_top_left") else None)
             for key in examples[0] if key not in ("image", "conditioning_image", "caption", "name")}  # (a cache's)
    if "image" in examples[0]:
        batch["images"] = np.stack(column("image")).astype(np.float32) / 127.5 - 1.0
    if "conditioning_image" in examples[0]:  # in [0, 1], as ControlNets take them
        batch["conditioning_images"] = np.stack(column("conditioning_image")).astype(np.float32) / 255.0
    batch.update({key: tokenize(tokenizer, column("caption"))[0] for key, tokenizer in tokenizers.items()})
    return batch

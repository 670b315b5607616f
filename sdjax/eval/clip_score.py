"""CLIP score of images and their captions: torchmetrics' CLIPScore (max(100 * mean cosine, 0)) and the raw
cosine MLPerf reports, with the CLIP towers in JAX, batches split over the local devices (or a given mesh).

A CLIP model is a transformers CLIPModel folder (config.json, weights, the CLIPProcessor's files) or an open_clip
checkpoint (a file, or a folder holding open_clip_pytorch_model.bin and no config.json; see weights/clip_model.py
for its config). Captions longer than the model's context (77 tokens) are cut keeping the end-of-text token, as
the text encoders were trained; torchmetrics cuts them after 77 tokens, dropping it (its score of such captions
reads another token's state).

    python -m sdjax.eval.clip_score IMAGE_DIR --captions FILE.jsonl --clip PATH

FILE.jsonl: one row per image, {"file": name in IMAGE_DIR, "caption": text}; every image file in IMAGE_DIR must
have a row and every row an image. Prints `CLIP score: <value>` (torchmetrics') and `CLIP cosine: <mean cosine>`.
"""
import argparse
import json
import logging
import os
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from PIL import Image

from sdjax.eval.clip_preprocess import open_clip_transform, transformers_transform
from sdjax.text.clip_vocab import write_clip_tokenizer
from sdjax.text.tokenizer import load_tokenizer, tokenize
from sdjax.weights.clip_model import load_open_clip, load_transformers_clip

OPEN_CLIP_FILES = ("open_clip_pytorch_model.bin", "open_clip_model.safetensors")  # in a hub folder
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
BATCH_SIZE = 64  # images (captions) per device and compiled call
log = logging.getLogger("sdjax")


class CLIP:
    """A CLIP model (weights/clip_model.py's module and params), its image transform (clip_preprocess) and
    tokenizer, on `mesh` (default: the local devices): each call's batch is split over all of its devices."""

    def __init__(self, module, params, transform, tokenizer, mesh=None, batch_size=BATCH_SIZE):
        self.module, self.transform, self.tokenizer = module, transform, tokenizer
        self.mesh = Mesh(np.array(jax.local_devices()), ("data",)) if mesh is None else mesh
        self.params = jax.device_put(params, NamedSharding(self.mesh, P()))
        self.batch_size = batch_size * self.mesh.size
        self._rows = NamedSharding(self.mesh, P(self.mesh.axis_names))
        apply = lambda method: jax.jit(  # noqa: E731
            lambda p, x: module.apply({"params": p}, x, method=method), out_shardings=self._rows)
        self._image = apply(lambda m, crops: m.image_embeds(transform.normalize(crops, jnp)))
        self._text = apply(lambda m, ids: m.text_embeds(ids))

    def _batches(self, fn, x):
        """fn over `x` [N, ...] in batches of at most batch_size, each padded to a multiple of the devices."""
        out = []
        for start in range(0, len(x), self.batch_size):
            chunk = x[start:start + self.batch_size]
            pad = -len(chunk) % self.mesh.size
            chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
            out.append(np.asarray(fn(self.params, jax.device_put(chunk, self._rows)))[:len(chunk) - pad])
        return np.concatenate(out) if out else np.zeros((0, self.module.projection_dim), np.float32)

    def image_embeds(self, images):
        """images: [B, H, W, 3] uint8 (or a list of [H, W, 3]) -> unnormalised embeddings [B, P] float32."""
        return self._batches(self._image, self.transform(images))

    def text_embeds(self, captions):
        """captions: list of B str -> unnormalised embeddings [B, P] float32 (captions cut to the context, keeping
        the end-of-text token)."""
        context = self.module.text_model.max_position_embeddings
        ids, cut = tokenize(self.tokenizer, captions, max_length=context)
        if cut:
            log.warning("CLIP score: captions over %d tokens cut, keeping the end-of-text token", context)
        return self._batches(self._text, ids)

    def cosines(self, images, captions):
        """[B] float64 cosine similarity of each image with its caption (MLPerf's "CLIP score" is their mean)."""
        if len(images) != len(captions):
            raise ValueError(f"CLIP score: {len(images)} images but {len(captions)} captions")
        a, b = (e.astype(np.float64) for e in (self.image_embeds(images), self.text_embeds(captions)))
        return np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def clip_source(path):
    """("transformers", the folder) of a transformers CLIPModel folder (one with config.json), or ("open_clip", the
    checkpoint) of an open_clip file or of a folder holding one of OPEN_CLIP_FILES."""
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")):
        return "transformers", path
    if os.path.isdir(path):
        found = [os.path.join(path, f) for f in OPEN_CLIP_FILES if os.path.isfile(os.path.join(path, f))]
        if not found:
            raise FileNotFoundError(f"CLIP model {path}: holds neither config.json (a transformers CLIPModel) nor "
                                    f"{' / '.join(OPEN_CLIP_FILES)} (open_clip)")
        return "open_clip", found[0]
    return "open_clip", path


def load_clip(path, mesh=None, open_clip_config=None, dtype=jnp.float32, batch_size=BATCH_SIZE):
    """CLIP of a transformers CLIPModel folder (one with config.json) or of an open_clip checkpoint (a file, or
    a folder holding one of OPEN_CLIP_FILES); open_clip_config: see weights/clip_model.py."""
    kind, path = clip_source(path)
    if kind == "transformers":
        module, params = load_transformers_clip(path, dtype=dtype)
        return CLIP(module, params, transformers_transform(path), load_tokenizer(path), mesh, batch_size)
    module, params, preprocess = load_open_clip(path, open_clip_config, dtype=dtype)
    transform = open_clip_transform(preprocess, module.vision_model.image_size)
    # open_clip's tokenizer: CLIP's BPE, padded with id 0 ("!"), cut keeping the end-of-text token
    tokenizer = load_tokenizer(write_clip_tokenizer(tempfile.mkdtemp(prefix="sdjax_tok_"), pad_token="!"))
    return CLIP(module, params, transform, tokenizer, mesh, batch_size)


def score(cosines):
    """torchmetrics' CLIPScore of per-pair cosines: 100 times their mean, clamped at 0 (after the mean)."""
    if not len(cosines):
        raise ValueError("CLIP score: no images")
    return max(100 * float(np.mean(cosines)), 0.0)


def clip_score(images, captions, clip, mesh=None):
    """torchmetrics' CLIPScore(model_name_or_path=clip) of images [B, H, W, 3] uint8 (or a list of [H, W, 3]) and
    their B captions; clip: a path (load_clip) or a loaded CLIP."""
    clip = load_clip(clip, mesh) if isinstance(clip, str) else clip
    return score(clip.cosines(images, captions))


def read_captions(image_dir, captions_file):
    """[(image path, caption)] of a JSONL file of {"file", "caption"} rows naming every image of image_dir."""
    rows = []
    with open(captions_file, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                raise ValueError(f"{captions_file}:{n}: not a JSON object") from None
            if not isinstance(row, dict) or not isinstance(row.get("file"), str) \
                    or not isinstance(row.get("caption"), str):
                raise ValueError(f'{captions_file}:{n}: expected {{"file": image name, "caption": text}}')
            rows.append((row["file"], row["caption"]))
    images = {f for f in os.listdir(image_dir) if f.lower().endswith(IMAGE_EXTENSIONS)}
    named = [f for f, _ in rows]
    missing = sorted(set(named) - images)
    unnamed = sorted(images - set(named))
    if missing or unnamed or len(set(named)) != len(named):
        what = (f"{len(missing)} rows name no image in {image_dir} (e.g. {missing[:3]})" if missing else
                f"{len(unnamed)} images have no row (e.g. {unnamed[:3]})" if unnamed else "some files have two rows")
        raise ValueError(f"{captions_file}: captions and images do not match: {what}")
    return [(os.path.join(image_dir, f), caption) for f, caption in rows]


def folder_cosines(clip, pairs):
    """[N] cosines of (image path, caption) pairs, read batch by batch."""
    out = []
    for start in range(0, len(pairs), clip.batch_size):
        chunk = pairs[start:start + clip.batch_size]
        images = [np.asarray(Image.open(p).convert("RGB")) for p, _ in chunk]
        out.append(clip.cosines(images, [c for _, c in chunk]))
    return np.concatenate(out) if out else np.zeros(0)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m sdjax.eval.clip_score", description=__doc__.split("\n\n")[0])
    parser.add_argument("image_dir", help="folder of images")
    parser.add_argument("--captions", required=True, help='JSONL: {"file": name in image_dir, "caption": text} rows')
    parser.add_argument("--clip", required=True, help="a transformers CLIPModel folder or an open_clip checkpoint")
    parser.add_argument("--open-clip-config", help="open_clip model name (e.g. ViT-H-14) or JSON config file")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="images per device and call")
    args = parser.parse_args(argv)
    try:
        pairs = read_captions(args.image_dir, args.captions)
        clip = load_clip(args.clip, open_clip_config=args.open_clip_config, batch_size=args.batch_size)
        cosines = folder_cosines(clip, pairs)
    except (ValueError, OSError) as e:
        sys.exit(f"clip_score: {e}")
    print(f"CLIP score: {score(cosines)}")
    print(f"CLIP cosine: {float(np.mean(cosines))}")


if __name__ == "__main__":
    main()

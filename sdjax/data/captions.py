"""A user's captioned images as a tfds builder: a folder of images + same-name .txt, or a JSONL / CSV listing.

Images are stored as their original encoded bytes (decoded with Pillow by the input pipeline,
which skips and counts undecodable ones), so no TensorFlow is needed to build or read.
"""
import dataclasses
import hashlib
import logging
import os

import numpy as np
import tensorflow_datasets as tfds

from sdjax.data.listings import CAPTION_KEYS, pick, read_records

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
IMAGE_KEYS = ("image", "path", "file_name")
SOURCES = ("folder", "jsonl", "csv")


def folder_examples(folder):
    """[(image path, caption)] for images under `folder` (recursive) with a same-name .txt beside them."""
    pairs, missing = [], 0
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            stem, ext = os.path.splitext(name)
            if ext.lower() not in IMAGE_EXTENSIONS:
                continue
            txt = os.path.join(root, stem + ".txt")
            if not os.path.isfile(txt):
                missing += 1
                continue
            with open(txt, encoding="utf-8") as f:
                pairs.append((os.path.join(root, name), f.read().strip()))
    if missing:
        logging.warning("captions: %d images in %s have no .txt caption; skipped", missing, folder)
    return pairs


def listing_examples(path, source):
    """[(image path, caption)] from a JSONL or CSV file; image paths are relative to the file's folder."""
    base = os.path.dirname(os.path.abspath(path))
    return [(os.path.join(base, str(pick(r, IMAGE_KEYS, f"captions: {path} row {i + 1}"))),
             str(pick(r, CAPTION_KEYS, f"captions: {path} row {i + 1}")).strip())
            for i, r in enumerate(read_records(path, source))]


def fingerprint(path, source):
    """Short hash of the data's location and listing (names, sizes, mtimes): changes when the data does."""
    h = hashlib.sha1(f"{source}:{os.path.abspath(path)}".encode())
    if source == "folder":
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for name in sorted(files):
                st = os.stat(os.path.join(root, name))
                h.update(f"{os.path.relpath(os.path.join(root, name), path)}:{st.st_size}:{st.st_mtime_ns}".encode())
    else:
        st = os.stat(path)
        h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:12]


@dataclasses.dataclass(eq=False)
class CaptionsConfig(tfds.core.BuilderConfig):
    """Where the user's data is and in which form ("folder", "jsonl" or "csv")."""
    path: str = ""
    source: str = "folder"


def captions_config(path, source):
    """Validate `path` for `source`; the config's name fingerprints the data so a change rebuilds it."""
    if source not in SOURCES:
        raise ValueError(f"captions: source must be one of {SOURCES}, got {source!r}")
    if source == "folder" and not os.path.isdir(path):
        raise FileNotFoundError(f"captions: source 'folder' needs a folder of images, got {path!r}")
    if source != "folder" and not os.path.isfile(path):
        raise FileNotFoundError(f"captions: source {source!r} needs a .{source} file, got {path!r}")
    return CaptionsConfig(name=f"{source}_{fingerprint(path, source)}", path=path, source=source)


class ImageCaptions(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """tfds builder: {"image": encoded bytes, "caption": text, "name": image path}, one "train" split; pass config=captions_config(...)."""
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(), dtype=np.object_),
                "caption": tfds.features.Text(),
                "name": tfds.features.Text(),
            }))

    def _split_generators(self, dl_manager):
        c = self.builder_config
        pairs = folder_examples(c.path) if c.source == "folder" else listing_examples(c.path, c.source)
        if not pairs:
            raise ValueError(f"captions: no captioned images found in {c.path}")
        return {"train": self._generate_examples(pairs)}

    def _generate_examples(self, pairs):
        missing = 0
        for i, (path, text) in enumerate(pairs):
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except OSError:
                missing += 1
                continue
            yield i, {"image": data, "caption": text, "name": path}
        if missing:
            logging.warning("captions: %d listed images could not be read; skipped", missing)

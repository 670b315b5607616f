"""A user's captioned images as a tfds builder: a folder of images + same-name .txt, or a JSONL / CSV listing.

With a conditioning image per example (ControlNet training: the builder's `conditioning` is set), a listing's
column of that name holds its path, and in a folder `{stem}.cond.{ext}` beside each image (not an image itself).

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
COND = ".cond"  # a folder's conditioning image of `x.png` is `x.cond.png` (or .jpg, ...)


def _conditioning_file(root, stem, files, image):
    for name in files:
        base, ext = os.path.splitext(name)
        if base == stem + COND and ext.lower() in IMAGE_EXTENSIONS:
            return os.path.join(root, name)
    raise ValueError(f"captions: {image} has no conditioning image {stem}{COND}.png (or another image extension) "
                     "beside it")


def folder_examples(folder, conditioning=False):
    """[(image path, caption)] for images under `folder` (recursive) with a same-name .txt beside them;
    conditioning: [(image path, caption, conditioning image path)] (ValueError for an image without one)."""
    pairs, missing = [], 0
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            stem, ext = os.path.splitext(name)
            if ext.lower() not in IMAGE_EXTENSIONS or (conditioning and stem.endswith(COND)):
                continue
            txt = os.path.join(root, stem + ".txt")
            if not os.path.isfile(txt):
                missing += 1
                continue
            with open(txt, encoding="utf-8") as f:
                pairs.append((os.path.join(root, name), f.read().strip()))
            if conditioning:
                pairs[-1] += (_conditioning_file(root, stem, sorted(files), pairs[-1][0]),)
    if missing:
        logging.warning("captions: %d images in %s have no .txt caption; skipped", missing, folder)
    return pairs


def listing_examples(path, source, conditioning=""):
    """[(image path, caption)] from a JSONL or CSV file; image paths are relative to the file's folder.
    conditioning: the column of each row's conditioning image (ValueError for a row without one), a third item."""
    base = os.path.dirname(os.path.abspath(path))
    out = []
    for i, r in enumerate(read_records(path, source)):
        where = f"captions: {path} row {i + 1}"
        out.append((os.path.join(base, str(pick(r, IMAGE_KEYS, where))), str(pick(r, CAPTION_KEYS, where)).strip()))
        if conditioning:
            if r.get(conditioning) in (None, ""):  # (a CSV's empty cell, a JSON null)
                raise ValueError(f"{where} has no conditioning image (column {conditioning!r}, "
                                 "data.conditioning_image)")
            out[-1] += (os.path.join(base, str(r[conditioning])),)
    return out


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
    conditioning: str = ""  # the listing's column of conditioning images ("": none; a folder: `{stem}.cond.*`)


def captions_config(path, source, conditioning=""):
    """Validate `path` for `source`; the config's name fingerprints the data (and the conditioning column) so a
    change rebuilds it."""
    if source not in SOURCES:
        raise ValueError(f"captions: source must be one of {SOURCES}, got {source!r}")
    if source == "folder" and not os.path.isdir(path):
        raise FileNotFoundError(f"captions: source 'folder' needs a folder of images, got {path!r}")
    if source != "folder" and not os.path.isfile(path):
        raise FileNotFoundError(f"captions: source {source!r} needs a .{source} file, got {path!r}")
    name = f"{source}_{fingerprint(path, source)}" + (f"_cond_{hashlib.sha1(conditioning.encode()).hexdigest()[:6]}"
                                                       if conditioning else "")
    return CaptionsConfig(name=name, path=path, source=source, conditioning=conditioning)


class ImageCaptions(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """tfds builder: {"image": encoded bytes, "caption": text, "name": image path (and "conditioning_image":
    encoded bytes)}, one "train" split; pass config=captions_config(...)."""
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        images = ("image", "conditioning_image") if self.builder_config.conditioning else ("image",)
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({
                **{k: tfds.features.Tensor(shape=(), dtype=np.object_) for k in images},
                "caption": tfds.features.Text(),
                "name": tfds.features.Text(),
            }))

    def _split_generators(self, dl_manager):
        c = self.builder_config
        pairs = (folder_examples(c.path, bool(c.conditioning)) if c.source == "folder"
                 else listing_examples(c.path, c.source, c.conditioning))
        if not pairs:
            raise ValueError(f"captions: no captioned images found in {c.path}")
        return {"train": self._generate_examples(pairs)}

    def _generate_examples(self, pairs):
        missing = 0
        for i, (path, text, *cond) in enumerate(pairs):
            try:
                data = [_read(p) for p in (path, *cond)]
            except OSError:
                missing += 1
                continue
            yield i, {"image": data[0], "caption": text, "name": path,
                      **({"conditioning_image": data[1]} if cond else {})}
        if missing:
            logging.warning("captions: %d listed images could not be read; skipped", missing)


def _read(path):
    with open(path, "rb") as f:
        return f.read()

"""The latent and text cache: a data set encoded once by the frozen VAE and text tower(s), so that training
runs neither.

    python -m sdjax.train.ldm.cache --config configs/train/tiny.py --out /data/cache [--config.data.path=...]
    python train.py --config ... --config.data.source=cache --config.data.path=/data/cache

For each example of the config's data (in the source's order, keyed by its index) a record holds the VAE
posterior's mean and std (the train step still draws its own sample from its per-example key, so exact
resume holds), the text conditioning (`clip_text.text_conditioning`: the states, and SDXL's pooled text),
the original size and crop, and, with `random_flip`, the same of the flipped crop (the training iterator
draws the flip as the image pipeline does: same seeds, same batches). Records sit in ArrayRecord shards of
`examples_per_shard`, shard j written by process j % process_count with its local devices, under a
temporary name until complete: a rerun after a crash skips the finished shards. manifest.json records the
settings, among them a hash of the VAE and text-tower weights: a cache of other weights, data or sizes is
refused, by the writer and by training.
"""
import io
import json
import logging
import os

import grain
import numpy as np
from array_record.python.array_record_module import ArrayRecordReader


log = logging.getLogger("sdjax")
FORMAT = 1
MANIFEST = "manifest.json"
EMPTY = "empty_caption.npz"  # the empty caption's text conditioning (what caption dropout puts in)


def _serialize(arrays):
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _parse(record):
    with np.load(io.BytesIO(record)) as f:
        return {k: f[k] for k in f.files}


def _read_manifest(folder):
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"cache: no {MANIFEST} in {folder!r}: write one with python -m sdjax.train.ldm.cache")
    with open(path) as f:
        return json.load(f)


def _write_json(path, value):
    with open(path + ".tmp", "w") as f:
        json.dump(value, f, indent=2)
    os.replace(path + ".tmp", path)


def shard_name(j, n):
    return f"cache-{j:05d}-of-{n:05d}.array_record"


def empty_text(folder):
    """The empty caption's text conditioning {name: array} of a cache."""
    with np.load(os.path.join(folder, EMPTY)) as f:
        return {k: f[k] for k in f.files}


class CacheSource(grain.sources.RandomAccessDataSource):
    """A cache's records (dicts of arrays) by example index, over its ArrayRecord shards."""

    def __init__(self, folder):
        manifest = _read_manifest(folder)
        self.folder, self.n, self.per_shard = folder, manifest["num_examples"], manifest["examples_per_shard"]
        self.shards = manifest["shards"]
        self._readers = {}

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        j, i = divmod(int(index), self.per_shard)
        if j not in self._readers:  # (grain reads from threads: a reader per shard, opened once)
            self._readers[j] = ArrayRecordReader(os.path.join(self.folder, self.shards[j]), "readahead_buffer_size:0")
        return _parse(self._readers[j].read([i])[0])

    def __repr__(self):
        return f"CacheSource({self.folder!r})"


class CachedView(grain.transforms.RandomMap):
    """A cache record -> the training element: its arrays, of the flipped crop when the flip drawn (as
    sdjax.data.examples.Preprocess draws it) says so; {"image": None, "name"} for an undecodable image."""

    def __init__(self, config):
        self.random_flip = bool(config.random_flip)

    def random_map(self, record, rng):
        if "bad" in record:
            return {"image": None, "name": str(record["name"])}
        flip = self.random_flip and rng.random() < 0.5
        keys = {k.removesuffix("_flip") for k in record} - {"index", "name", "original_size"}
        out = {k: record[k + "_flip" if flip else k] for k in keys}
        return {**out, "original_size": record["original_size"], "name": str(record["name"])}

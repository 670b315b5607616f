"""Aspect-ratio buckets: every image trained at the bucket (h, w) of about the configured area whose aspect
ratio is nearest its own, each global batch from one bucket, so each compiled step has one static shape.

The batches of an epoch are a function of (seed, epoch): each bucket's examples shuffled and cut into global
batches (a bucket's last, partial batch waits for a later epoch's shuffle), the batches shuffled. Step s is
batch s % len of epoch s // len; process p takes its rows [p * b, (p + 1) * b) of it. All processes agree
with no communication, and the state is the step alone: a resume, with any process count, continues it.
"""
import concurrent.futures
import io
import logging
import os

import grain
import numpy as np
from PIL import Image

from sdjax.data.examples import collate

log = logging.getLogger("sdjax")


def bucket_list(size, step, max_ratio=4.0):
    """[(h, w)] sorted by h / w: sides multiples of `step`, for every height the widest width with h * w <=
    size², and its transpose; aspect ratios within max_ratio (size 1024, step 64: 512 x 2048 ... 1024 x 1024
    ... 2048 x 512, SDXL's buckets)."""
    out, h = set(), step
    while h <= size * size // step:
        w = size * size // h // step * step
        if w >= step and max(h / w, w / h) <= max_ratio:
            out.update({(h, w), (w, h)})  # (both orientations, as many wide buckets as tall ones)
        h += step
    return sorted(out, key=lambda hw: hw[0] / hw[1])


def assign(sizes, buckets):
    """int [N] bucket index of each (h, w) in `sizes` [N, 2] (nearest log aspect ratio); -1 for (0, 0)."""
    sizes = np.asarray(sizes, np.float64).reshape(-1, 2)
    ratios = np.log([h / w for h, w in buckets])
    ok = sizes.min(1) > 0
    out = np.full(len(sizes), -1)
    out[ok] = np.abs(np.log(sizes[ok, 0] / sizes[ok, 1])[:, None] - ratios[None]).argmin(1)
    return out


def image_size(image):
    """(h, w) of an example's image (encoded bytes: from its header only; an array: its shape); (0, 0) when
    unreadable."""
    if not isinstance(image, bytes):
        return tuple(np.shape(image)[:2])
    try:
        with Image.open(io.BytesIO(image)) as im:
            return im.height, im.width
    except Exception:  # pylint: disable=broad-except  # Pillow raises many types for bad files.
        return 0, 0


def image_sizes(source, cache_path=None):
    """int32 [N, 2]: each example's (h, w) (read once from the headers; kept in cache_path when given)."""
    if cache_path and os.path.isfile(cache_path):
        sizes = np.load(cache_path)
        if len(sizes) == len(source):
            return sizes
    log.info("data: reading the sizes of %d images for the buckets", len(source))
    sizes = np.asarray([image_size(source[i]["image"]) for i in range(len(source))], np.int32).reshape(-1, 2)
    if cache_path:
        try:
            np.save(cache_path + ".tmp.npy", sizes)
            os.replace(cache_path + ".tmp.npy", cache_path)
        except OSError:  # a read-only data folder: recomputed next time
            pass
    return sizes


class Epochs:
    """The global batches of every epoch: batch(step) -> int [global_batch] example indices, bucket index."""

    def __init__(self, bucket_of, num_buckets, global_batch, seed):
        self.bucket_of, self.num_buckets, self.global_batch, self.seed = bucket_of, num_buckets, global_batch, seed
        counts = np.bincount(bucket_of[bucket_of >= 0], minlength=num_buckets)
        self.per_epoch = int((counts // global_batch).sum())
        if self.per_epoch == 0:
            raise ValueError(f"data: no bucket holds a global batch of {global_batch} images (bucket sizes "
                             f"{counts.tolist()}); use fewer buckets (a larger bucket_step) or a smaller batch")
        self._epoch, self._batches = None, None

    def batch(self, step):
        epoch, i = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            batches = []
            for b in range(self.num_buckets):
                members = rng.permutation(np.flatnonzero(self.bucket_of == b))
                batches += [(members[j:j + self.global_batch], b)
                            for j in range(0, len(members) - self.global_batch + 1, self.global_batch)]
            self._epoch, self._batches = epoch, [batches[j] for j in rng.permutation(len(batches))]
        return self._batches[i]


class BucketBatches(grain.DatasetIterator):
    """Batches of one aspect-ratio bucket each (sdjax.data.buckets: this process's rows of the step's global
    batch); an undecodable image is counted and its row takes another of the batch's images. Its state: the
    step."""

    def __init__(self, source, preprocess, epochs, sides, batch_size, index, tokenizers, threads):
        super().__init__()
        self.source, self.preprocess, self.epochs, self.sides = source, preprocess, epochs, sides
        self.batch_size, self.index, self.tokenizers = batch_size, index, tokenizers
        self.pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="sdjax-data")
        self.step, self.skipped = 0, 0

    def _example(self, step, row, example, size):
        rng = np.random.default_rng([self.epochs.seed, step, row])
        return self.preprocess.random_map(self.source[int(example)], rng, size)

    def __next__(self):
        members, bucket = self.epochs.batch(self.step)
        rows = range(self.index * self.batch_size, (self.index + 1) * self.batch_size)
        examples = list(self.pool.map(self._example, [self.step] * len(rows), rows, members[rows.start:rows.stop],
                                      [self.sides[bucket]] * len(rows)))
        good = [e for e in examples if e["image"] is not None]
        for e in examples:
            if e["image"] is None:
                self.skipped += 1
                logging.warning("data: skipping undecodable image %s (%d skipped so far)", e["name"], self.skipped)
        if not good:
            raise RuntimeError(f"data: no decodable image in this process's rows of step {self.step}")
        self.step += 1
        return collate([e if e["image"] is not None else good[0] for e in examples], self.tokenizers)

    def get_state(self):
        return {"step": self.step, "skipped": self.skipped, "global_batch": self.epochs.global_batch,
                "batches_per_epoch": self.epochs.per_epoch}

    def set_state(self, state):
        if (state["global_batch"], state["batches_per_epoch"]) != (self.epochs.global_batch, self.epochs.per_epoch):
            raise ValueError(f"data: the checkpoint's buckets had {state['batches_per_epoch']} batches of "
                             f"{state['global_batch']} per epoch, this run's {self.epochs.per_epoch} of "
                             f"{self.epochs.global_batch}: resuming would not continue its order")
        self.step, self.skipped = int(state["step"]), int(state["skipped"])

    def continue_from(self, states):
        """Continue another process count's run (the global batch the same): at its step."""
        self.set_state({**states[0], "skipped": sum(int(s["skipped"]) for s in states) if self.index == 0 else 0})

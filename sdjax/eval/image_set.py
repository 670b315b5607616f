"""The images of an evaluation (`python -m sdjax.eval`): N per caption of a captions file, each from a seed of its
caption's id, written as it is made, the missing ones only when a run is resumed.

Image j (0 <= j < N) of the caption with id k is drawn from seed (k * N + j) mod 2^32: the same picture as
`sample.py --prompt CAPTION --seed k*N --num-images N` gives as its image j (and `StableDiffusion.generate`), in
whatever batch or on however many devices and processes it is made (bit for bit on the CPU, where images are
sampled one by one). It is written to `images/{k}-{j}.png`.
"""
import concurrent.futures
import dataclasses
import json
import os

import numpy as np

from sdjax.data.listings import CAPTION_KEYS, pick, read_records
from sdjax.images import open_image, save_png
from sdjax.pipeline.noise_streams import SEEDS

ID_KEYS = ("id",)  # a captions file without one: the row number (from 0) is the id
SETTINGS = "settings.json"  # in the output folder: what its images were made with


@dataclasses.dataclass(frozen=True)
class Item:
    """Image `index` of the caption with id `caption_id`, and its seed."""
    caption_id: int
    index: int
    caption: str
    seed: int

    @property
    def name(self):
        return f"{self.caption_id}-{self.index}.png"


def read_captions(path, what="--captions"):
    """[(id, caption)] of a COCO-style captions file (JSONL, CSV, or TSV as MLPerf's val2014_30k.tsv): an "id"
    column of integers >= 0, each once (none: the row numbers), and a "caption" (or "text") column. Errors name
    `what` (the option or config field) and the row."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: no such file: {path}")
    rows, seen = [], {}
    for i, record in enumerate(read_records(path)):
        where = f"{what} {path} row {i + 1}"
        raw = next((record[k] for k in ID_KEYS if k in record), i)
        try:
            caption_id = int(str(raw).strip())
        except ValueError:
            raise ValueError(f"{where}: id {raw!r} is not an integer") from None
        if caption_id < 0 or caption_id in seen:
            raise ValueError(f"{where}: id {caption_id} is " + ("negative" if caption_id < 0 else
                                                                 f"also row {seen[caption_id] + 1}'s"))
        seen[caption_id] = i
        rows.append((caption_id, str(pick(record, CAPTION_KEYS, where)).strip()))
    if not rows:
        raise ValueError(f"{what} {path}: no captions")
    return rows


def image_seed(caption_id, index, per_caption):
    """The seed of image `index` of caption `caption_id` (module docstring)."""
    return (caption_id * per_caption + index) % SEEDS


def items(captions, per_caption):
    """[Item] of [(id, caption)], `per_caption` images each, caption by caption."""
    return [Item(k, j, text, image_seed(k, j, per_caption)) for k, text in captions for j in range(per_caption)]


def check_settings(folder, settings):
    """Record `settings` (what the images depend on; JSON) in `folder`, or refuse a folder whose images were made
    with other settings: its images would be taken as this run's."""
    path = os.path.join(folder, SETTINGS)
    if os.path.isfile(path):
        with open(path) as f:
            old = json.load(f)
        changed = [f"{k} {old.get(k)!r} there, {v!r} here" for k, v in settings.items() if old.get(k) != v]
        if changed:
            raise ValueError(f"--out {folder} holds images made with other settings ({'; '.join(changed)}): give "
                             "another --out, or empty that one")
        return
    os.makedirs(folder, exist_ok=True)
    write_json(path, settings)


def write_json(path, obj):
    """`obj` as JSON at `path`, whole or not at all (written beside it, then renamed), as images.save_png writes."""
    with open(f"{path}.part", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(f"{path}.part", path)


def missing(todo, folder):
    """The indices in `todo` of the items whose image is not in `folder` yet."""
    return [i for i, item in enumerate(todo) if not os.path.isfile(os.path.join(folder, item.name))]


def sample(sd, todo, batch_size, options):
    """Batches ([Item], uint8 images [B, H, W, 3]) of `todo` sampled with `sd.generate(**options)`, `batch_size` at a
    time (a short batch padded: one compiled program, a resumed run's too)."""
    for lo in range(0, len(todo), batch_size):
        batch = todo[lo:lo + batch_size]
        padded = batch + batch[-1:] * (batch_size - len(batch))
        images = sd.generate([item.caption for item in padded], seed=[item.seed for item in padded], progress=False,
                             **options)
        yield batch, images[:len(batch)]


def make_images(sd, todo, folder, batch_size, options, metadata=None, write=True, progress=None):
    """Sample the images of `todo` ([Item]) as `sample` does and write each to `folder` (write=False: another
    process writes) by a thread while the next batch samples; `progress` (a tqdm bar) advances by batch. metadata:
    PNG text of every image."""
    with concurrent.futures.ThreadPoolExecutor(1) as writer:
        written = []
        for batch, images in sample(sd, todo, batch_size, options):
            for done in written:  # the previous batch's: an error in writing stops the run here
                done.result()
            if write:
                written = [writer.submit(save_png, image, os.path.join(folder, item.name),
                                         {"prompt": item.caption, "caption_id": item.caption_id, "seed": item.seed,
                                          **(metadata or {})})
                           for item, image in zip(batch, images)]
            if progress is not None:
                progress.update(len(batch))
        for done in written:
            done.result()


def read_images(todo, folder, batch_size):
    """Batches (uint8 [B, H, W, 3], captions) of the images of `todo` in `folder`, in order."""
    for lo in range(0, len(todo), batch_size):
        batch = todo[lo:lo + batch_size]
        images = [np.asarray(open_image(os.path.join(folder, item.name), "image").convert("RGB")) for item in batch]
        yield np.stack(images), [item.caption for item in batch]

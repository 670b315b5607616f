"""Input pipeline: a source (a tfds build of shapes / a folder / a JSONL or CSV listing; webdataset or parquet
shards, streamed; a latent cache) read in sdjax.data.order's order -> decode, crop, flip -> batches.

Batches are {"images": float32 [b, H, W, 3] in [-1, 1], "input_ids": int32 [b, 77] (and "input_ids_2", the
ids of SDXL's second tokenizer), "original_size": int32 [b, 2] (each image's height and width as stored),
"crop_top_left": int32 [b, 2] (where the crop begins in the resized image, as seen after the flip)} (numpy):
SDXL's micro-conditioning takes the last two. With `conditioning_image` set (ControlNet training), also
"conditioning_images": float32 [b, H, W, 3] in [0, 1], each cropped and flipped as its image.
The iterator is a grain DatasetIterator: `get_state()` / `set_state()` (JSON-able dicts; it saves with orbax
through `grain.checkpoint.CheckpointSave(iterator)`), and `continue_from(states)` for a run with another
process count. Undecodable images are skipped and counted in `iterator.skipped`. Caption dropout is the
train step's job, not done here.
"""
import collections
import concurrent.futures
import functools
import logging
import os

import grain
import ml_collections
import numpy as np

from sdjax.data import buckets, captions, order, shards, synthetic_shapes as shapes
from sdjax.data.examples import Preprocess, collate


BUILT = ("shapes",) + captions.SOURCES  # sources built once with tfds (random access)


def default_config():
    """The `config.data` fields make_iterator reads, with their defaults."""
    return ml_collections.ConfigDict(dict(
        source="shapes",     # "shapes" | "folder" | "jsonl" | "csv" | "webdataset" | "parquet" | "cache"
        path="",             # the folder, or the .jsonl / .csv listing; the shards' folder, glob or {000..099}
                             # pattern (webdataset, parquet); "cache": the folder sdjax.train.ldm.cache wrote
        data_dir="",         # where tfds keeps prepared data sets ("": tfds' default, ~/tensorflow_datasets)
        split="train",       # shapes: "train" | "test" | "heldout"; user data: "train"
        image_size=64,
        center_crop=True,    # False: random crop
        random_flip=True,
        bucket_step=0,       # > 0: aspect-ratio buckets of about image_size² with sides multiples of it (SDXL: 64)
        max_aspect_ratio=4.0,  # the buckets' widest h / w and w / h
        num_threads=16,      # grain reader threads per process
        num_workers=0,       # grain worker processes (0: decode in this process)
        conditioning_image="",  # ControlNet training: the listing's / parquet table's column of each example's
                                # conditioning image; a folder's `{stem}.cond.png`, webdataset's `{key}.cond.png`
        shapes=dict(num_train=20000, num_test=1000, num_heldout=1000, seed=0),
    ))


def resolve_config(config):
    """default_config() overridden by `config` (ConfigDict or dict); unknown keys or bad values raise ValueError."""
    cfg = default_config()
    given = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
    unknown = sorted(set(given) - set(cfg)) + sorted(set(given.get("shapes", {})) - set(cfg.shapes))
    if unknown:
        raise ValueError(f"data config: unknown keys {unknown}; known: {sorted(cfg)}")
    cfg.update(given)
    sources = ("shapes",) + captions.SOURCES + tuple(shards.SOURCES) + ("cache",)
    if cfg.source not in sources:
        raise ValueError(f"data config: source must be one of {sources}, got {cfg.source!r}")
    splits = shapes.SPLITS if cfg.source == "shapes" else ("train",)
    if cfg.split not in splits:
        raise ValueError(f"data config: split for source {cfg.source!r} must be one of {splits}, got {cfg.split!r}")
    if cfg.image_size <= 0:
        raise ValueError(f"data config: image_size must be positive, got {cfg.image_size}")
    if cfg.conditioning_image and cfg.source in ("shapes", "cache"):
        raise ValueError(f"data config: source {cfg.source!r} has no conditioning images (data.conditioning_image "
                         f"is set): use one of {captions.SOURCES + tuple(shards.SOURCES)}")
    if cfg.bucket_step and cfg.source not in BUILT:
        raise ValueError(f"data config: bucket_step needs a source with random access {BUILT}, got {cfg.source!r} "
                         "(a streamed source cannot group its images by shape; a cache holds one square crop each)")
    return cfg


def builder(config):
    """The tfds builder for a resolved data config (nothing is built yet)."""
    kwargs = dict(data_dir=config.data_dir or None, file_format="array_record")
    if config.source == "shapes":
        return shapes.CaptionedShapes(config=shapes.shapes_config(**config.shapes), **kwargs)
    return captions.ImageCaptions(config=captions.captions_config(config.path, config.source,
                                                                  config.conditioning_image), **kwargs)


def prepare(config):
    """Build the data set into config.data_dir if not there yet (idempotent); returns the split's data source.

    Multi-host: call it on one process first (then a barrier), so processes don't all build it.
    """
    config = resolve_config(config)
    b = builder(config)
    b.download_and_prepare()
    source = b.as_data_source(split=config.split)
    if config.bucket_step:  # each image's size, read once (kept beside the build)
        buckets.image_sizes(source, os.path.join(b.data_dir, f"{config.split}_image_sizes.npy"))
    return source


def _ordered_map(fn, items, threads):
    """fn over items on `threads` threads, results in order, at most 2 * threads ahead."""
    pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="sdjax-data")
    pending = collections.deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * threads:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for f in pending:
            f.cancel()
        pool.shutdown(wait=False)


class Elements:
    """The preprocessed elements a plan (sdjax.data.order) reads from a source, each tagged with the progress
    after it ("_next": (k, offset)); its crop and flip are drawn from (seed, global position, member), so they
    do not depend on the process count."""

    def __init__(self, config, source, preprocess, seed, units, read=None):
        self.config, self.source, self.preprocess, self.seed, self.read = config, source, preprocess, seed, read
        self.units = units
        self.order = order.shuffled(units, seed)

    def _element(self, item):
        (g, member, k, offset), element = item
        rng = np.random.default_rng([self.seed, g, member])
        return {**self.preprocess.random_map(element, rng), "_next": (k, offset)}

    def _fetch(self, k, plan):  # random access: the plan's k-th position is one example
        g, _ = order.position(plan, k)
        return self._element(((g, 0, k + 1, order.position(plan, k + 1)[1]), self.source[self.order[g]]))

    def _members(self, plan, k, offset):  # streamed: the plan's positions are shards, read member by member
        empty = 0  # shards in a row with nothing (left) to read
        while True:
            g, first = order.position(plan, k)
            for member, element in self.read(self.source[self.order[g]], offset):
                empty = -1
                yield (g, member, k, member + 1), element
            empty += 1
            if empty > 2 * self.units + len(plan["catchup"]):
                raise RuntimeError(f"data: no example in a whole pass over the {self.units} shards")
            k, offset = k + 1, order.position(plan, k + 1)[1]

    def __call__(self, plan, k, offset):
        """Endless iterator of elements from progress (k, offset) of `plan`."""
        if self.read is not None:
            return _ordered_map(self._element, self._members(plan, k, offset), self.config.num_threads)
        ds = grain.MapDataset.range(k, 2 ** 62).map(functools.partial(self._fetch, plan=plan))
        it = ds.to_iter_dataset(grain.ReadOptions(num_threads=self.config.num_threads))
        if self.config.num_workers:
            it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.config.num_workers))
        return iter(it)


class Batches(grain.DatasetIterator):
    """Stacks preprocessed examples into batches, tokenizes captions ({batch key: tokenizer}), skips and counts
    bad images. Its state: the plan, the progress in it, the examples skipped so far."""

    def __init__(self, elements, plan, batch_size, tokenizers, max_bad_in_a_row):
        super().__init__()
        self.batch_size, self.tokenizers, self.max_bad_in_a_row = batch_size, tokenizers, max_bad_in_a_row
        self.make_elements = elements
        self._go({"plan": plan, **order.start(plan)}, skipped=0)

    def _go(self, progress, skipped):
        self.plan, self.k, self.offset, self.skipped = progress["plan"], progress["k"], progress["offset"], skipped
        self.elements = self.make_elements(self.plan, self.k, self.offset)

    def __next__(self):
        examples, bad_in_a_row = [], 0
        while len(examples) < self.batch_size:
            element = next(self.elements)
            self.k, self.offset = element.pop("_next")
            if "image" in element and element["image"] is None:  # undecodable (a cache's elements have none)
                self.skipped += 1
                bad_in_a_row += 1
                logging.warning("data: skipping undecodable image %s (%d skipped so far)",
                                element["name"], self.skipped)
                if bad_in_a_row > self.max_bad_in_a_row:
                    raise RuntimeError(f"data: no decodable image in {bad_in_a_row} examples in a row")
                continue
            bad_in_a_row = 0
            examples.append(element)
        return collate(examples, self.tokenizers)

    def get_state(self):
        return {"plan": self.plan, "k": self.k, "offset": self.offset, "skipped": self.skipped}

    def set_state(self, state):
        """Continue from a state of get_state (the same process count)."""
        if "plan" not in state:  # written before sdjax.data.order
            logging.warning("data: the checkpoint's data position is of an older format: the data order restarts")
            return
        self._check_units(state["plan"])
        self._go(state, int(state["skipped"]))

    def continue_from(self, states):
        """Continue where the processes of another run (states[i]: process i's get_state()) stopped, with this
        run's process count: the examples they did not read come first, split between the processes; none
        they read comes again before the next epoch."""
        self._check_units(states[0]["plan"])
        count, index = self.plan["count"], self.plan["index"]
        self._go(order.resplit(states, count, self.plan["block"])[index],
                 sum(int(s["skipped"]) for s in states) if index == 0 else 0)

    def _check_units(self, plan):
        if plan["units"] != self.plan["units"]:
            raise ValueError(f"data: the checkpoint's data had {plan['units']} units (examples or shards), "
                             f"this run's has {self.plan['units']}: resuming would not continue its order")


def make_iterator(config, tokenizers, batch_size_per_process, seed, process_index=0, process_count=1):
    """Endless, checkpointable iterator of this process's batches (see the module docstring).

    config: the data config (see default_config); tokenizers: {batch key: transformers CLIPTokenizer}
    (`tokenizer.batch_tokenizers`), or one tokenizer for "input_ids".
    The processes read the data in one order (sdjax.data.order: reshuffled from `seed` every epoch; the
    examples dealt to them a batch each, so that together they read the global batches one process would,
    or with a streamed source the shards one each); crops and flips are drawn from `seed` and the example's
    place in that order, so a restored state replays exactly the same batches, and `continue_from` goes on
    with another process count. num_workers > 0 starts grain worker processes,
    which read grain's absl flags: run under absl.app.run, or call absl.flags.FLAGS.mark_as_parsed() first.
    """
    if not 0 <= process_index < process_count:
        raise ValueError(f"data: process_index {process_index} not in [0, {process_count})")
    if batch_size_per_process < 1:
        raise ValueError(f"data: batch_size_per_process must be >= 1, got {batch_size_per_process}")
    config = resolve_config(config)
    preprocess, read = Preprocess(config.image_size, config.center_crop, config.random_flip), None
    if config.source == "cache":  # the encoded latents and text: the same order, flips and batches
        from sdjax.data import cache
        source, preprocess, tokenizers = cache.CacheSource(config.path), cache.CachedView(config), {}
    elif config.source in shards.SOURCES:
        source = shards.list_shards(config.path, config.source)
        read = functools.partial(shards.READERS[config.source], conditioning=config.conditioning_image)
    else:
        source = prepare(config)
    tokenizers = tokenizers if isinstance(tokenizers, dict) else {"input_ids": tokenizers}
    if config.bucket_step:
        sides = buckets.bucket_list(config.image_size, config.bucket_step, config.max_aspect_ratio)
        sizes = buckets.image_sizes(source, os.path.join(builder(config).data_dir, f"{config.split}_image_sizes.npy"))
        epochs = buckets.Epochs(buckets.assign(sizes, sides), len(sides), batch_size_per_process * process_count,
                                seed)
        return buckets.BucketBatches(source, preprocess, epochs, sides, batch_size_per_process, process_index,
                                     tokenizers, config.num_threads)
    units = len(source)
    if read is None and units < process_count:
        raise ValueError(f"data: {units} examples cannot feed {process_count} processes")
    elements = Elements(config, source, preprocess, seed, units, read)
    block = 1 if read else batch_size_per_process  # single examples: the processes' batches make one process's
    return Batches(elements, order.plan(units, process_index, process_count, block), batch_size_per_process,
                   tokenizers, max_bad_in_a_row=units if read is None else 10_000)

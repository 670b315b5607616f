"""DreamBooth (`config.dreambooth`; Ruiz et al. 2023): a subject learned from a few instance images, all captioned with
the instance prompt ("a photo of sks dog"), and with prior preservation, class images ("a photo of dog") in every batch.

DreamBooth is about data and loss, not about which params train (the U-Net, the text towers, adapters: the stage's
choice). With prior preservation a process's batch is its instance examples followed by as many class examples, the
batch key "class_example" (float32 [b], 1 for a class row) marks them, and the loss is the instance rows' MSE plus
prior_loss_weight x the class rows' (`ldm_losses.prior_preservation_mse`, as diffusers' train_dreambooth.py).
Class images are class_data_dir's, and when it holds fewer than num_class_images, images sdjax generates with the
model being trained before training starts (image i from seed + i), written once into workdir/class_images.
Both sets are JSONL listings in workdir/dreambooth read by the input pipeline (sdjax.data), so their order, crops and
flips replay exactly on resume.
"""
import json
import logging
import os

import grain
import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from sdjax.data.captions import IMAGE_EXTENSIONS
from sdjax.images import save_png
from sdjax.train.config import require

log = logging.getLogger("sdjax.train")
CLASS_IMAGES = "class_images"  # the generated class images, in the workdir


def default_config():
    """The `config.dreambooth` fields, off."""
    return ml_collections.ConfigDict(dict(
        instance_data_dir="",        # a folder of images of the subject; "": off
        instance_prompt="",          # every instance image's caption, e.g. "a photo of sks dog"
        with_prior_preservation=False,
        class_prompt="",             # every class image's caption, e.g. "a photo of dog"
        class_data_dir="",           # class images to use first ("": generate them all)
        num_class_images=100,        # class images in all; the missing ones are generated
        prior_loss_weight=1.0,
        class_num_steps=50,          # generating class images: sampler steps, guidance, images per call
        class_guidance_scale=7.5,
        class_batch_size=4,
    ))


def enabled(config):
    return bool(config.get("dreambooth") and config.dreambooth.get("instance_data_dir"))


def prior(config):
    """Whether batches carry class examples (prior preservation)."""
    return enabled(config) and config.dreambooth.with_prior_preservation


def list_images(folder):
    """Image files directly in `folder`, sorted."""
    return sorted(os.path.join(folder, n) for n in os.listdir(folder)
                  if os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS)


def check(config):
    """ValueError naming the first bad `dreambooth` field, or a field it cannot go with."""
    db = config.get("dreambooth")
    if not db:
        return
    if not db.instance_data_dir:
        require(db.to_dict() == default_config().to_dict(), "dreambooth.instance_data_dir is empty: give the folder "
                "of the subject's images, or leave dreambooth as it is")
        return
    require(os.path.isdir(db.instance_data_dir) and list_images(db.instance_data_dir),
            f"dreambooth.instance_data_dir {db.instance_data_dir!r} is no folder with images {IMAGE_EXTENSIONS}")
    require(bool(db.instance_prompt), "dreambooth.instance_prompt is empty: give the instance images' caption "
                                      "(e.g. 'a photo of sks dog')")
    require(config.data.get("source") != "cache", "dreambooth reads its own images: data.source must not be 'cache'")
    if not db.with_prior_preservation:
        return
    require(bool(db.class_prompt), "dreambooth.with_prior_preservation needs dreambooth.class_prompt (e.g. 'a photo "
                                   "of dog')")
    require(isinstance(db.num_class_images, int) and db.num_class_images >= 1,
            f"dreambooth.num_class_images must be >= 1, got {db.num_class_images!r}")
    require(db.prior_loss_weight >= 0, f"dreambooth.prior_loss_weight must be >= 0, got {db.prior_loss_weight}")
    require(not db.class_data_dir or os.path.isdir(db.class_data_dir),
            f"dreambooth.class_data_dir {db.class_data_dir!r} is no folder")
    require(db.class_num_steps >= 1 and db.class_batch_size >= 1,
            "dreambooth.class_num_steps and dreambooth.class_batch_size must be >= 1")
    half = config.batch_size // 2
    require(config.batch_size % 2 == 0 and half % config.optimizer.grad_accum_steps == 0,
            f"dreambooth with prior preservation: batch_size={config.batch_size} must be twice a multiple of "
            f"optimizer.grad_accum_steps={config.optimizer.grad_accum_steps} (half instance, half class examples)")


def class_images(config, pre, workdir):
    """The class images' paths: class_data_dir's first num_class_images, then the missing ones generated (image i
    from seed config.seed + i) into workdir/class_images, each written once (an existing one is kept: a resumed or
    interrupted run goes on where it was)."""
    db = config.dreambooth
    given = list_images(db.class_data_dir)[:db.num_class_images] if db.class_data_dir else []
    out = os.path.join(workdir, CLASS_IMAGES)
    paths = [os.path.join(out, f"class_{i:05d}.png") for i in range(db.num_class_images - len(given))]
    missing = [i for i, p in enumerate(paths) if not os.path.exists(p)]
    if missing and jax.process_index() == 0:
        from sdjax.pipeline import StableDiffusion
        os.makedirs(out, exist_ok=True)
        log.info("dreambooth: generating %d class images of %r into %s", len(missing), db.class_prompt, out)
        pipe, size = StableDiffusion(pre), config.data.image_size
        chunks = []  # runs of consecutive indices: a call's image j has seed config.seed + chunk[0] + j
        for i in missing:
            if chunks and chunks[-1][-1] == i - 1 and len(chunks[-1]) < db.class_batch_size:
                chunks[-1].append(i)
            else:
                chunks.append([i])
        for chunk in chunks:
            images = pipe.generate([db.class_prompt] * len(chunk), num_steps=db.class_num_steps,
                                   guidance_scale=db.class_guidance_scale, seed=config.seed + chunk[0],
                                   height=size, width=size, progress=False)
            for i, image in zip(chunk, images):
                save_png(np.asarray(image), paths[i], {})  # whole, or not there
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("sdjax dreambooth class images")
    return given + paths


def write_listing(path, images, caption):
    """A JSONL listing of `images`, all captioned `caption` (with each file's size and mtime: the listing, and so
    the input pipeline's build of it, changes when an image does); rewritten only when it changes."""
    lines = [json.dumps({"image": os.path.abspath(p), "caption": caption, "size": os.path.getsize(p),
                         "mtime_ns": os.stat(p).st_mtime_ns}) + "\n" for p in images]
    text = "".join(lines)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            if f.read() == text:
                return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


class PriorBatches(grain.DatasetIterator):
    """Instance batches followed by as many class examples: "class_example" [2n] marks the class rows. Its state:
    both iterators'."""

    def __init__(self, instance, klass):
        super().__init__()
        self.parts = {"instance": instance, "class": klass}

    def __next__(self):
        a, b = (next(it) for it in self.parts.values())
        n = len(a["images"])
        return {**{k: np.concatenate([a[k], b[k]]) for k in a}, "class_example": np.repeat(np.float32([0, 1]), n)}

    @property
    def skipped(self):
        return sum(it.skipped for it in self.parts.values())

    def get_state(self):
        return {k: it.get_state() for k, it in self.parts.items()}

    def set_state(self, state):
        for k, it in self.parts.items():
            it.set_state(state[k])

    def continue_from(self, states):
        for k, it in self.parts.items():
            it.continue_from([s[k] for s in states])


def data_maker(config, pre, workdir):
    """make_data(config, tokenizers, batch_size, seed, process_index, process_count) of a DreamBooth run (the loop's
    signature): the class images made first (`class_images`)."""
    from sdjax.data.input_pipeline import make_iterator, prepare
    db, folder = config.dreambooth, os.path.join(workdir, "dreambooth")
    sets = [("instance", list_images(db.instance_data_dir), db.instance_prompt)]
    if prior(config):
        sets.append(("class", class_images(config, pre, workdir), db.class_prompt))
    listings = [os.path.join(folder, f"{name}.jsonl") for name, _, _ in sets]
    data = [{**config.data.to_dict(), "source": "jsonl", "path": path, "bucket_step": 0} for path in listings]
    if jax.process_index() == 0:  # written and built once, then all processes read them
        for (_, images, caption), path, data_config in zip(sets, listings, data):
            write_listing(path, images, caption)
            prepare(data_config)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("sdjax dreambooth listings")

    def make(config, tokenizers, batch_size, seed, process_index, process_count):
        n = batch_size // len(listings)
        require(n * len(listings) == batch_size, f"dreambooth with prior preservation: each process's batch "
                f"({batch_size}) must be even")
        its = [make_iterator(d, tokenizers, n, seed + j, process_index, process_count) for j, d in enumerate(data)]
        return its[0] if len(its) == 1 else PriorBatches(*its)

    return make

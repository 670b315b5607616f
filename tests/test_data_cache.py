"""The latent and text cache (sdjax.data.cache): training from it equals training from the images with the same
seeds, resumes exactly, and a cache of other weights or sizes is refused."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.train import tiny
from sdjax.data import cache
from sdjax.train.ldm import cache as cache_writer
from sdjax.train import loop
from sdjax.train.export import load_params
from sdjax.diffusion import schedules
from sdjax.train.ldm import ldm_stage, ldm_step

pytestmark = pytest.mark.long_file
STEPS = 3


def _config(data_dir, **data):
    c = tiny.get_config()
    c.batch_size, c.total_steps, c.log_every, c.checkpoint_every = 4, STEPS, 1, 2
    c.data.update(data_dir=data_dir, random_flip=True, shapes=dict(num_train=24, num_test=8, num_heldout=8, seed=0),
                  **data)
    c.loss.update(caption_dropout=0.5, latent="sample")  # both the dropped caption and the posterior draw
    return c


def _cached(config, folder):
    c = config.copy_and_resolve_references()
    c.data.update(source="cache", path=folder)
    return c


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return np.array([json.loads(line)["loss"] for line in f])


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    config = _config(str(root / "tfds"))
    folder = str(root / "cache")
    manifest = cache_writer.write(config, folder, ldm_stage.load(config), examples_per_shard=10, batch_size=4, progress=False)
    return config, folder, manifest


def test_cache_layout_and_records(written):
    config, folder, manifest = written
    assert manifest["complete"] and manifest["num_examples"] == 24 and len(manifest["shards"]) == 3
    source = cache.CacheSource(folder)
    record = source[13]
    assert int(record["index"]) == 13
    assert record["latent_mean"].shape == record["latent_mean_flip"].shape == (16, 16, 4)
    assert record["encoder_hidden_states"].shape == (77, 64)
    # the flipped crop's latents are not the crop's mirrored (the VAE is no mirror-symmetric function), but close
    assert not np.allclose(record["latent_mean_flip"], record["latent_mean"])


def test_loss_from_the_cache_equals_the_loss_from_images(written):
    """The first batch of both iterators (same seed: same examples, flips, draws) gives the same loss; the
    other flip's cached latents (a wrong draw) move it by far more than the tolerance."""
    from sdjax.data.input_pipeline import make_iterator
    from sdjax.text.tokenizer import batch_tokenizers
    config, folder, _ = written
    pre = ldm_stage.load(config)
    images = next(make_iterator(config.data, batch_tokenizers(pre), 4, config.seed))
    cached = next(make_iterator(_cached(config, folder).data, {}, 4, config.seed))
    abar = schedules.alphas_cumprod(schedules.scheduler_settings(pre.scheduler))
    loss = jax.jit(ldm_step.make_loss_fn(pre.modules, config, jnp.asarray(abar), ldm_stage.empty_prompt_ids(pre),
                                         cache.empty_text(folder)))
    key = {"key": jax.random.split(jax.random.key(3), 4)}
    trainable, frozen = {"unet": pre.params["unet"]}, {k: v for k, v in pre.params.items() if k != "unet"}
    a = float(loss(trainable, frozen, {**images, **key}))
    b = float(loss(trainable, frozen, {**cached, **key}))
    assert abs(a - b) <= 1e-6 * abs(a)
    source = cache.CacheSource(folder)
    mirrored, r = dict(cached), [source[j] for j in range(len(source))]
    for i in range(4):  # the batch's examples with their other view: which view each has is read off the records
        match = [x for x in r if np.array_equal(x["latent_mean"], cached["latent_mean"][i])
                 or np.array_equal(x["latent_mean_flip"], cached["latent_mean"][i])][0]
        flipped = np.array_equal(match["latent_mean_flip"], cached["latent_mean"][i])
        for k in ("latent_mean", "latent_std"):
            mirrored[k] = mirrored[k].copy()
            mirrored[k][i] = match[k if flipped else k + "_flip"]
    c = float(loss(trainable, frozen, {**mirrored, **key}))
    print(f"cache vs images {abs(a - b):.1e}, the other flip {abs(c - a):.1e}")
    assert abs(c - a) > 100 * 1e-6 * abs(a)


def test_training_from_the_cache_resumes_exactly(written, tmp_path):
    """train.py's loop over the cache (its loss equals the images' above): 2 steps + 1 after a restart ==
    3 straight, bit for bit."""
    config, folder, _ = written
    c = _cached(config, folder)
    loop.train(c, str(tmp_path / "straight"))
    c.total_steps = 2
    loop.train(c, str(tmp_path / "resumed"))
    c.total_steps = STEPS
    loop.train(c, str(tmp_path / "resumed"))
    np.testing.assert_array_equal(_losses(tmp_path / "resumed"), _losses(tmp_path / "straight"))
    for x, y in zip(jax.tree.leaves(load_params(tmp_path / "straight")), jax.tree.leaves(load_params(tmp_path / "resumed"))):
        np.testing.assert_array_equal(x, y)


def test_stale_or_mismatched_caches_are_refused(written, tmp_path):
    config, folder, _ = written
    other = config.copy_and_resolve_references()
    other.seed = 5  # another random VAE / text tower: other weights
    with pytest.raises(ValueError, match="other VAE / text-tower weights"):
        loop.setup(_cached(other, folder), str(tmp_path / "w"))
    with pytest.raises(ValueError, match="other weights"):
        cache_writer.write(other, folder, ldm_stage.load(other), examples_per_shard=10, progress=False)
    bigger = _cached(config, folder)
    bigger.data.image_size = 64
    with pytest.raises(ValueError, match="holds 32"):
        loop.setup(bigger, str(tmp_path / "w2"))


def test_an_interrupted_cache_finishes_without_redoing_shards(written, tmp_path):
    config, folder, manifest = written
    copy = str(tmp_path / "copy")
    os.makedirs(copy)
    for name in os.listdir(folder):
        with open(os.path.join(folder, name), "rb") as src, open(os.path.join(copy, name), "wb") as dst:
            dst.write(src.read())
    os.remove(os.path.join(copy, manifest["shards"][1]))  # as if the writer died in shard 1
    kept = {s: os.stat(os.path.join(copy, s)).st_mtime_ns for s in manifest["shards"] if s != manifest["shards"][1]}
    again = cache_writer.write(config, copy, ldm_stage.load(config), examples_per_shard=10, batch_size=4, progress=False)
    assert again["complete"]
    assert {s: os.stat(os.path.join(copy, s)).st_mtime_ns for s in kept} == kept  # not rewritten
    a, b = cache.CacheSource(folder), cache.CacheSource(copy)
    for i in range(10, 20):
        np.testing.assert_allclose(b[i]["latent_mean"], a[i]["latent_mean"], rtol=1e-6)

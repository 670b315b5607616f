"""Writing the latent and text cache (the reading side, and its format: sdjax.data.cache).

    python -m sdjax.train.ldm.cache --config configs/train/tiny.py --out /data/cache [--config.data.path=...]

See sdjax.data.cache for what a record holds; this module encodes the config's data with the frozen VAE and
text tower(s), per process with its local devices, and checks a cache against the weights training uses.
"""
import hashlib
import logging
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sdjax.data import examples, input_pipeline
from sdjax.data.cache import EMPTY, FORMAT, MANIFEST, _read_manifest, _serialize, _write_json, shard_name
from sdjax.models.autoencoder import serving
from sdjax.models.clip_text import text_conditioning
from sdjax.text.tokenizer import batch_tokenizers, tokenize

log = logging.getLogger("sdjax")
FROZEN = ("vae", "text_encoder", "text_encoder_2")


def weights_hash(params):
    """sha256 (16 hex digits) of the VAE and text towers' params (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256()
    for kind in [k for k in FROZEN if k in params]:
        for path, value in sorted(traverse_util.flatten_dict(params[kind]).items()):
            value = np.asarray(value)
            h.update(f"{kind}/{'/'.join(path)}:{value.dtype}:{value.shape}".encode())
            h.update(np.ascontiguousarray(value).tobytes())
    return h.hexdigest()[:16]


def settings(config, pre):
    """What a cache depends on: a cache is read only for equal settings."""
    data = input_pipeline.resolve_config(config.data)
    if data.source == "cache":
        raise ValueError("cache: the config's data is a cache already; give the data to encode")
    if not data.center_crop:
        raise ValueError("cache: a cache holds one crop per image: set data.center_crop=True")
    return {"format": FORMAT, "weights": weights_hash(pre.params), "data": input_pipeline.builder(data).info.full_name,
            "split": data.split, "image_size": data.image_size, "random_flip": bool(data.random_flip),
            "compute_dtype": str(jnp.dtype(pre.modules["unet"].dtype)), "sdxl": "text_encoder_2" in pre.modules}


def make_encoder(pre, mesh):
    """Jitted (params, images [n, H, W, 3], ids) -> {posterior mean, std, text conditioning}, over `mesh`."""
    vae = serving(pre.modules["vae"])

    def encode(p, images, ids):
        post = vae.apply({"params": p["vae"]}, images, method="encode")
        text = text_conditioning(pre.modules, p, ids)
        return {"latent_mean": post.mean.astype(jnp.float32), "latent_std": post.std.astype(jnp.float32),
                **{k: v.astype(jnp.float32) for k, v in text.items()}}

    batch = NamedSharding(mesh, P("data"))
    return jax.jit(encode, in_shardings=(NamedSharding(mesh, P()), batch, batch), out_shardings=batch)


def write(config, out, pre, examples_per_shard=1024, batch_size=8, process_index=0, process_count=1, progress=True):
    """Encode the config's data into `out` (see the module docstring); returns the manifest."""
    expected = settings(config, pre)
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, MANIFEST)
    if os.path.isfile(path):
        manifest = _read_manifest(out)
        if manifest["settings"] != expected:
            changed = sorted(k for k in expected if manifest["settings"].get(k) != expected[k])
            raise ValueError(f"cache: {out} was written with other {', '.join(changed)}: remove it or choose another "
                             f"--out")
    data = input_pipeline.resolve_config(config.data)
    source = input_pipeline.prepare(data)
    n = len(source)
    num_shards = math.ceil(n / examples_per_shard)
    devices = jax.local_devices()
    mesh = Mesh(np.array(devices), ("data",))
    params = jax.device_put({k: pre.params[k] for k in FROZEN if k in pre.params}, NamedSharding(mesh, P()))
    encode = make_encoder(pre, mesh)
    tokenizers = batch_tokenizers(pre)
    view = examples.Preprocess(data.image_size, True, False)
    flips = (False, True) if data.random_flip else (False,)
    step = batch_size * len(devices)
    if process_index == 0:
        empty = {k: v[:1] for k, v in _encode_captions(encode, params, tokenizers, [""] * len(devices), data).items()}
        np.savez(os.path.join(out, EMPTY), **{k: v[0] for k, v in empty.items() if not k.startswith("latent")})
        _write_json(path, {"settings": expected, "num_examples": n, "examples_per_shard": examples_per_shard,
                           "shards": [shard_name(j, num_shards) for j in range(num_shards)], "complete": False})
    mine = [j for j in range(process_index, num_shards, process_count)
            if not os.path.isfile(os.path.join(out, shard_name(j, num_shards)))]
    todo = sum(min(examples_per_shard, n - j * examples_per_shard) for j in mine)
    bar = _progress(todo, progress and process_index == 0)
    for j in mine:
        final = os.path.join(out, shard_name(j, num_shards))
        writer = ArrayRecordWriter(final + ".tmp", "group_size:1")
        indices = range(j * examples_per_shard, min((j + 1) * examples_per_shard, n))
        for start in range(0, len(indices), step):
            chunk = indices[start:start + step]
            views = [[view.view(source[i], flip=f) for f in flips] for i in chunk]
            good = [v for v in views if v[0]["image"] is not None]
            encoded = _encode_views(encode, params, tokenizers, good, step) if good else {}
            k = 0
            for i, v in zip(chunk, views):
                record = {"index": np.int64(i), "name": np.str_(v[0]["name"])}
                if v[0]["image"] is None:
                    record["bad"] = np.bool_(True)
                else:
                    for f, fv in zip(flips, v):
                        suffix = "_flip" if f else ""
                        record.update({key + suffix: encoded[key][k * len(flips) + f] for key in encoded})
                        record["crop_top_left" + suffix] = np.asarray(fv["crop_top_left"], np.int32)
                    record["original_size"] = np.asarray(v[0]["original_size"], np.int32)
                    k += 1
                writer.write(_serialize(record))
            bar.update(len(chunk))
        writer.close()
        os.replace(final + ".tmp", final)
    bar.close()
    if process_count > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("sdjax cache written")
    manifest = _read_manifest(out)
    if process_index == 0:
        manifest["complete"] = all(os.path.isfile(os.path.join(out, s)) for s in manifest["shards"])
        _write_json(path, manifest)
    return manifest


def _encode_captions(encode, params, tokenizers, captions, data):
    ids = {key: tokenize(t, captions)[0] for key, t in tokenizers.items()}
    images = np.zeros((len(captions), data.image_size, data.image_size, 3), np.float32)
    return jax.device_get(encode(params, images, ids))


def _encode_views(encode, params, tokenizers, views, step):
    """Encode [example][flip] views, padded to `step` rows per call; rows in (example, flip) order."""
    flat = [v for example in views for v in example]
    out = []
    for start in range(0, len(flat), step):
        rows = flat[start:start + step]
        pad = rows + [rows[-1]] * (step - len(rows))  # one shape: one compile
        images = np.stack([r["image"] for r in pad]).astype(np.float32) / 127.5 - 1.0
        ids = {key: tokenize(t, [r["caption"] for r in pad])[0] for key, t in tokenizers.items()}
        out.append(jax.tree.map(lambda x: x[:len(rows)], jax.device_get(encode(params, images, ids))))
    return {k: np.concatenate([o[k] for o in out]) for k in out[0]}


def _progress(total, enabled):
    from tqdm import tqdm
    return tqdm(total=total, unit="img", desc="cache", disable=not enabled, file=sys.stderr)


def check(folder, pre, config):
    """ValueError unless `folder` holds a complete cache written for these weights and this config's data
    sizes (image_size, random_flip)."""
    manifest = _read_manifest(folder)
    if not manifest["complete"]:
        raise ValueError(f"cache: {folder} is incomplete (its writer stopped): rerun python -m sdjax.train.ldm.cache")
    s = manifest["settings"]
    if s["weights"] != weights_hash(pre.params):
        raise ValueError(f"cache: {folder} was encoded with other VAE / text-tower weights (hash {s['weights']}, "
                         f"these {weights_hash(pre.params)}): re-encode it")
    data = input_pipeline.resolve_config(config.data)
    if data.image_size != s["image_size"] or (data.random_flip and not s["random_flip"]):
        raise ValueError(f"cache: {folder} holds {s['image_size']}² crops{' and their flips' * s['random_flip']}; "
                         f"the config asks for {data.image_size}²{', flipped at random' * data.random_flip}")
    if config.get("train_text_encoder"):
        raise ValueError("cache: the text conditioning is cached, so the text encoder cannot train: "
                         "set train_text_encoder=False or train from the images")
    return manifest


def main(argv):
    from sdjax.train import distributed
    from sdjax.train.stages import stage_for
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.getLogger("sdjax").setLevel(logging.INFO)
    config = _CONFIG.value
    with distributed.joined(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value):
        try:
            pre = stage_for(config).load(config)
            manifest = write(config, _OUT.value, pre, _PER_SHARD.value, _BATCH.value, jax.process_index(),
                             jax.process_count())
        except (ValueError, OSError) as e:
            sys.exit(f"sdjax.data.cache: {e}")
    log.info("cache: %d examples in %d shards at %s%s", manifest["num_examples"], len(manifest["shards"]),
             _OUT.value, "" if manifest["complete"] else " (incomplete: rerun to finish)")


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags
    _CONFIG = config_flags.DEFINE_config_file("config", None, "a configs/train/*.py file: its model and data")
    _OUT = flags.DEFINE_string("out", None, "the cache folder")
    _PER_SHARD = flags.DEFINE_integer("examples_per_shard", 1024, "records per ArrayRecord file")
    _BATCH = flags.DEFINE_integer("batch_size", 8, "images per device per encoder call")
    _COORDINATOR = flags.DEFINE_string("coordinator", None, "multi-host: address:port of process 0")
    _NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "multi-host: number of processes")
    _PROCESS_ID = flags.DEFINE_integer("process_id", None, "multi-host: this process's index")
    flags.mark_flags_as_required(["config", "out"])
    app.run(main)

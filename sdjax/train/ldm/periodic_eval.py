"""Evaluation during training (`config.eval`): every `every` steps, the EMA weights' images of a fixed subset of a
captions file (the first `num_captions`, `images_per_caption` each, seeded as `python -m sdjax.eval` seeds them),
sampled from the run's own shards over its mesh (as the config's sample prompts are), scored by FID against given
statistics and by CLIP score, and logged to metrics.jsonl and TensorBoard as eval/fid, eval/clip_score and
eval/clip_cosine. The scoring networks stay on every process's local devices for the run (`sdjax.train.memory`
counts them); each process scores the images it gathered, process 0 logs."""
import os

import ml_collections

from sdjax.train.config import require


def default_config():
    """The `config.eval` fields, off."""
    return ml_collections.ConfigDict(dict(
        every=0,                     # steps between evaluations; 0: never
        captions="",                 # a COCO-style captions file (JSONL / CSV / TSV: id, caption)
        num_captions=100,            # its first captions, the fixed subset (0: all)
        images_per_caption=1,
        num_steps=25,                # sampler steps, guidance, sampler ("": the model's own scheduler)
        guidance_scale=7.5,
        sampler="",
        batch_size=0,                # images per sampling call over the mesh (0: one per device)
        fid_ref="",                  # FID's reference: pytorch-fid statistics (.npz) or a folder of images
        inception="",                # pytorch-fid's Inception weights ("": $SDJAX_FID_INCEPTION or torch's cache)
        dims=2048,
        clip="",                     # CLIP score's model (transformers CLIPModel folder or open_clip checkpoint)
        score_batch_size=50,         # images per Inception / CLIP call
    ))


def enabled(config):
    return bool(config.get("eval") and config.eval.every)


def check(config):
    """The `eval` section: its numbers, and its files present (read now, not at the first evaluation)."""
    if not config.get("eval"):
        return
    c = config.eval
    require(c.every >= 0, f"eval.every must be >= 0 (0: never), got {c.every}")
    if not c.every:
        return
    for key in ("num_captions", "batch_size"):
        require(c[key] >= 0, f"eval.{key} must be >= 0, got {c[key]}")
    for key in ("images_per_caption", "num_steps", "score_batch_size"):
        require(c[key] >= 1, f"eval.{key} must be >= 1, got {c[key]}")
    require(bool(c.fid_ref or c.clip), "eval needs eval.fid_ref (FID) or eval.clip (CLIP score), or both")
    require(bool(c.captions), "eval.captions: give a captions file")
    for key in ("captions", "fid_ref", "inception", "clip"):
        require(not c[key] or os.path.exists(c[key]), f"eval.{key}: no such file or folder: {c[key]}")
    from sdjax.eval.image_set import read_captions
    read_captions(c.captions, "eval.captions")


class Evaluator:
    """The evaluation's images (`image_set.Item`s) and its Scorer, loaded once; called with a pipeline whose params
    are the ones to evaluate, on `mesh`."""

    def __init__(self, c, mesh):
        from sdjax.eval import image_set
        from sdjax.eval.scoring import Scorer
        captions = image_set.read_captions(c.captions, "eval.captions")[:c.num_captions or None]
        self.todo = image_set.items(captions, c.images_per_caption)
        self.scorer = Scorer(c.fid_ref or None, c.inception or None, c.dims, c.clip or None, c.score_batch_size)
        self.batch_size = c.batch_size or mesh.size
        self.options = dict(num_steps=c.num_steps, guidance_scale=c.guidance_scale, sampler=c.sampler or None)

    def __call__(self, pipe):
        """{"eval/fid", "eval/clip_score", "eval/clip_cosine"} of `pipe`'s images (every process calls)."""
        from sdjax.eval import image_set
        self.scorer.reset()
        for batch, images in image_set.sample(pipe, self.todo, self.batch_size, self.options):
            self.scorer.add(images, [item.caption for item in batch])
        return {f"eval/{name}": value for name, value in self.scorer.result().items()}


def _clip_module(path):
    """The CLIPModel (no weights) that sdjax.eval.clip_score.load_clip builds for `path`, from its config alone."""
    from sdjax.eval.clip_score import clip_source
    from sdjax.models.clip_vision import CLIPModel
    from sdjax.weights.clip_model import open_clip_config, transformers_config
    from sdjax.weights.diffusers import read_json
    kind, path = clip_source(path)
    if kind == "transformers":
        return CLIPModel.from_config(read_json(os.path.join(path, "config.json")))
    return CLIPModel.from_config(transformers_config(open_clip_config(None, path)[0]))


def scoring_params(config):
    """{"inception", "clip": params as ShapeDtypeStructs} of the scoring networks `config.eval` loads (none when
    off), from their configurations alone: what every device holds for the run besides the training's arrays."""
    import jax
    import jax.numpy as jnp
    if not enabled(config):
        return {}
    c, key, out = config.eval, jax.random.key(0), {}
    if c.fid_ref:
        from sdjax.models.inception import FIDInceptionV3
        # every block's: load_inception keeps the whole network, whatever the dims
        out["inception"] = jax.eval_shape(FIDInceptionV3().init, key, jnp.zeros((1, 299, 299, 3)))
    if c.clip:
        module = _clip_module(c.clip)
        size = module.vision_model.image_size
        out["clip"] = jax.eval_shape(module.init, key, jnp.zeros((1, size, size, module.vision_model.num_channels)),
                                     jnp.zeros((1, 1), jnp.int32))
    return out

"""The ControlNet stage (config `stage = "controlnet"`; diffusers' examples/controlnet/train_controlnet.py and
train_controlnet_sdxl.py): a ControlNet trained on (image, conditioning image, caption) examples beside the frozen
base model (U-Net, VAE, text tower(s): frozen parts, sharded as any).

The ControlNet starts from the base U-Net (diffusers' `ControlNetModel.from_unet`: conv_in, the time and added
embeddings, the down blocks and the mid block copied; the zero convolutions and the conditioning embedding's conv_out
zero, its other convolutions as torch initialises them) or from a ControlNet folder (`controlnet.init`). The loss is
the LDM stage's (ε or v, min-SNR, caption dropout) of the U-Net's prediction with the ControlNet's residuals, which
reads the batch's "conditioning_images" in [0, 1] (data.conditioning_image names where they are); SDXL: the pooled
text and time ids go to both. The export is a diffusers ControlNet folder (`ControlNetModel.from_pretrained`).
"""
import dataclasses
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from sdjax.models import registry
from sdjax.models.controlnet import ControlNetModel
from sdjax.train.config import compute_dtype, require
from sdjax.train.ldm import dreambooth, ldm_stage, lora_params, periodic_eval, textual_inversion
from sdjax.weights import diffusers
from sdjax.weights.controlnet_files import load_controlnet, save_controlnet

COMPONENT = "controlnet"
INIT_TAG = 0x436E6574  # folded into the seed's key for the conditioning embedding's initialisation ("Cnet")
# U-Net fields that shape the first half, which a ControlNet started from a folder must share with the base U-Net
FIRST_HALF = ("in_channels", "block_out_channels", "layers_per_block", "down_block_types", "cross_attention_dim",
              "transformer_layers_per_block", "attention_head_dim", "num_attention_heads", "use_linear_projection",
              "only_cross_attention", "addition_embed_type", "addition_time_embed_dim",
              "projection_class_embeddings_input_dim")

resolve, make_optimizer = ldm_stage.resolve, ldm_stage.make_optimizer


def default_config():
    """The `controlnet` section: from_unet's conditioning embedding (SD's: 8x down to the latents)."""
    return ml_collections.ConfigDict(dict(
        init="",  # a diffusers ControlNet folder to start from ("": the base U-Net's copy, as from_unet)
        conditioning_embedding_out_channels=(16, 32, 96, 256),  # from_unet: len - 1 strided convs (the VAE's factor)
    ))


def check(config):
    """ValueError naming the first bad field (the LDM stage's, the `controlnet` section's, what it cannot go with)."""
    ldm_stage.check(config)
    c = config.get("controlnet")
    require(c is not None and all(k in c for k in default_config()),
            f"the controlnet stage needs a `controlnet` section with {tuple(default_config())}")
    require(not c.init or os.path.isfile(os.path.join(c.init, "config.json")),
            f"controlnet.init {c.init!r} is no diffusers ControlNet folder (config.json + weights)")
    channels = c.conditioning_embedding_out_channels
    require(not isinstance(channels, str) and len(channels) >= 1 and all(isinstance(n, int) and n >= 1
                                                                          for n in channels),
            f"controlnet.conditioning_embedding_out_channels must be a list of positive integers, got {channels!r}")
    require(bool(config.data.get("conditioning_image")), "data.conditioning_image is empty: the controlnet stage "
            "trains on (image, conditioning image, caption) examples: name the listing's column of conditioning "
            "images (e.g. 'conditioning_image'; a folder's {stem}.cond.png, webdataset's {key}.cond.png)")
    for name, on in (("lora", lora_params.enabled(config)), ("textual_inversion", textual_inversion.enabled(config)),
                     ("dreambooth", dreambooth.enabled(config)), ("train_text_encoder",
                                                                 bool(config.get("train_text_encoder")))):
        require(not on, f"{name}: the controlnet stage trains the ControlNet alone; leave {name} off")
    for name, on in (("sample.every", bool(config.get("sample") and config.sample.every)),
                     ("eval.every", periodic_eval.enabled(config))):
        require(not on, f"{name}: sampling during ControlNet training needs control images; set it to 0 and sample "
                        "the export (--export_dir) with its control images")


def trainable_names(config):
    return (COMPONENT,)


def _module(config, unet, vae):
    """The ControlNetModel of the run: controlnet.init's, or the U-Net's first half with the configured
    conditioning embedding; ValueError when it does not fit the base U-Net or the VAE's factor."""
    c = config.controlnet
    if c.init:
        module = registry.build(COMPONENT, diffusers.read_json(os.path.join(c.init, "config.json")))
        for field in FIRST_HALF:
            ours, base = getattr(module, field), getattr(unet, field)
            require(ours == base, f"controlnet.init {c.init}: its {field} {ours!r} is not the base U-Net's {base!r} "
                                  "(its residuals would not fit the U-Net)")
    else:
        fields = {f.name: getattr(unet, f.name) for f in dataclasses.fields(unet) if f.name not in ("parent", "name")}
        module = ControlNetModel(**fields,
                                 conditioning_embedding_out_channels=tuple(c.conditioning_embedding_out_channels))
    ours, factor = len(module.conditioning_embedding_out_channels), len(vae.block_out_channels)
    require(ours == factor, f"{f'controlnet.init {c.init}: ' if c.init else ''}conditioning_embedding_out_channels "
            f"{module.conditioning_embedding_out_channels} bring the conditioning image down {2 ** (ours - 1)}x, the "
            f"VAE's latents are {2 ** (factor - 1)}x smaller than the images: give {factor} channel counts")
    return module.clone(dtype=compute_dtype(config), param_dtype=jnp.float32, remat=bool(config.get("remat")))


def from_unet(module, unet_params, seed):
    """The params of ControlNet `module` as diffusers' `ControlNetModel.from_unet` makes them from the U-Net's
    `unet_params`: every tree the U-Net has (conv_in, time_embedding, add_embedding, down_blocks_*, mid_block) copied,
    the conditioning embedding's convolutions as torch's default (kernel and bias uniform in +-1/sqrt(fan_in)) keyed
    by `seed` and the layer's place, its conv_out and the zero convolutions zero (float32)."""
    shapes = registry.param_shapes(COMPONENT, module)
    key = jax.random.fold_in(jax.random.key(seed), INIT_TAG)
    embedding = traverse_util.flatten_dict(shapes["controlnet_cond_embedding"])
    drawn = {}
    for j, path in enumerate(sorted(p for p in embedding if p[0] != "conv_out")):
        bound = 1 / math.sqrt(math.prod(embedding[path[:-1] + ("kernel",)].shape[:-1]))
        drawn[path] = np.asarray(jax.random.uniform(jax.random.fold_in(key, j), embedding[path].shape, jnp.float32,
                                                    -bound, bound))
    out = {}
    for name, tree in shapes.items():
        if name in unet_params:
            out[name] = jax.tree.map(lambda x: np.asarray(x, np.float32), unet_params[name])
        else:
            out[name] = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), tree)
    out["controlnet_cond_embedding"] = traverse_util.unflatten_dict(
        {p: drawn.get(p, np.zeros(s.shape, np.float32)) for p, s in embedding.items()})
    return out


def load(config, abstract=()):
    """The LDM stage's Pretrained (sdjax.train.ldm.ldm_stage.load, `abstract` as there) with the ControlNet as the
    COMPONENT module and params (`from_unet`'s, or controlnet.init's; ShapeDtypeStructs when `abstract`)."""
    pre = ldm_stage.load(config, abstract)
    module = _module(config, pre.modules["unet"], pre.modules["vae"])
    if abstract:
        params = registry.param_shapes(COMPONENT, module)
    elif config.controlnet.init:
        params = load_controlnet(config.controlnet.init)[1]
    else:
        params = from_unet(module, pre.params["unet"], config.seed)
    return dataclasses.replace(pre, modules={**pre.modules, COMPONENT: module},
                               params={**pre.params, COMPONENT: params})


def controlnet_prediction(modules, p, x_t, t, cond, micro):
    """The U-Net's prediction with the residuals of the ControlNet, which reads micro["conditioning_images"]
    [b, H, W, 3] in [0, 1] (ldm_step.make_loss_fn's `predict`)."""
    down, mid = modules[COMPONENT].apply({"params": p[COMPONENT]}, x_t, t, controlnet_cond=micro["conditioning_images"],
                                         **cond)
    return modules["unet"].apply({"params": p["unet"]}, x_t, t, **cond, down_residuals=down, mid_residual=mid)


def make_train_step(pre, config, tx, schedule, mesh=None):
    """train_step(state, frozen, batch) -> (state, metrics): the LDM step (sdjax.train.ldm.ldm_step) predicting with
    the ControlNet's residuals."""
    return ldm_stage.make_train_step(pre, config, tx, schedule, mesh, predict=controlnet_prediction)


def batch_shapes(pre, batch_size, image_size):
    """The train step's batch as ShapeDtypeStructs (the LDM stage's and the conditioning images)."""
    return {**ldm_stage.batch_shapes(pre, batch_size, image_size),
            "conditioning_images": jax.ShapeDtypeStruct((batch_size, image_size, image_size, 3), jnp.float32)}


def export(config, params, out_dir):
    """Write the trained ControlNet (`params`: {COMPONENT: params}) as a diffusers ControlNet folder in out_dir (its
    config: controlnet.init's, or the base U-Net's first half, read from `pretrained` or the `model` section)."""
    pre = ldm_stage.load(config, abstract=() if config.get("pretrained") else ldm_stage.KINDS)
    save_controlnet(out_dir, _module(config, pre.modules["unet"], pre.modules["vae"]), params[COMPONENT])
    return out_dir

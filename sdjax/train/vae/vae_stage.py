"""The autoencoder stage (config `stage = "autoencoder"`): check, load, trainable parts, optimizer, step, export.

Trains the KL autoencoder ("vae") and a PatchGAN ("discriminator"), each with its own optax
optimizer (one multi_transform over the {"vae", "discriminator"} param dict, so the LDM stage's
state, sharding and checkpoint code serve unchanged); LPIPS, when used, is frozen.
"""
import os
import tempfile

import jax
import jax.numpy as jnp
import optax

from sdjax.models import registry
from sdjax.models.discriminator import NLayerDiscriminator
from sdjax.text.clip_vocab import write_clip_tokenizer
from sdjax.text.tokenizer import load_tokenizer
from sdjax.train.config import check_common, check_optimizer, compute_dtype, require
from sdjax.train.optim import make_optimizer as make_one_optimizer
from sdjax.train.vae import vae_step
from sdjax.weights.diffusers import load_component, read_json, save_component
from sdjax.weights.lpips import load_lpips
from sdjax.weights.pretrained import Pretrained

TRAINABLE = ("vae", "discriminator")


def lpips_paths(loss):
    """The LPIPS weight files named by loss.lpips_weights (comma-separated), checked to exist."""
    paths = [p.strip() for p in str(loss.get("lpips_weights") or "").split(",") if p.strip()]
    for p in paths:
        require(os.path.isfile(p), f"loss.lpips_weights: no file {p!r}")
    return paths


def check(config):
    """Raise ValueError naming the first field whose value is missing or invalid."""
    check_common(config, ("disc_optimizer",))
    require(bool(config.get("pretrained")) or "vae" in config.get("model", {}),
            "needs `model.vae` (architecture) or `pretrained` (a diffusers folder with vae/)")
    require("discriminator" in config.get("model", {}), "needs `model.discriminator`")
    check_optimizer(config.disc_optimizer, "disc_optimizer")
    require(config.optimizer.get("grad_accum_steps", 1) == 1,
            "optimizer.grad_accum_steps must be 1 (the adaptive GAN weight is per batch)")
    loss = config.loss
    for key in ("l1_weight", "l2_weight", "kl_weight", "perceptual_weight", "disc_weight", "disc_factor"):
        require(loss[key] >= 0, f"loss.{key} must be >= 0, got {loss[key]}")
    require(loss.disc_start >= 0, f"loss.disc_start must be >= 0, got {loss.disc_start}")
    require(loss.perceptual_weight == 0 or lpips_paths(loss),
            "loss.perceptual_weight > 0 needs loss.lpips_weights (LPIPS lin layers + VGG16 trunk files)")


def trainable_names(config):
    """Components whose params the optimizer updates (LPIPS, when used, stays frozen)."""
    return TRAINABLE


def resolve(config, pre):
    """The config as given: nothing to fill in."""
    return config


def vae_module(config):
    """The VAE architecture: the `pretrained` folder's vae/config.json, else `model.vae`."""
    if config.get("pretrained"):
        return registry.build("vae", read_json(os.path.join(config.pretrained, "vae", "config.json")))
    return registry.build("vae", config.model.vae.to_dict())


def load(config):
    """Pretrained-like bundle: modules {vae, discriminator[, lpips]} in the compute dtype, float32 params.

    Random init is keyed by the seed; the tokenizer is there for the input pipeline only.
    """
    dtype = compute_dtype(config)
    key = jax.random.key(config.seed)
    vae = vae_module(config)
    if config.get("pretrained"):
        vae_params = load_component(config.pretrained, "vae")[1]
    else:
        vae_params = registry.init_params("vae", vae, jax.random.fold_in(key, 1))
    disc = NLayerDiscriminator.from_config(config.model.discriminator.to_dict())
    size = config.data.image_size
    modules = {"vae": vae, "discriminator": disc}
    params = {"vae": vae_params, "discriminator": disc.init_params(jax.random.fold_in(key, 3), size)}
    if config.loss.perceptual_weight > 0:
        modules["lpips"], params["lpips"] = load_lpips(lpips_paths(config.loss))
    modules = {k: m.clone(dtype=dtype, param_dtype=jnp.float32) for k, m in modules.items()}
    tokenizer = load_tokenizer(config.get("tokenizer") or write_clip_tokenizer(tempfile.mkdtemp(prefix="sdjax_tok_")))
    return Pretrained(modules, params, tokenizer, {}, config.get("pretrained") or "")


def make_optimizer(config):
    """(optax transformation over {"vae", "discriminator"} params, the vae's learning-rate schedule)."""
    tx_vae, schedule = make_one_optimizer(config.optimizer, config.total_steps)
    tx_disc, _ = make_one_optimizer(config.disc_optimizer, config.total_steps)
    labels = lambda params: {k: jax.tree.map(lambda _: k, v) for k, v in params.items()}  # noqa: E731
    return optax.multi_transform({"vae": tx_vae, "discriminator": tx_disc}, labels), schedule


def make_train_step(pre, config, tx, schedule, mesh=None):
    """train_step(state, frozen, batch) -> (state, metrics): see sdjax.train.vae.vae_step."""
    return vae_step.make_train_step(pre.modules, config, tx, schedule)


def export(config, params, out_dir):
    """Write `out_dir/vae` (config.json + safetensors, diffusers layout) from the trained {"vae": ...} params."""
    save_component(out_dir, "vae", vae_module(config), jax.device_get(params["vae"]))
    return out_dir

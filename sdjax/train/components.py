"""What a run trains and with what: modules, initial params, tokenizer and noise schedule, from the config."""
import tempfile

import jax
import jax.numpy as jnp

from sdjax.text.clip_vocab import write_clip_tokenizer
from sdjax.models import registry
from sdjax.text.tokenizer import load_tokenizer, tokenize
from sdjax.train.config import compute_dtype
from sdjax.weights.diffusers import KINDS
from sdjax.weights.pretrained import Pretrained, load_pretrained


def trainable_names(config):
    """Components whose params the optimizer updates."""
    return ("unet", "text_encoder") if config.get("train_text_encoder") else ("unet",)


def load(config):
    """Pretrained (modules computing in the config's dtype, float32 params) from `pretrained` or `model` + seed.

    Random init is keyed by the seed, so the frozen parts of a from-scratch run can be rebuilt exactly.
    """
    dtype = compute_dtype(config)
    if config.get("pretrained"):
        pre = load_pretrained(config.pretrained)
        modules, params, tokenizer, scheduler = pre.modules, pre.params, pre.tokenizer, dict(pre.scheduler)
    else:
        modules = {k: registry.build(k, config.model[k].to_dict()) for k in KINDS}
        key = jax.random.key(config.seed)
        params = {k: registry.init_params(k, modules[k], jax.random.fold_in(key, i)) for i, k in enumerate(KINDS)}
        tokenizer, scheduler = None, config.model.scheduler.to_dict()
    if config.get("tokenizer") or tokenizer is None:
        tokenizer = load_tokenizer(config.get("tokenizer") or write_clip_tokenizer(tempfile.mkdtemp(prefix="sdjax_tok_")))
    modules = {k: m.clone(dtype=dtype, param_dtype=jnp.float32) for k, m in modules.items()}
    if config.get("remat"):
        modules["unet"] = modules["unet"].clone(remat=True)
    scheduler["prediction_type"] = config.loss.prediction_type or scheduler.get("prediction_type", "epsilon")
    return Pretrained(modules, params, tokenizer, scheduler, config.get("pretrained") or "")


def resolved(config, scheduler):
    """Copy of config with loss.prediction_type filled in from the scheduler when empty."""
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.loss.prediction_type = scheduler["prediction_type"]
    return config


def empty_prompt_ids(tokenizer):
    """int32 [77] ids of the empty caption (what caption dropout puts in)."""
    return tokenize(tokenizer, [""])[0][0]


def split(params, trainable):
    """(trainable, frozen) dicts of {component: params}."""
    return ({k: v for k, v in params.items() if k in trainable},
            {k: v for k, v in params.items() if k not in trainable})

"""The LDM stage (the default, config `stage = "ldm"`): check, load, trainable parts, optimizer, step, export.

Trains the U-Net (and the text encoders with `train_text_encoder`) on latents of the frozen VAE; SD 1.x/2.x and
SDXL base models (two towers, micro-conditioning from each example's size and crop).
"""
import dataclasses
import functools
import tempfile

import jax
import jax.numpy as jnp

from sdjax.diffusion import schedules
from sdjax.diffusion.schedules import PREDICTION_TYPES
from sdjax.models import registry
from sdjax.pipeline.conditioning_xl import OPTION_DEFAULTS
from sdjax.text.clip_vocab import write_clip_tokenizer
from sdjax.errors import UnsupportedConfig
from sdjax.text.tokenizer import batch_tokenizers, load_tokenizer, tokenize
from sdjax.train import optim
from sdjax.train.config import check_common, compute_dtype, require
from sdjax.train.ldm import dreambooth, ldm_step, lora_params, periodic_eval, textual_inversion
from sdjax.weights.diffusers import KINDS
from sdjax.weights.lora_files import lora_tensors
from sdjax.weights.pretrained import Pretrained, load_pretrained, save_pretrained

LATENTS = ("sample", "mean")


def check(config):
    """Raise ValueError naming the first field whose value is missing or invalid."""
    check_common(config)
    require(bool(config.get("pretrained")) or "model" in config, "needs `model` (architecture) or `pretrained` (path)")
    opt, loss = config.optimizer, config.loss
    require(opt.grad_accum_steps >= 1 and config.batch_size % opt.grad_accum_steps == 0,
            f"optimizer.grad_accum_steps={opt.grad_accum_steps} must divide batch_size={config.batch_size}")
    require(loss.prediction_type in PREDICTION_TYPES + ("",),
            f"loss.prediction_type must be one of {PREDICTION_TYPES} or '' (the scheduler's), got {loss.prediction_type!r}")
    require(0 <= loss.caption_dropout <= 1, f"loss.caption_dropout must be in [0, 1], got {loss.caption_dropout}")
    require(loss.latent in LATENTS, f"loss.latent must be one of {LATENTS}, got {loss.latent!r}")
    textual_inversion.check(config)
    dreambooth.check(config)
    periodic_eval.check(config)
    if lora_params.enabled(config):
        lora_params.check(config)
        require(not textual_inversion.enabled(config), "lora and textual_inversion train different parameters: "
                "choose one per run")


def trainable_names(config):
    """Components whose params the optimizer updates (SDXL's text_encoder_2 with the text encoder; textual inversion:
    the placeholder's rows only; with `lora`, only its adapters)."""
    if textual_inversion.enabled(config):
        return (textual_inversion.COMPONENT,)
    if lora_params.enabled(config):
        return ("lora",)
    return ("unet", "text_encoder", "text_encoder_2") if config.get("train_text_encoder") else ("unet",)


def load(config, abstract=(), cast_base=True):
    """Pretrained (modules computing in the config's dtype, float32 params) from `pretrained` or `model` + seed;
    with `lora`, its fresh adapters as the params' "lora" component and, cast_base, the U-Net in lora.base_dtype.

    Random init is keyed by the seed, so the frozen parts of a from-scratch run can be rebuilt exactly. Textual
    inversion: with the placeholder's tokens and rows (textual_inversion.prepare).
    abstract: components (KINDS: all; "lora": the adapters, as when any is) whose params are ShapeDtypeStructs of
    the `model` architecture, neither read nor initialised (an init compiles its whole module: most of an export's
    time).
    """
    dtype = compute_dtype(config)
    tokenizer_2 = None
    if config.get("pretrained") and not abstract:
        pre = load_pretrained(config.pretrained)
        modules, params, tokenizer, scheduler = pre.modules, pre.params, pre.tokenizer, dict(pre.scheduler)
        tokenizer_2, options = pre.tokenizer_2, pre.options
    else:
        kinds = {i: k for i, k in enumerate(KINDS) if k in config.model}  # i: a component's init key
        modules = {k: registry.build(k, config.model[k].to_dict()) for k in kinds.values()}
        params, tokenizer, scheduler, options = None, None, config.model.scheduler.to_dict(), {}
    if "text_encoder_2" in modules and "text_encoder" not in modules:
        raise UnsupportedConfig("training an SDXL refiner (text_encoder_2 only, aesthetic-score conditioning) is "
                                "not implemented; train the base")
    if config.get("tokenizer") or tokenizer is None:
        tokenizer = load_tokenizer(config.get("tokenizer") or write_clip_tokenizer(tempfile.mkdtemp(prefix="sdjax_tok_")))
    if "text_encoder_2" in modules and (config.get("tokenizer_2") or tokenizer_2 is None):  # OpenCLIP pads with "!"
        tokenizer_2 = load_tokenizer(config.get("tokenizer_2") or
                                     write_clip_tokenizer(tempfile.mkdtemp(prefix="sdjax_tok_"), pad_token="!"))
    pre = Pretrained(modules, params, tokenizer, scheduler, config.get("pretrained") or "", tokenizer_2, options)
    textual_inversion.initializer_ids(config, pre)  # its tokens checked before the slow part
    if params is None:
        key = jax.random.key(config.seed)
        params = {k: (registry.param_shapes(k, modules[k])
                      if k in abstract else registry.init_params(k, modules[k], jax.random.fold_in(key, i)))
                  for i, k in kinds.items()}
    modules = {k: m.clone(dtype=dtype, param_dtype=jnp.float32) for k, m in modules.items()}
    if config.get("remat"):
        modules["unet"] = modules["unet"].clone(remat=True)
    scheduler["prediction_type"] = config.loss.prediction_type or scheduler.get("prediction_type", "epsilon")
    if lora_params.enabled(config):
        if cast_base and config.lora.base_dtype != "float32":
            dtype = lora_params.BASE_DTYPES[config.lora.base_dtype]
            params["unet"] = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype) if isinstance(
                x, jax.ShapeDtypeStruct) else x.astype(dtype), params["unet"])
        params = {**params, "lora": lora_params.init(config.lora, params, config.seed, abstract=bool(abstract))}
    return textual_inversion.prepare(config, dataclasses.replace(pre, modules=modules, params=params))


def resolve(config, pre):
    """Copy of config with loss.prediction_type filled in from the scheduler of `pre` (a Pretrained) when empty."""
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.loss.prediction_type = pre.scheduler["prediction_type"]
    return config


def empty_prompt_ids(pre):
    """{batch key of token ids: int32 [77] ids of the empty caption} (what caption dropout puts in)."""
    return {key: tokenize(tokenizer, [""])[0][0] for key, tokenizer in batch_tokenizers(pre).items()}


def zero_dropped(pre):
    """Whether dropped captions train on zero text (text and pooled): an SDXL model whose pipeline flag
    force_zeros_for_empty_prompt (diffusers' default: true; the base's model_index.json) makes its sampling's
    unconditional branch zeros, as SDXL's original training zeroed dropped captions. Otherwise the empty caption."""
    return "text_encoder_2" in pre.modules and {**OPTION_DEFAULTS, **pre.options}["force_zeros_for_empty_prompt"]


def batch_shapes(pre, batch_size, image_size):
    """The train step's batch (what the input pipeline gives) as ShapeDtypeStructs."""
    shape = lambda *dims, dtype=jnp.int32: jax.ShapeDtypeStruct(dims, dtype)  # noqa: E731
    return {"images": shape(batch_size, image_size, image_size, 3, dtype=jnp.float32),
            "original_size": shape(batch_size, 2), "crop_top_left": shape(batch_size, 2),
            **{key: shape(batch_size, len(ids)) for key, ids in empty_prompt_ids(pre).items()}}


def make_optimizer(config):
    """(optax transformation, learning-rate schedule) from the `optimizer` section."""
    return optim.make_optimizer(config.optimizer, config.total_steps)


def make_train_step(pre, config, tx, schedule, mesh=None, predict=ldm_step.unet_prediction):
    """train_step(state, frozen, batch) -> (state, metrics): see sdjax.train.ldm.ldm_step (predict: its
    make_loss_fn's)."""
    abar = schedules.alphas_cumprod(schedules.scheduler_settings(pre.scheduler))
    cached = config.data.get("source") == "cache"  # batches of encoded latents and text (sdjax.data.cache)
    if cached:
        from sdjax.data import cache
    return ldm_step.make_train_step(pre.modules, config, tx, schedule, abar, empty_prompt_ids(pre), mesh,
                                    cache.empty_text(config.data.path) if cached else None, zero_dropped(pre),
                                    functools.partial(textual_inversion.model_params, config, pre), predict)


def export(config, params, out_dir):
    """Write a diffusers folder: the trained {component: params} + the frozen ones rebuilt from the config (textual
    inversion: the placeholder's tokens in the tokenizers, its rows in the towers' tables; a LoRA run's adapters:
    merged into the base)."""
    pre = load(config, abstract=() if config.get("pretrained") else tuple(params), cast_base=False)  # the trained
    params = textual_inversion.model_params(config, pre, {**jax.device_get(pre.params), **params})  # parts: not
    params = lora_params.model_params(config, params)  # rebuilt
    save_pretrained(dataclasses.replace(pre, params=params), out_dir)
    return out_dir


def lora_file(config, adapters, fmt):
    """(tensors, header) of a LoRA run's trained `adapters` as a LoRA file in `fmt` (lora_files.lora_tensors), named
    after the layers of the model (read from `pretrained`, else the architecture's shapes)."""
    pre = load(config, abstract=() if config.get("pretrained") else KINDS, cast_base=False)
    return lora_tensors(lora_params.low_rank(config.lora, adapters), pre.params, fmt)

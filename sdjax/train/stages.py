"""A training stage as one interface; `stage_for(config)` picks the one `config.stage` names ("ldm" if none).

A stage is a frozen record of plain functions (each stage module defines them under these names):
  check(config)                     ValueError naming the first bad field (config.check_common + its own)
  load(config) -> Pretrained        modules (compute dtype), float32 params, tokenizer, scheduler ({} if none)
  trainable_names(config)           the components the optimizer updates; the others stay frozen
  resolve(config, pre)              the config the run saves and uses (LDM: loss.prediction_type filled in)
  make_optimizer(config)            (optax transformation over the trainable params, learning-rate schedule)
  make_train_step(pre, config, tx, schedule, mesh)  train_step(state, frozen, batch) -> (state, metrics)
  export(config, params, out_dir)   write the trained {component: params} as a diffusers folder
"""
import dataclasses
from typing import Callable

from sdjax.train.config import require
from sdjax.train.ldm import controlnet_stage, ldm_stage
from sdjax.train.vae import vae_stage


@dataclasses.dataclass(frozen=True)
class Stage:
    check: Callable
    load: Callable
    trainable_names: Callable
    resolve: Callable
    make_optimizer: Callable
    make_train_step: Callable
    export: Callable


def _of(module):
    return Stage(**{f.name: getattr(module, f.name) for f in dataclasses.fields(Stage)})


STAGES = {"ldm": _of(ldm_stage), "autoencoder": _of(vae_stage), "controlnet": _of(controlnet_stage)}


def stage_for(config):
    """The Stage of `config.stage` (default "ldm"); ValueError for an unknown name."""
    name = config.get("stage", "ldm")
    require(name in STAGES, f"stage must be one of {tuple(STAGES)}, got {name!r}")
    return STAGES[name]

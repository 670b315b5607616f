"""From a run's workdir to weights: the trained params pytree, or a diffusers folder for `sample.py --model`."""
import json
import os

import jax
import ml_collections

from sdjax.train.checkpoint import Checkpointer
from sdjax.train.stages import stage_for

CONFIG_FILE = "config.json"


def save_config(config, workdir):
    """Write the run's (resolved) config as JSON; export rebuilds the models from it."""
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
        f.write(config.to_json(indent=2))


def read_config(workdir):
    """The ConfigDict a run in `workdir` was started with."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: is {workdir} a training workdir?")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def load_params(workdir, step=None, ema=True):
    """{component: params} of the trained parts at `step` (default latest), EMA or raw, on one device."""
    ckpt = Checkpointer(workdir, read_only=True)
    try:
        return ckpt.restore_item("ema_params" if ema else "params", step)
    finally:
        ckpt.close()


def export(workdir, out_dir, step=None, ema=True):
    """Write a diffusers folder with the trained params (+ the frozen ones rebuilt from the config):
    the whole model for the LDM stage, out_dir/vae for the autoencoder stage. With several processes
    every one must call it (the checkpoint restore is collective); process 0 writes. Returns out_dir."""
    config = read_config(workdir)
    params = jax.device_get(load_params(workdir, step, ema))
    if jax.process_index() == 0:
        stage_for(config).export(config, params, out_dir)
    return out_dir

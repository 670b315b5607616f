"""The run's config in `workdir/config.json`: written when a run starts, compared when it resumes.

What defines a run (model, pretrained weights, data, seed, batch size, optimizer, loss, precision, ...) must not
change on resume: the checkpoint's state would go on under other rules, silently. What only says how long to
run, how often to log, save, sample or evaluate, or how the same computation is laid out may change: MAY_CHANGE.
"""
import json
import logging
import os

import ml_collections
import orbax.checkpoint as ocp

from sdjax.train import optim
from sdjax.train.checkpoint import checkpoint_dir

log = logging.getLogger("sdjax.train")
CONFIG_FILE = "config.json"

# Fields (and sections: every field under them) a resumed run may change. The layout ones compute the same
# function, to rounding: the mesh (tests/test_train_loop.py: 1 device and 8, fsdp or not, give the same run),
# gradient accumulation (one big batch: tests/test_train_step.py), remat, the attention kernel, GPU determinism.
MAY_CHANGE = ("total_steps", "log_every", "checkpoint_every", "keep_checkpoints", "max_bad_steps", "sample", "eval",
              "mesh", "optimizer.grad_accum_steps", "remat", "attention", "deterministic", "target",
              "estimate_attention", "data.data_dir", "data.num_threads", "data.num_workers")
# Fields a stage fills in from the model when given empty (stages.Stage.resolve): compared once resolved.
RESOLVED = ("loss.prediction_type",)


def save_config(config, workdir):
    """Write the run's (resolved) config as JSON, whole or not at all; export rebuilds the models from it."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, CONFIG_FILE)
    with open(f"{path}.{os.getpid()}.tmp", "w") as f:
        f.write(config.to_json(indent=2))
    os.replace(f"{path}.{os.getpid()}.tmp", path)  # other processes may be reading it


def read_config(workdir):
    """The ConfigDict a run in `workdir` was started with."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: is {workdir} a training workdir?")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def _flat(tree, prefix=""):
    """{dotted name: JSON value} of a nested dict."""
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def changes(stored, config):
    """{dotted field: (stored value, new value)} of the fields that differ (None: absent), as JSON values."""
    old, new = _flat(json.loads(stored.to_json())), _flat(json.loads(config.to_json()))
    return {k: (old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)}


def may_change(field):
    return any(field == f or field.startswith(f + ".") for f in MAY_CHANGE)


def check_resume(config, workdir, allow_change=False, fields=None):
    """Compare `config` with the one the run in `workdir` was started with, when it resumes (a checkpoint exists):
    ValueError naming every changed field that defines the run, unless allow_change. fields: compare these
    only (default all). Logs the changes let through, and when the learning-rate schedule moves with
    total_steps. Returns ({field: (old, new)} of the defining changes allow_change let through, to be recorded;
    the RESOLVED fields given empty, left to the model: compare them again once resolved)."""
    steps = ocp.utils.checkpoint_steps(checkpoint_dir(workdir))  # finished checkpoints
    if fields == () or not steps or not os.path.isfile(os.path.join(workdir, CONFIG_FILE)):
        return {}, ()
    found = {k: v for k, v in changes(read_config(workdir), config).items() if fields is None or k in fields}
    pending = tuple(k for k in RESOLVED if k in found and found[k][1] == "")
    found = {k: v for k, v in found.items() if k not in pending}
    refused = {k: v for k, v in found.items() if not may_change(k)}
    listed = lambda d: ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in d.items())  # noqa: E731
    if refused and not allow_change:
        raise ValueError(f"{os.path.join(workdir, CONFIG_FILE)}: resuming with changes to what defines the run: "
                         f"{listed(refused)}; start another workdir, or pass --allow_config_change to go on with them")
    if refused:
        log.warning("resuming with changes to what defines the run (--allow_config_change): %s", listed(refused))
    allowed = {k: v for k, v in found.items() if k not in refused}
    if allowed:
        log.info("resuming with %s", listed(allowed))
    if "total_steps" in found:  # a longer run is how one is extended: say what that does to the learning rate
        at = max(steps)
        for name, opt in config.items():  # the optimizer sections (the autoencoder stage has two)
            if isinstance(opt, ml_collections.ConfigDict) and "schedule" in opt and optim.follows_total_steps(opt):
                old, new = (float(optim.learning_rate(opt, n)(at)) for n in found["total_steps"])
                log.info("%s: the %s learning-rate schedule follows total_steps: at step %d the learning rate moves "
                         "from %.3g to %.3g", name, opt.schedule, at, old, new)
    return refused, pending

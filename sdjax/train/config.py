"""Checks of a training config where it enters (clear messages), and values derived from it."""
import math

import jax
import jax.numpy as jnp

from sdjax.models import attention
from sdjax.train.optim import SCHEDULES

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# jax_default_matmul_precision's values ("": jax's default)
MATMUL_PRECISIONS = ("", "default", "high", "highest", "bfloat16", "tensorfloat32", "float32")
COMMON_FIELDS = ("batch_size", "total_steps", "seed", "optimizer", "loss", "precision", "mesh", "data",
                 "ema_decay", "checkpoint_every", "keep_checkpoints", "log_every", "max_bad_steps")


def require(ok, message):
    """ValueError("train config: message") unless ok."""
    if not ok:
        raise ValueError(f"train config: {message}")


def check_optimizer(opt, name):
    """Check an optimizer section (`name`: its field in the config, for the message)."""
    require(opt.schedule in SCHEDULES, f"{name}.schedule must be one of {SCHEDULES}, got {opt.schedule!r}")
    require(opt.learning_rate > 0, f"{name}.learning_rate must be > 0, got {opt.learning_rate}")
    for key in ("warmup_steps", "decay_steps", "weight_decay", "grad_clip_norm"):  # clip 0: off; decay 0: total
        require(opt.get(key, 0) >= 0, f"{name}.{key} must be >= 0, got {opt.get(key)}")
    for key in ("b1", "b2"):
        require(0 <= opt[key] < 1, f"{name}.{key} must be in [0, 1), got {opt[key]}")
    require(opt.eps > 0, f"{name}.eps must be > 0, got {opt.eps}")


def check_common(config, fields=()):
    """The fields every stage has, and `fields` (a stage's own) present: ValueError naming the first bad one."""
    for key in COMMON_FIELDS + tuple(fields):
        require(key in config, f"missing field {key!r}")
    require(config.batch_size >= 1, f"batch_size must be >= 1, got {config.batch_size}")
    require(config.total_steps >= 1, f"total_steps must be >= 1, got {config.total_steps}")
    check_optimizer(config.optimizer, "optimizer")
    require(0 <= config.ema_decay < 1, f"ema_decay must be in [0, 1), got {config.ema_decay}")
    require(config.precision.compute_dtype in COMPUTE_DTYPES,
            f"precision.compute_dtype must be one of {sorted(COMPUTE_DTYPES)}, got {config.precision.compute_dtype!r}")
    require(config.max_bad_steps >= 1, f"max_bad_steps must be >= 1, got {config.max_bad_steps}")
    require(config.checkpoint_every >= 1 and config.log_every >= 1, "checkpoint_every and log_every must be >= 1")
    require(isinstance(config.seed, int) and 0 <= config.seed < 2 ** 32,
            f"seed must be an integer in [0, 2^32), got {config.seed!r}")
    require(config.get("keep_checkpoints") is None or config.keep_checkpoints >= 1,
            f"keep_checkpoints must be >= 1 (or None: keep all), got {config.keep_checkpoints}")
    matmul_precision(config)
    try:
        attention.check_name(config.get("attention", "auto"), jax.default_backend())
    except ValueError as e:
        require(False, str(e))
    if config.get("sample"):
        check_sample(config.sample)


def check_sample(c):
    """The `sample` section (images of the sample prompts every `every` steps; 0: never)."""
    require(c.every >= 0, f"sample.every must be >= 0 (0: never), got {c.every}")
    if c.every:
        require(len(c.prompts) >= 1 and all(isinstance(p, str) for p in c.prompts),
                f"sample.prompts must be a non-empty list of strings, got {c.prompts!r}")
        require(c.num_steps >= 1, f"sample.num_steps must be >= 1, got {c.num_steps}")
        require(math.isfinite(c.guidance_scale), f"sample.guidance_scale must be a finite number, got {c.guidance_scale}")
        require(0 <= c.seed < 2 ** 32, f"sample.seed must be in [0, 2^32), got {c.seed}")


def check_batch(config, num_devices, process_count):
    """The batch must split evenly over processes and, per micro-batch, over devices."""
    b, k = config.batch_size, config.optimizer.grad_accum_steps
    require(b % process_count == 0, f"batch_size={b} must be a multiple of the {process_count} processes")
    micro = f"batch_size={b}" if k == 1 else f"batch_size / grad_accum_steps = {b} / {k} = {b // k}"
    require((b // k) % num_devices == 0,
            f"{micro} must be a multiple of the {num_devices} devices (each takes an equal share of the batch)")


def matmul_precision(config):
    """precision.matmul checked: a jax_default_matmul_precision value, or None for jax's default."""
    value = config.precision.get("matmul", "")
    require(value in MATMUL_PRECISIONS, f"precision.matmul must be one of {MATMUL_PRECISIONS}, got {value!r}")
    return value or None


def compute_dtype(config):
    """jnp dtype the models compute in (params stay float32)."""
    return COMPUTE_DTYPES[config.precision.compute_dtype]

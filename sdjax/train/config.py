"""Checks of a training config where it enters (clear messages), and values derived from it."""
import jax.numpy as jnp

from sdjax.models.attention import IMPLEMENTATIONS

from sdjax.train.optim import SCHEDULES

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
COMMON_FIELDS = ("batch_size", "total_steps", "seed", "optimizer", "loss", "precision", "mesh", "data",
                 "ema_decay", "checkpoint_every", "keep_checkpoints", "log_every", "max_bad_steps")


def require(ok, message):
    """ValueError("train config: message") unless ok."""
    if not ok:
        raise ValueError(f"train config: {message}")


def check_optimizer(opt, name):
    """Check an optimizer section (`name`: its field in the config, for the message)."""
    require(opt.schedule in SCHEDULES, f"{name}.schedule must be one of {SCHEDULES}, got {opt.schedule!r}")
    require(opt.learning_rate > 0 and opt.warmup_steps >= 0, f"{name}.learning_rate must be > 0, warmup_steps >= 0")


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
    require(config.get("attention", "auto") in IMPLEMENTATIONS,
            f"attention must be one of {IMPLEMENTATIONS}, got {config.get('attention')!r}")


def check_batch(config, num_devices, process_count):
    """The batch must split evenly over processes and, per micro-batch, over devices."""
    b, k = config.batch_size, config.optimizer.grad_accum_steps
    require(b % process_count == 0, f"batch_size={b} must be a multiple of the {process_count} processes")
    micro = f"batch_size={b}" if k == 1 else f"batch_size / grad_accum_steps = {b} / {k} = {b // k}"
    require((b // k) % num_devices == 0,
            f"{micro} must be a multiple of the {num_devices} devices (each takes an equal share of the batch)")


def compute_dtype(config):
    """jnp dtype the models compute in (params stay float32)."""
    return COMPUTE_DTYPES[config.precision.compute_dtype]

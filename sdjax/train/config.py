"""Checks of a training config where it enters (clear messages), and values derived from it."""
import jax.numpy as jnp

from sdjax.diffusion.schedules import PREDICTION_TYPES
from sdjax.train.optim import SCHEDULES

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
LATENTS = ("sample", "mean")


def _require(ok, message):
    if not ok:
        raise ValueError(f"train config: {message}")


def check(config):
    """Raise ValueError naming the first field whose value is missing or invalid."""
    for key in ("batch_size", "total_steps", "seed", "optimizer", "loss", "precision", "mesh", "data",
                "ema_decay", "checkpoint_every", "keep_checkpoints", "log_every", "max_bad_steps"):
        _require(key in config, f"missing field {key!r}")
    _require(bool(config.get("pretrained")) or "model" in config, "needs `model` (architecture) or `pretrained` (path)")
    opt, loss = config.optimizer, config.loss
    _require(config.batch_size >= 1, f"batch_size must be >= 1, got {config.batch_size}")
    _require(config.total_steps >= 1, f"total_steps must be >= 1, got {config.total_steps}")
    _require(opt.grad_accum_steps >= 1 and config.batch_size % opt.grad_accum_steps == 0,
             f"optimizer.grad_accum_steps={opt.grad_accum_steps} must divide batch_size={config.batch_size}")
    _require(opt.schedule in SCHEDULES, f"optimizer.schedule must be one of {SCHEDULES}, got {opt.schedule!r}")
    _require(opt.learning_rate > 0 and opt.warmup_steps >= 0, "optimizer.learning_rate must be > 0, warmup_steps >= 0")
    _require(0 <= config.ema_decay < 1, f"ema_decay must be in [0, 1), got {config.ema_decay}")
    _require(loss.prediction_type in PREDICTION_TYPES + ("",),
             f"loss.prediction_type must be one of {PREDICTION_TYPES} or '' (the scheduler's), got {loss.prediction_type!r}")
    _require(0 <= loss.caption_dropout <= 1, f"loss.caption_dropout must be in [0, 1], got {loss.caption_dropout}")
    _require(loss.latent in LATENTS, f"loss.latent must be one of {LATENTS}, got {loss.latent!r}")
    _require(config.precision.compute_dtype in COMPUTE_DTYPES,
             f"precision.compute_dtype must be one of {sorted(COMPUTE_DTYPES)}, got {config.precision.compute_dtype!r}")
    _require(config.max_bad_steps >= 1, f"max_bad_steps must be >= 1, got {config.max_bad_steps}")
    _require(config.checkpoint_every >= 1 and config.log_every >= 1, "checkpoint_every and log_every must be >= 1")


def check_batch(config, num_devices, process_count):
    """The batch must split evenly over processes and, per micro-batch, over devices."""
    b, k = config.batch_size, config.optimizer.grad_accum_steps
    _require(b % process_count == 0, f"batch_size={b} must be a multiple of the {process_count} processes")
    micro = f"batch_size={b}" if k == 1 else f"batch_size / grad_accum_steps = {b} / {k} = {b // k}"
    _require((b // k) % num_devices == 0,
             f"{micro} must be a multiple of the {num_devices} devices (each takes an equal share of the batch)")


def compute_dtype(config):
    """jnp dtype the models compute in (params stay float32)."""
    return COMPUTE_DTYPES[config.precision.compute_dtype]

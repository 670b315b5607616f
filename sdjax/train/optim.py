"""The optimizer (optax AdamW, warmup + cosine/constant, global-norm clipping), the EMA and the guarded update."""
import functools

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("cosine", "constant")


def learning_rate(opt, total_steps):
    """optax schedule: linear warmup from 0 over `warmup_steps`, then constant, or cosine decay to 0 at
    step `decay_steps` (0 or missing: total_steps)."""
    lr, warmup = opt.learning_rate, opt.warmup_steps
    if opt.schedule == "cosine":
        end = opt.get("decay_steps") or total_steps
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(end, warmup + 1), 0.0)
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])


def follows_total_steps(opt):
    """Whether learning_rate(opt, total_steps) depends on total_steps (a cosine decaying to 0 there)."""
    return opt.schedule == "cosine" and not opt.get("decay_steps")


def make_optimizer(opt, total_steps):
    """(optax transformation, schedule) from the `optimizer` config section."""
    schedule = learning_rate(opt, total_steps)
    tx = optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay)
    if opt.grad_clip_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(opt.grad_clip_norm), tx)
    return tx, schedule


def ema_decay_at(decay, step, warmup):
    """The EMA decay at update `step` (0-based): with `warmup`, min(decay, (1 + step) / (10 + step)), so
    early averages forget the random init quickly; else the constant `decay`."""
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step)) if warmup else decay


def ema_update(ema, params, decay):
    """Exponential moving average of pytrees: decay * ema + (1 - decay) * params."""
    return jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, ema, params)


def guarded_update(state, grads, finite, tx, config):
    """The next state: optimizer + EMA update when `finite`, else unchanged but for the bad-step counters.

    config: ema_decay, and ema_warmup (optional, default False): see ema_decay_at."""
    decay = ema_decay_at(config.ema_decay, state.step, config.get("ema_warmup", False))
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    good = state.replace(params=params, opt_state=opt_state, bad_steps=jnp.zeros_like(state.bad_steps),
                         ema_params=ema_update(state.ema_params, params, decay))
    bad = state.replace(bad_steps=state.bad_steps + 1, total_bad_steps=state.total_bad_steps + 1)
    new = jax.tree.map(functools.partial(jnp.where, finite), good, bad)
    return new.replace(step=state.step + 1)

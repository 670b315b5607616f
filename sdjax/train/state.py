"""The train state: a pytree of everything a training run changes (trainable params, optimizer, EMA, counters)."""
import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class TrainState:
    """step: iterations done; params / ema_params: {component: params pytree} of the trained parts
    (e.g. {"unet": ...}); opt_state: the optax state of params; rng: uint32 [2] base key (each step
    folds in its index); bad_steps: non-finite steps in a row; total_bad_steps: all of them."""
    step: jax.Array
    params: dict
    opt_state: object
    ema_params: dict
    rng: jax.Array
    bad_steps: jax.Array
    total_bad_steps: jax.Array


def create_state(params, tx, seed):
    """Fresh state from trainable params {component: pytree}; EMA starts at the params."""
    zero = jnp.zeros((), jnp.int32)
    return TrainState(step=zero, params=params, opt_state=tx.init(params),
                      ema_params=jax.tree.map(jnp.copy, params), rng=jax.random.PRNGKey(seed),
                      bad_steps=zero, total_bad_steps=zero)


# Checkpoint items: each restores on its own (load_params reads one of them only).
ITEMS = ("params", "ema_params", "opt_state", "counters")


def to_items(state):
    """{item name: pytree} of a state, for checkpointing."""
    counters = dict(step=state.step, rng=state.rng, bad_steps=state.bad_steps,
                    total_bad_steps=state.total_bad_steps)
    return dict(params=state.params, ema_params=state.ema_params, opt_state=state.opt_state, counters=counters)


def from_items(items):
    """Inverse of to_items."""
    return TrainState(params=items["params"], ema_params=items["ema_params"], opt_state=items["opt_state"],
                      **items["counters"])

"""Checkpoints of a run in `workdir/checkpoints` (orbax): async, keep-last-K, atomic, any mesh on restore."""
import os

import jax
import orbax.checkpoint as ocp

from sdjax.train.state import ITEMS, from_items, to_items


def checkpoint_dir(workdir):
    return os.path.join(os.path.abspath(workdir), "checkpoints")


class Checkpointer:
    """One item per state part (params, ema_params, opt_state, counters) plus the data iterators' states."""

    def __init__(self, workdir, keep=None, async_save=True, read_only=False):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               create=not read_only, read_only=read_only)
        handlers = {k: ocp.StandardCheckpointHandler() for k in ITEMS}
        handlers["data"] = ocp.JsonCheckpointHandler()
        self.manager = ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_handlers=handlers)

    def latest_step(self):
        """Newest finished checkpoint's step, or None."""
        return self.manager.latest_step()

    def steps(self):
        return list(self.manager.all_steps())

    def save(self, state, data_states):
        """Start saving `state` at its step (returns once arrays are copied off the devices).

        data_states: {"process_count": n, "states": [iterator state of each process]} (JSON-able).
        """
        items = {k: ocp.args.StandardSave(v) for k, v in to_items(state).items()}
        self.manager.save(int(jax.device_get(state.step)), args=ocp.args.Composite(
            data=ocp.args.JsonSave(data_states), **items), force=True)

    def restore(self, abstract_state, step=None):
        """(state laid out as `abstract_state`'s ShapeDtypeStruct shardings say, data_states) of `step` (latest)."""
        step = self.latest_step() if step is None else step
        items = {k: ocp.args.StandardRestore(v) for k, v in to_items(abstract_state).items()}
        out = self.manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore(), **items))
        return from_items({k: out[k] for k in ITEMS}), out["data"]

    def restore_item(self, name, step=None, sharding=None):
        """One item as saved (e.g. "ema_params"), onto `sharding` (default: the first local device)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.manager.directory}")
        sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        meta = self.manager.item_metadata(step)[name]
        abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), meta.tree)
        return self.manager.restore(step, args=ocp.args.Composite(**{name: ocp.args.StandardRestore(abstract)}))[name]

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.close()

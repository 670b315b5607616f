"""Checkpoints of a run in `workdir/checkpoints` (orbax): async, keep-last-K, atomic, any mesh on restore.

A step folder that does not restore (a file truncated by a preempted copy or a bad disk: orbax reads every
byte range it needs and parses every JSON file, so truncation fails the restore, never a wrong value) is
moved to `workdir/checkpoints.corrupt/` and the next older one restores. A write that fails (disk full,
quota, bucket error) leaves its step folder a `*.orbax-checkpoint-tmp*` one, which orbax never lists.
"""
import itertools
import logging
import os

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from sdjax.train.state import ITEMS, from_items, to_items


log = logging.getLogger("sdjax.train")


def checkpoint_dir(workdir):
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def _brief(error):
    """One line of an exception (tensorstore's carry a JSON spec of thousands of characters)."""
    text = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    return text if len(text) <= 300 else text[:300] + "..."


class Checkpointer:
    """One item per state part (params, ema_params, opt_state, counters) plus the data iterators' states."""

    def __init__(self, workdir, keep=None, async_save=True, read_only=False):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               create=not read_only, read_only=read_only)
        handlers = {k: ocp.StandardCheckpointHandler() for k in ITEMS}
        handlers["data"] = ocp.JsonCheckpointHandler()
        self.directory = checkpoint_dir(workdir)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        self.writing = None   # step of the save in flight
        self.failed = False   # a save failed (reported once; orbax re-raises it on every wait)

    def latest_step(self):
        """Newest finished checkpoint's step, or None."""
        return self.manager.latest_step()

    def steps(self):
        return list(self.manager.all_steps())

    def save(self, state, data_states):
        """Start saving `state` at its step (returns once arrays are copied off the devices).

        data_states: {"process_count": n, "states": [iterator state of each process]} (JSON-able).
        """
        self.wait()  # the previous save's write failure surfaces here
        step = int(jax.device_get(state.step))
        items = {k: ocp.args.StandardSave(v) for k, v in to_items(state).items()}
        self.writing = step
        try:
            self.manager.save(step, args=ocp.args.Composite(data=ocp.args.JsonSave(data_states), **items),
                              force=True)
        except OSError as e:  # creating the step's folder
            raise self._save_failed(e) from e

    def wait(self):
        """Block until the save in flight is written. OSError naming what failed and the newest checkpoint
        left if its write failed (raised by orbax's writer thread)."""
        if self.failed:
            return
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 (disk full, quota, bucket errors: whatever the writer raised)
            raise self._save_failed(e) from e

    def _save_failed(self, error):
        self.failed = True
        self.manager.reload()  # the finished step folders on disk
        last = self.manager.latest_step()
        kept = (f"the last good checkpoint is step {last} in {self.directory}, a rerun resumes from it"
                if last is not None else f"no earlier checkpoint is in {self.directory}")
        return OSError(f"writing the checkpoint of step {self.writing} failed ({_brief(error)}); {kept}")

    def restore_newest(self, abstract_state):
        """(state, data_states) of the newest checkpoint that restores (see `restore`). Newer ones that do not
        are moved to checkpoints.corrupt/ with a warning; OSError if none restores (none is moved then)."""
        errors = {}
        for step in sorted(self.steps(), reverse=True):
            try:
                out = self.restore(abstract_state, step)
            except Exception as e:  # noqa: BLE001 (JSON, tensorstore and orbax errors of a damaged folder)
                errors[step] = e
                continue
            for bad, e in errors.items():
                moved = self._move_aside(bad)
                log.warning("checkpoint of step %d is unreadable (%s): moved from %s to %s; resuming from step %d",
                            bad, _brief(e), self.directory, moved, step)
            self.manager.reload()
            return out
        raise OSError(f"no checkpoint in {self.directory} restores: "
                      + "; ".join(f"step {s}: {_brief(e)}" for s, e in errors.items())
                      + " (move the folder away to start afresh)")

    def _move_aside(self, step):
        """Move step's folder into checkpoints.corrupt/ (process 0; the others wait); where it went."""
        base = os.path.join(self.directory + ".corrupt", str(step))
        target = next(p for p in (f"{base}.{n}" if n else base for n in itertools.count()) if not os.path.exists(p))
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.rename(os.path.join(self.directory, str(step)), target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"sdjax checkpoint {step} moved aside")
        return target

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

    def close(self):
        """Wait for the save in flight (OSError if it failed), then release orbax's threads."""
        self.wait()
        if not self.failed:  # orbax's close would raise the reported failure again
            self.manager.close()

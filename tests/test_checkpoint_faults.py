"""Checkpoint faults (issue 30, items 8 and 9): a corrupt newest checkpoint, a checkpoint write that fails.

The runs train the toy models of train_fakes on configs/train/tiny.py's config in this process, through
sdjax.train.loop.train or train.py's main: a second or two each. One uninterrupted run is the reference.
"""
import errno
import functools
import logging
import os
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from configs.train import tiny as train_tiny
from sdjax.text.clip_vocab import write_clip_tokenizer
from sdjax.text.tokenizer import load_tokenizer
from sdjax.train import loop
from sdjax.train.checkpoint import Checkpointer
from sdjax.train.state import create_state
from sdjax.weights.pretrained import Pretrained
from train_fakes import fake_data, toy_setup

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train  # noqa: E402

STEPS = 6  # checkpoints every 2


def settings(c):
    """The tiny config set for the toy models: 6 steps, a checkpoint every 2, one device."""
    c.loss.prediction_type, c.batch_size, c.data.image_size = "epsilon", 8, 16
    c.total_steps, c.checkpoint_every, c.mesh.data, c.optimizer.warmup_steps = STEPS, 2, 1, 2
    return c


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """(toy Pretrained, the state after 6 uninterrupted steps on the host)."""
    modules, params, _ = toy_setup()
    tokenizer = load_tokenizer(write_clip_tokenizer(str(tmp_path_factory.mktemp("tok"))))
    pre = Pretrained(modules, params, tokenizer, {"prediction_type": "epsilon"}, "toy")
    straight = loop.train(settings(train_tiny.get_config()), str(tmp_path_factory.mktemp("straight")), fake_data(),
                          jax.devices()[:1], pre)
    return pre, jax.device_get(straight)


def train_toy(pre, workdir, total_steps=STEPS, **fields):
    c = settings(train_tiny.get_config())
    c.total_steps = total_steps
    c.update(fields)
    return loop.train(c, str(workdir), fake_data(), jax.devices()[:1], pre)


def assert_same_run(state, reference):
    """Params, EMA and optimizer state equal bit for bit, at the same step."""
    assert int(state.step) == int(reference.step)
    for a, b in zip(jax.tree.leaves((state.params, state.ema_params, state.opt_state)),
                    jax.tree.leaves((reference.params, reference.ema_params, reference.opt_state))):
        np.testing.assert_array_equal(a, b)


def truncate(path, fraction=0.5):
    with open(path, "r+b") as f:
        f.truncate(int(os.path.getsize(path) * fraction))


def train_py_exit(monkeypatch, pre, workdir, **fields):
    """train.py's main on the toy model and in-memory data: the message it exits with (None: it finished)."""
    from absl import flags
    argv = ["train.py", f"--config={ROOT}/configs/train/tiny.py", f"--workdir={workdir}"]
    monkeypatch.setattr(sys, "argv", argv)  # as tests/test_cli_errors.py: no --config.x flags to define twice
    flags.FLAGS(argv)
    settings(flags.FLAGS.config).update(fields)
    monkeypatch.setattr(loop, "train", functools.partial(loop.train, make_data=fake_data(),
                                                         devices=jax.devices()[:1], pretrained=pre))
    try:
        train.main(["train.py"])
    except SystemExit as e:
        return e.code
    finally:
        monkeypatch.undo()


# ---- item 8: the newest checkpoint is corrupt ----

def small_state(step):
    """A TrainState whose params are told apart by step; "w" (8 KB) is written out of line in a data file,
    the rest inline in OCDBT's b-tree nodes (orbax inlines values up to 1 KB)."""
    params = {"unet": {"w": jnp.arange(2048, dtype=jnp.float32) + step, "b": jnp.full((3,), step, jnp.float32)}}
    return create_state(params, optax.adam(1e-3), 0).replace(step=jnp.int32(step))


def test_every_truncated_file_fails_the_restore_or_is_not_read(tmp_path, caplog):
    """Each file of the newest step folder cut to half (one of each kind; the array items share a format):
    the restore falls back to the older step and moves the folder to checkpoints.corrupt/ with a warning,
    or (files the restore does not read) restores the newest's own values; never other values."""
    base = tmp_path / "base"
    ckpt = Checkpointer(str(base))
    for step in (1, 2):
        ckpt.save(small_state(step), {"process_count": 1, "states": [{"step": step}]})
    ckpt.close()
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                            jax.eval_shape(lambda: small_state(0)))
    newest = base / "checkpoints" / "2"
    kinds = {}  # one file per kind (hashed names alike), the largest
    for folder, _, files in os.walk(newest):
        for name in files:
            path = os.path.relpath(os.path.join(folder, name), newest)
            if path.split("/")[0] in ("params", "data") or "/" not in path:
                kind = os.path.join(os.path.dirname(path), "*" if len(name) == 32 else name)
                kinds[kind] = max(kinds.get(kind, path), path, key=lambda p: os.path.getsize(newest / p))
    detected = []
    for kind, path in sorted(kinds.items()):
        work = tmp_path / kind.replace("/", "_")
        shutil.copytree(base, work)
        truncate(work / "checkpoints" / "2" / path)
        caplog.clear()
        ckpt = Checkpointer(str(work))
        state, data = ckpt.restore_newest(abstract)
        ckpt.close()
        step = int(state.step)
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(state), jax.device_get(small_state(step)))
        assert data["states"] == [{"step": step}]
        if step == 1:
            detected.append(kind)
            assert os.listdir(work / "checkpoints") == ["1"]
            moved = work / "checkpoints.corrupt" / "2"
            assert os.path.getsize(moved / path) == os.path.getsize(newest / path) // 2  # kept as it was
            assert "step 2 is unreadable" in caplog.text and str(moved) in caplog.text
        else:
            assert step == 2 and "unreadable" not in caplog.text
    # what orbax reads: its JSON files, the OCDBT manifest, b-tree nodes (values up to 1 KB inline) and data files
    assert set(detected) >= {"params/_METADATA", "params/array_metadatas/process_0", "params/manifest.ocdbt",
                             "params/d/*", "params/ocdbt.process_0/d/*", "data/metadata"}, detected


def test_corrupt_newest_checkpoint_resumes_from_older_bit_identical(toy, tmp_path, caplog):
    """Stopped after step 4 (checkpoints 2 and 4), a value file of step 4 cut to half: the rerun warns, moves
    step 4 aside, resumes from step 2 and ends with the params, EMA and Adam state of the uninterrupted run."""
    pre, straight = toy
    workdir = tmp_path / "run"
    train_toy(pre, workdir, total_steps=4)
    nodes = workdir / "checkpoints" / "4" / "params" / "d"  # b-tree nodes: the toy's values are inline
    truncate(nodes / os.listdir(nodes)[0])
    assert_same_run(train_toy(pre, workdir), straight)
    assert "checkpoint of step 4 is unreadable" in caplog.text and "resuming from step 2" in caplog.text
    assert sorted(os.listdir(workdir / "checkpoints"), key=int) == ["2", "4", "6"]
    assert os.listdir(workdir / "checkpoints.corrupt") == ["4"]


def test_no_readable_checkpoint_stops_with_one_message(toy, tmp_path, monkeypatch):
    """Every checkpoint cut: train.py stops with one line naming each and why, and moves none (no silent
    restart from scratch)."""
    pre, _ = toy
    workdir = tmp_path / "run"
    train_toy(pre, workdir, total_steps=4)
    for step in (2, 4):
        truncate(workdir / "checkpoints" / str(step) / "params" / "_METADATA")
    message = train_py_exit(monkeypatch, pre, workdir)
    assert message.startswith(f"train.py: no checkpoint in {workdir / 'checkpoints'} restores: step 4: "
                              "JSONDecodeError") and "; step 2: JSONDecodeError" in message, message
    assert "\n" not in message
    assert sorted(os.listdir(workdir / "checkpoints"), key=int) == ["2", "4"]
    assert not os.path.exists(workdir / "checkpoints.corrupt")


# ---- item 9: a checkpoint write fails ----

@pytest.mark.parametrize("failing", [4, STEPS])  # surfaced by the next save; by the wait at the end
def test_failed_write_stops_with_message_and_keeps_last_checkpoint(toy, tmp_path, monkeypatch, caplog, failing):
    """The data item of one checkpoint cannot be written (ENOSPC, in orbax's writer thread), keep_checkpoints=1:
    train.py exits with one line naming the failed step, the error and the last good checkpoint; that one is
    intact (the failed one's tmp folder is not listed) and a rerun from it ends bit-identical."""
    pre, straight = toy
    workdir = tmp_path / "run"
    write = ocp.JsonCheckpointHandler._save_fn

    async def disk_full(self, x, directory):
        if os.path.basename(os.path.dirname(directory)).startswith(f"{failing}."):  # <step>.orbax-checkpoint-tmp
            raise OSError(errno.ENOSPC, "No space left on device", str(directory / "metadata"))
        return await write(self, x, directory)

    monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", disk_full)
    message = train_py_exit(monkeypatch, pre, workdir, keep_checkpoints=1)  # (undoes the patch when done)
    folder = workdir / "checkpoints"
    assert message.startswith(f"train.py: writing the checkpoint of step {failing} failed (OSError: [Errno 28] "
                              f"No space left on device: '{folder}/{failing}.orbax-checkpoint-tmp"), message
    assert message.endswith(f"the last good checkpoint is step {failing - 2} in {folder}, a rerun resumes "
                            "from it") and "\n" not in message, message
    orbax_errors = [r for r in caplog.records if r.levelno >= logging.ERROR and "orbax" in r.pathname]
    assert orbax_errors and not any(r.exc_info for r in orbax_errors)  # its three tracebacks left out
    ckpt = Checkpointer(str(workdir), read_only=True)
    assert ckpt.steps() == [failing - 2]
    ckpt.close()
    assert_same_run(train_toy(pre, workdir, keep_checkpoints=1), straight)

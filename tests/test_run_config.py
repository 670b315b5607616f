"""Resuming with a changed config (sdjax.train.run_config): a change to what defines the run is refused, in one
message naming every such field, before anything slow; cadence and length may change. Through train.py:
tests/test_train_loop.py::test_resume_through_train_py_is_bit_identical."""
import dataclasses
import logging
import os

import pytest

from configs.train import tiny as train_tiny
from sdjax.train import loop, optim, run_config, stages


def stored_run(tmp_path, step=2, **changes):
    """A workdir whose run was started with the tiny config (+ changes) and has a checkpoint of `step`."""
    c = train_tiny.get_config()
    c.loss.prediction_type = "epsilon"  # resolved, as setup stores it
    c.update(changes)
    run_config.save_config(c, str(tmp_path))
    os.makedirs(tmp_path / "checkpoints" / str(step))  # a finished step folder, as orbax lists them
    return c, str(tmp_path)


def test_defining_changes_are_refused_in_one_message(tmp_path):
    c, workdir = stored_run(tmp_path)
    new = c.copy_and_resolve_references()
    new.seed, new.batch_size, new.optimizer.learning_rate = 1, 8, 2e-3
    new.total_steps, new.sample.every, new.mesh.fsdp, new.data.num_threads = 2000, 100, 2, 4  # these may change
    with pytest.raises(ValueError) as e:
        run_config.check_resume(new, workdir)
    message = str(e.value)
    assert message == (f"{workdir}/config.json: resuming with changes to what defines the run: batch_size 16 -> 8, "
                       "optimizer.learning_rate 0.001 -> 0.002, seed 0 -> 1; start another workdir, or pass "
                       "--allow_config_change to go on with them")
    # --allow_config_change: let through, and returned to be recorded
    assert run_config.check_resume(new, workdir, allow_change=True) == (
        {"batch_size": (16, 8), "optimizer.learning_rate": (0.001, 0.002), "seed": (0, 1)}, ())
    # a new field defines the run too (a later option the stored run did not have)
    with new.unlocked():
        new.loss.extra = 1.0
    with pytest.raises(ValueError, match=r"loss.extra None -> 1.0"):
        run_config.check_resume(new, workdir)
    # no checkpoint: a fresh start, nothing compared
    os.rmdir(tmp_path / "checkpoints" / "2")
    assert run_config.check_resume(new, workdir) == ({}, ())


def test_length_and_cadence_may_change_and_a_moving_schedule_is_told(tmp_path, caplog):
    c, workdir = stored_run(tmp_path, step=500)
    longer = c.copy_and_resolve_references()
    longer.total_steps, longer.log_every, longer.checkpoint_every, longer.keep_checkpoints = 2000, 5, 100, 10
    longer.sample.update(every=50, prompts=("a dog",))
    longer.mesh.update(data=2, fsdp=4, min_shard_size=1)
    longer.optimizer.grad_accum_steps = 2
    with caplog.at_level(logging.INFO, "sdjax.train"):
        assert run_config.check_resume(longer, workdir) == ({}, ())
    # the cosine schedule decays to 0 at total_steps: at step 500 the learning rate moves
    old, new = (float(optim.learning_rate(c.optimizer, n)(500)) for n in (1000, 2000))
    assert abs(new - old) > 0.3 * old
    assert (f"optimizer: the cosine learning-rate schedule follows total_steps: at step 500 the learning rate moves "
            f"from {old:.3g} to {new:.3g}") in caplog.text
    # a constant schedule, or a cosine with its own decay_steps, does not move
    for name, section in (("constant", dict(schedule="constant")), ("own_decay", dict(decay_steps=1000))):
        caplog.clear()
        c, workdir = stored_run(tmp_path / name, step=500)
        c.optimizer.update(section)
        run_config.save_config(c, workdir)
        longer = c.copy_and_resolve_references()
        longer.total_steps = 2000
        with caplog.at_level(logging.INFO, "sdjax.train"):
            run_config.check_resume(longer, workdir)
        assert "resuming with total_steps 1000 -> 2000" in caplog.text and "moves" not in caplog.text


def test_a_field_left_to_the_model_is_compared_once_resolved(tmp_path):
    c, workdir = stored_run(tmp_path)
    given = c.copy_and_resolve_references()
    given.loss.prediction_type = ""  # the scheduler's: known once the model is loaded
    assert run_config.check_resume(given, workdir) == ({}, ("loss.prediction_type",))
    given.loss.prediction_type = "v_prediction"  # what resolving gave: another prediction type than the run's
    with pytest.raises(ValueError, match=r"loss.prediction_type 'epsilon' -> 'v_prediction'"):
        run_config.check_resume(given, workdir, fields=("loss.prediction_type",))
    given.loss.prediction_type = "epsilon"
    assert run_config.check_resume(given, workdir, fields=("loss.prediction_type",)) == ({}, ())


def test_refusal_comes_before_anything_slow(tmp_path, monkeypatch):
    """setup refuses before loading or building anything, and leaves the stored config as it was."""
    c, workdir = stored_run(tmp_path)
    stored = (tmp_path / "config.json").read_text()

    def slow(*_, **__):
        raise AssertionError("loaded the model before comparing the configs")
    monkeypatch.setitem(stages.STAGES, "ldm", dataclasses.replace(stages.STAGES["ldm"], load=slow))
    c.seed = 7
    with pytest.raises(ValueError, match=r"seed 0 -> 7;"):
        loop.setup(c, workdir, make_data=slow)
    assert (tmp_path / "config.json").read_text() == stored

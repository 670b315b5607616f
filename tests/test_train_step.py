"""The train step's mechanics on toy models: accumulation, EMA, non-finite steps, schedule, layout rules."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.train import tiny as train_tiny
from sdjax.text.clip_vocab import write_clip_tokenizer
from sdjax.text.tokenizer import load_tokenizer
from sdjax.train import loop, optim, sharding
from sdjax.train.export import load_params
from sdjax.train.state import create_state
from sdjax.train.ldm.ldm_step import make_train_step
from sdjax.weights.pretrained import Pretrained
from train_fakes import ABAR, EMPTY, ArrayIterator, fake_data, toy_setup


@pytest.fixture(scope="module")
def toy():
    return toy_setup()


def config(k=1, ema=0.9):
    c = train_tiny.get_config()
    c.loss.prediction_type = "epsilon"
    c.optimizer.grad_accum_steps, c.optimizer.warmup_steps, c.ema_decay = k, 0, ema
    c.batch_size, c.data.image_size = 8, 16
    return c


def run_step(toy, c, batch, state=None):
    modules, params, _ = toy
    tx, schedule = optim.make_optimizer(c.optimizer, c.total_steps)
    step = jax.jit(make_train_step(modules, c, tx, schedule, ABAR, EMPTY))
    frozen = {k: params[k] for k in ("vae", "text_encoder")}
    state = state or create_state({"unet": params["unet"]}, tx, 0)
    return step(state, frozen, batch)


def test_grad_accumulation_equals_one_big_batch(toy):
    batch = next(ArrayIterator(8, size=16))
    (s1, m1), (s4, m4) = run_step(toy, config(1), batch), run_step(toy, config(4), batch)
    assert abs(float(m1["loss"]) - float(m4["loss"])) <= 1e-6 * float(m1["loss"])
    assert abs(float(m1["grad_norm"]) - float(m4["grad_norm"])) <= 1e-5 * float(m1["grad_norm"])
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s4.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_ema_math(toy):
    e, p = {"w": jnp.asarray([1.0, -2.0])}, {"w": jnp.asarray([3.0, 2.0])}
    for n in (1, 5):  # constant params: e_n = p + d^n (e_0 - p)
        e_n = e
        for _ in range(n):
            e_n = optim.ema_update(e_n, p, 0.9)
        np.testing.assert_allclose(e_n["w"], p["w"] + 0.9 ** n * (e["w"] - p["w"]), rtol=1e-6)
    # In the step: EMA starts at the initial params and moves 1 - d of the way to the updated ones.
    state, _ = run_step(toy, config(ema=0.75), next(ArrayIterator(8, size=16)))
    init = toy[1]["unet"]
    for e0, p1, e1 in zip(jax.tree.leaves(init), jax.tree.leaves(state.params), jax.tree.leaves(state.ema_params)):
        np.testing.assert_allclose(e1, 0.75 * e0 + 0.25 * p1, rtol=1e-6, atol=1e-7)


def test_ema_warmup(toy):
    # With warm-up the decay of update n (0-based) is min(d, (1 + n) / (10 + n)): 0.1 at the first step.
    assert [float(optim.ema_decay_at(0.999, n, True)) for n in (0, 8, 10 ** 6)] == \
        pytest.approx([0.1, 0.5, 0.999], rel=1e-6)
    c = config(ema=0.75)
    c.ema_warmup = True
    state, _ = run_step(toy, c, next(ArrayIterator(8, size=16)))
    for e0, p1, e1 in zip(jax.tree.leaves(toy[1]["unet"]), jax.tree.leaves(state.params),
                          jax.tree.leaves(state.ema_params)):
        np.testing.assert_allclose(e1, 0.1 * e0 + 0.9 * p1, rtol=1e-6, atol=1e-7)


def test_non_finite_step_is_skipped_and_counted(toy):
    it = ArrayIterator(8, size=16, nan_from=1)
    good = next(it)
    s1, _ = run_step(toy, config(), good)
    s2, m2 = run_step(toy, config(), next(it), jax.tree.map(jnp.copy, s1))
    assert not bool(m2["finite"]) and int(m2["bad_steps"]) == 1 and int(s2.total_bad_steps) == 1
    assert int(s2.step) == 2
    for name in ("params", "opt_state", "ema_params"):
        for a, b in zip(jax.tree.leaves(getattr(s1, name)), jax.tree.leaves(getattr(s2, name))):
            np.testing.assert_array_equal(a, b)
    s3, m3 = run_step(toy, config(), good, s2)
    assert bool(m3["finite"]) and int(s3.bad_steps) == 0 and int(s3.total_bad_steps) == 1


def test_loop_stops_after_max_bad_steps_with_last_checkpoint_intact(toy, tmp_path):
    modules, params, _ = toy
    tokenizer = load_tokenizer(write_clip_tokenizer(str(tmp_path / "tok")))
    pre = Pretrained(modules, params, tokenizer, {"prediction_type": "epsilon"}, "toy")
    c = config()
    c.total_steps, c.checkpoint_every, c.max_bad_steps, c.log_every = 20, 2, 3, 1
    c.optimizer.schedule = "constant"  # so a 4-step run follows the same learning rates
    c.mesh.data = 1
    workdir = str(tmp_path / "run")
    devices = jax.devices()[:1]
    with pytest.raises(loop.TrainingDiverged, match=r"NaN/inf for 3 steps in a row \(steps 5..7\).*step 4"):
        loop.train(c, workdir, fake_data(nan_from=4), devices, pre)
    assert sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints"))) == [2, 4]
    saved = load_params(workdir, ema=False)["unet"]
    # They are the params of 4 good steps.
    c.total_steps = 4
    final = loop.train(c, str(tmp_path / "again"), fake_data(), devices, pre)
    for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(final.params["unet"])):
        np.testing.assert_array_equal(a, b)


def test_learning_rate_schedule():
    c = config().optimizer
    c.learning_rate, c.warmup_steps = 1.0, 10
    cosine = optim.learning_rate(c, 110)
    np.testing.assert_allclose([cosine(0), cosine(5), cosine(10), cosine(60), cosine(110)],
                               [0, 0.5, 1, 0.5, 0], atol=1e-6)
    c.schedule = "constant"
    constant = optim.learning_rate(c, 110)
    np.testing.assert_allclose([constant(5), constant(10), constant(100)], [0.5, 1, 1], atol=1e-6)


def test_param_layout_rules():
    assert sharding.param_spec((3, 3, 320, 640), 2, 1000) == jax.sharding.PartitionSpec(None, None, None, "fsdp")
    assert sharding.param_spec((1280, 3), 4, 1000) == jax.sharding.PartitionSpec("fsdp")
    assert sharding.param_spec((320,), 2, 1000) == jax.sharding.PartitionSpec()        # small: replicated
    assert sharding.param_spec((77, 1001), 2, 10) == jax.sharding.PartitionSpec()       # nothing divisible
    assert sharding.param_spec((4096, 4096), 1, 10) == jax.sharding.PartitionSpec()     # no fsdp axis
    assert sharding.mesh_shape(-1, 2, 8) == (4, 2) and sharding.mesh_shape(2, -1, 8) == (2, 4)
    with pytest.raises(ValueError, match="3 x 2 != 8"):
        sharding.mesh_shape(3, 2, 8)


def test_sigterm_saves_and_resume_is_bit_identical(toy, tmp_path):
    modules, params, _ = toy
    tokenizer = load_tokenizer(write_clip_tokenizer(str(tmp_path / "tok")))
    pre = Pretrained(modules, params, tokenizer, {"prediction_type": "epsilon"}, "toy")
    c = config()
    c.total_steps, c.checkpoint_every, c.mesh.data, c.optimizer.warmup_steps = 6, 100, 1, 2
    devices = jax.devices()[:1]
    straight = loop.train(c, str(tmp_path / "straight"), fake_data(), devices, pre)
    # SIGTERM while batch 3 is read (by the prefetch thread, one or two steps ahead): the step running then
    # finishes, is saved with the data position of the batches it consumed, and train returns.
    stopped = loop.train(c, str(tmp_path / "cut"), fake_data(sigterm_at=2), devices, pre)
    assert 1 <= int(stopped.step) <= 3
    assert os.listdir(tmp_path / "cut" / "checkpoints") == [str(int(stopped.step))]
    resumed = loop.train(c, str(tmp_path / "cut"), fake_data(), devices, pre)
    for a, b in zip(jax.tree.leaves((straight.params, straight.ema_params, straight.opt_state)),
                    jax.tree.leaves((resumed.params, resumed.ema_params, resumed.opt_state))):
        np.testing.assert_array_equal(a, b)

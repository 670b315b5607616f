"""End-to-end training runs in subprocesses: sharding is only layout, multi-host, exact resume, it learns.

Each run is a fresh process so it can have 8 fake CPU devices (XLA_FLAGS) or join a 2-process
cluster; they share a persistent compilation cache and compile with little XLA optimisation.
"""
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

import train_worker

from sdjax.pipeline import StableDiffusion
from sdjax.train.export import export, load_params
from sdjax.weights.pretrained import load_pretrained

pytestmark = pytest.mark.long_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "train_worker.py")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("train_jax_cache"))


def run(args, cache, devices=8, timeout=600, check=True):
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=cache,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0")
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    if not check:
        return proc
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def worker(workdir, steps, cache, devices=8, **flags):
    args = [WORKER, "--workdir", str(workdir), "--steps", str(steps)]
    args += [f"--{k}" if v is True else f"--{k}={v}" for k, v in flags.items()]  # True: a switch
    return run(args, cache, devices)


def losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    return np.array([r["loss"] for r in rows])


def assert_params_close(a, b, atol=1e-6):
    """Params agree to atol: Adam turns reduction-order noise in near-zero gradients into ~lr-sized
    relative differences of single weights, so elementwise rtol is too strict; the loss curve is the
    relative check."""
    diff = max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    assert diff <= atol, f"max |params difference| = {diff}"


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_sharding_is_only_layout(tmp_path, cache, lora):
    """1 device vs 8 (data x fsdp = 4 x 2): same losses; checkpoints move between the two layouts. The same for a
    LoRA of the U-Net and text tower (the adapters sharded, the frozen base too)."""
    one, mixed = tmp_path / "one", tmp_path / "mixed"
    flags = {"lora": True} if lora else {}
    worker(one, 4, cache, devices=1, data=1, **flags)
    worker(mixed, 2, cache, data=4, fsdp=2, **flags)    # 8 devices, params sharded over fsdp
    worker(mixed, 3, cache, devices=1, data=1, **flags)  # resumed on 1 device
    worker(mixed, 4, cache, data=4, fsdp=2, **flags)    # and back on 8
    np.testing.assert_allclose(losses(mixed), losses(one), rtol=1e-5)
    assert_params_close(load_params(mixed, ema=False), load_params(one, ema=False))


def two_processes(workdir, steps, cache, devices, *flags):
    """Run train_worker.py as 2 processes on 127.0.0.1 (gloo) with `devices` each; their outputs."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [run([WORKER, "--workdir", str(workdir), "--steps", str(steps), *flags, f"--coordinator=127.0.0.1:{port}",
                  "--num_processes=2", f"--process_id={i}"], cache, devices=devices, check=False) for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    return outs


def test_two_processes_agree_with_one_and_one_continues_them(tmp_path, cache):
    """Real data (the input pipeline on synthetic shapes): 2 processes x 2 devices on 127.0.0.1 (gloo), each
    reading its rows of the global batch and the params sharded over both, train 3 steps; 1 process on 1 device
    resumes to step 5, the data re-split where they stopped: the losses and params are those of 1 process on 1
    device straight through. The 2 processes sample at every step together, from the sharded params: the images
    of step 3 are those of its export sampled here, and no copy of the params stays on a device."""
    tfds, flags = f"--shapes={tmp_path / 'tfds'}", ("--data=2", "--fsdp=2", "--ema_decay=0")  # EMA: the params
    single = tmp_path / "single"
    worker(single, 5, cache, devices=1, data=1, shapes=tmp_path / "tfds")
    two_processes(tmp_path / "multi", 3, cache, 2, *flags, tfds, f"--export_dir={tmp_path / 'exported'}",
                  "--sample_every=1", f"--device_bytes={tmp_path / 'bytes'}")
    worker(tmp_path / "multi", 5, cache, devices=1, data=1, shapes=tmp_path / "tfds", ema_decay=0)
    np.testing.assert_allclose(losses(tmp_path / "multi"), losses(single), rtol=1e-5)
    assert_params_close(load_params(tmp_path / "multi", ema=False), load_params(single, ema=False))
    # the two processes exported together (no hang): process 0 wrote the EMA U-Net of step 3
    exported = load_pretrained(str(tmp_path / "exported"))
    for a, b in zip(jax.tree.leaves(exported.params["unet"]),
                    jax.tree.leaves(load_params(tmp_path / "multi", step=3)["unet"])):
        np.testing.assert_array_equal(a, b)
    # their samples: the export's images, bit for bit (those of step 2 differ by ~14 levels on average)
    logged = [np.asarray(Image.open(tmp_path / "multi" / "samples" / f"step_000000{i}.png")) for i in (2, 3)]
    c = train_worker.tiny_config(3).sample
    images = StableDiffusion(exported).generate(list(c.prompts), num_steps=4, guidance_scale=c.guidance_scale,
                                                seed=c.seed, progress=False)
    np.testing.assert_array_equal(logged[1], np.concatenate(list(images), axis=1))
    assert np.abs(logged[0].astype(int) - logged[1]).mean() > 5
    # after sampling step 1 (no checkpoint then), a device holds the run's arrays and little else (a gathered
    # copy of the params would be 100% of "params")
    for i in range(2):
        held = json.loads((tmp_path / f"bytes.{i}").read_text())["1"]
        assert held["live"] - held["run"] < 0.01 * held["params"], held


def train_py(workdir, cache, *overrides, devices=1, config="configs/train/tiny.py", flags=(), check=True):
    """train.py's output; check=False: (its exit code, output)."""
    out = run([os.path.join(ROOT, "train.py"), f"--config={config}", f"--workdir={workdir}",
               *[f"--config.{o}" for o in overrides], *flags], cache, devices, check=check)
    return out if check else (out.communicate(timeout=600)[0], out.returncode)[::-1]


def test_resume_through_train_py_is_bit_identical(tmp_path, cache):
    """4 steps straight == 2 steps, stop, resume to 4: bit-identical params, EMA and losses. The model is the
    tiny SDXL one (the SD 1.x runs are the other tests'): two text towers, and the micro-conditioning from each
    example's size and crop, which the data state restores. Resuming with another seed is refused (the longer
    total_steps is let through), unless --allow_config_change, which metrics.jsonl records."""
    common = (f"data.data_dir={tmp_path / 'tfds'}", "data.shapes.num_train=256", "data.shapes.num_test=8",
              "data.shapes.num_heldout=8", "batch_size=4", "log_every=1", "checkpoint_every=2",
              "optimizer.warmup_steps=2", "optimizer.decay_steps=4")
    xl = dict(config="configs/train/tiny.py:sdxl")
    train_py(tmp_path / "straight", cache, "total_steps=4", *common, **xl)
    train_py(tmp_path / "cut", cache, "total_steps=2", *common, **xl)
    stored = (tmp_path / "cut" / "config.json").read_text()
    code, out = train_py(tmp_path / "cut", cache, "total_steps=4", "seed=1", *common, **xl, check=False)
    assert code == 1 and "changes to what defines the run: seed 0 -> 1;" in out, out[-2000:]
    assert (tmp_path / "cut" / "config.json").read_text() == stored
    train_py(tmp_path / "cut", cache, "total_steps=4", *common, **xl)
    np.testing.assert_array_equal(losses(tmp_path / "cut"), losses(tmp_path / "straight"))
    for ema in (False, True):
        for a, b in zip(jax.tree.leaves(load_params(tmp_path / "cut", ema=ema)),
                        jax.tree.leaves(load_params(tmp_path / "straight", ema=ema))):
            np.testing.assert_array_equal(a, b)
    # The export is an SDXL diffusers folder holding the EMA U-Net and the (rebuilt) frozen parts.
    folder = export(tmp_path / "cut", str(tmp_path / "exported"))
    pre = load_pretrained(folder)
    assert "text_encoder_2" in pre.modules and pre.tokenizer_2.pad_token == "!"
    for a, b in zip(jax.tree.leaves(pre.params["unet"]), jax.tree.leaves(load_params(tmp_path / "cut")["unet"])):
        np.testing.assert_array_equal(a, b)
    assert pre.scheduler["prediction_type"] == "epsilon" and pre.modules["vae"].scaling_factor == 2.0
    # --allow_config_change goes on with the other seed: a row of metrics.jsonl says so, config.json has it
    train_py(tmp_path / "cut", cache, "total_steps=4", "seed=1", *common, **xl, flags=["--allow_config_change"])
    with open(tmp_path / "cut" / "metrics.jsonl") as f:
        assert json.loads(f.readlines()[-1]) == {"step": 4, "config_change": {"seed": [0, 1]}}
    assert json.loads((tmp_path / "cut" / "config.json").read_text())["seed"] == 1


@pytest.mark.slow
def test_it_learns_shapes(tmp_path, cache):
    """The tiny model on 32x32 shapes: mean loss of the last 20 of 200 steps < 0.3 x that of the first 20.

    A reference run of configs/train/tiny.py (batch 16, lr 1e-3, min-SNR 5, log_every 20) logged
    0.89 for steps 1-20, 0.38 at 40, 0.15 at 100, 0.11 at 181-200: the ratio is ~0.12.
    """
    workdir = tmp_path / "learn"
    train_py(workdir, cache, f"data.data_dir={tmp_path / 'tfds'}", "total_steps=200", "log_every=1",
             "checkpoint_every=200")
    curve = losses(workdir)
    assert curve[-20:].mean() < 0.3 * curve[:20].mean(), (curve[:20].mean(), curve[-20:].mean())


@pytest.mark.slow
def test_remat_and_bf16_steps(tmp_path):
    """One step of the tiny model: remat changes nothing; bf16 compute stays close to fp32, master params fp32."""
    from configs.train import tiny as train_tiny
    from sdjax.train import loop
    from sdjax.train.sharding import global_batch
    from train_fakes import fake_data

    def first_step(name, **changes):
        c = train_tiny.get_config()
        c.model.vae.sample_size, c.model.unet.sample_size, c.data.image_size, c.batch_size = 16, 8, 16, 4
        c.mesh.data = 1
        c.remat, c.precision.compute_dtype = changes.get("remat", False), changes.get("dtype", "float32")
        run = loop.setup(c, str(tmp_path / name), fake_data(), jax.devices()[:1])
        state, metrics = run.step_fn(run.state, run.frozen, global_batch(next(run.data), run.mesh))
        return state, jax.device_get(metrics)

    base, m = first_step("base")
    remat, m_remat = first_step("remat", remat=True)
    bf16, m_bf16 = first_step("bf16", dtype="bfloat16")
    assert abs(m_remat["loss"] - m["loss"]) <= 1e-5 * m["loss"]
    assert abs(m_remat["grad_norm"] - m["grad_norm"]) <= 1e-4 * m["grad_norm"]
    assert abs(m_bf16["loss"] - m["loss"]) <= 2e-2 * m["loss"]
    assert abs(m_bf16["grad_norm"] - m["grad_norm"]) <= 5e-2 * m["grad_norm"]
    assert {x.dtype for x in jax.tree.leaves(bf16.params)} == {np.dtype("float32")}

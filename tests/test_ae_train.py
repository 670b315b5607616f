"""The autoencoder stage through the training loop: train, checkpoint, resume, export, the VAE in diffusers.

Fast: sdjax.train.loop.train in this process (1 device, in-memory data). Slow: `train.py --config
configs/train/vae_tiny.py` on 4 fake devices (data x fsdp = 2 x 2) with the real shapes pipeline.
"""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch

from configs.train import vae_tiny as train_vae_tiny
from sdjax.train import loop, stages
from sdjax.train.vae import vae_stage
from sdjax.train.checkpoint import Checkpointer
from sdjax.train.export import export, load_params
from sdjax.train.state import create_state
from sdjax.weights.diffusers import load_component
from train_fakes import fake_data

pytestmark = pytest.mark.long_file

torch.set_num_threads(1)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--config.model.discriminator.ndf=8", "--config.model.discriminator.norm_num_groups=4",
         "--config.model.vae.block_out_channels=(8,16)", "--config.model.vae.norm_num_groups=4"]


def metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def assert_exported(out, params):
    """out/vae holds `params`; diffusers' AutoencoderKL loads it and reconstructs as we do (<= 1e-4)."""
    module, loaded = load_component(str(out), "vae")
    jax.tree.map(np.testing.assert_array_equal, loaded, jax.device_get(params))
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.AutoencoderKL.from_pretrained(str(out / "vae")).eval()
    x = np.random.default_rng(0).uniform(-1, 1, (1, 16, 16, 3)).astype(np.float32)
    ours = np.asarray(module.apply({"params": loaded}, x))
    with torch.no_grad():
        theirs = ref(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).sample.numpy().transpose(0, 2, 3, 1)
    diff = np.max(np.abs(ours - theirs))
    print(f"exported VAE: max abs diff vs diffusers {diff:.2e}")
    assert diff <= 1e-4


def test_loop_trains_checkpoints_exports(tmp_path):
    c = train_vae_tiny.get_config()
    c.model.vae.update(block_out_channels=(8, 16), norm_num_groups=4)
    c.model.discriminator.update(ndf=8, norm_num_groups=4)
    c.data.image_size, c.batch_size, c.total_steps, c.log_every, c.checkpoint_every = 16, 4, 3, 1, 2
    c.loss.disc_start = 2
    workdir, out = tmp_path / "run", tmp_path / "export"
    state = loop.train(c, str(workdir), fake_data())
    rows = metrics(workdir)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["disc_factor"] for r in rows] == [0, 0, 1] and rows[2]["d_weight"] > 0 and rows[2]["d_loss"] > 0
    assert all(np.isfinite(r[k]) for r in rows for k in ("loss", "rec_loss", "kl_loss", "grad_norm"))
    params = load_params(str(workdir), ema=False)
    assert sorted(params) == ["discriminator", "vae"]
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), jax.device_get(state.params))
    # The whole state, optimizer (one Adam per player) included, restores as the loop restores it.
    tx, _ = vae_stage.make_optimizer(c)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                            jax.eval_shape(lambda p: create_state(p, tx, c.seed), state.params))
    ckpt = Checkpointer(str(workdir), read_only=True)
    restored, _ = ckpt.restore(abstract)
    ckpt.close()
    assert int(restored.step) == 3
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), jax.device_get(state))
    export(str(workdir), str(out))
    assert sorted(os.listdir(out)) == ["sdjax_export.json", "vae"]
    assert_exported(out, params["vae"])


def test_config_errors():
    c = train_vae_tiny.get_config()
    assert stages.stage_for(c) is stages.STAGES["autoencoder"]
    c.loss.perceptual_weight = 1.0
    with pytest.raises(ValueError, match="lpips_weights"):
        vae_stage.check(c)
    c.loss.lpips_weights = "/nonexistent/vgg.pth"
    with pytest.raises(ValueError, match="no file '/nonexistent/vgg.pth'"):
        vae_stage.check(c)
    c = train_vae_tiny.get_config()
    c.optimizer.grad_accum_steps = 2
    with pytest.raises(ValueError, match="grad_accum_steps must be 1"):
        vae_stage.check(c)


def train_cli(workdir, data_dir, steps, export_dir=None):
    """train.py in a fresh process with 4 CPU devices, data x fsdp = 2 x 2; returns its output."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4")
    args = [sys.executable, "train.py", "--config=configs/train/vae_tiny.py", f"--workdir={workdir}",
            f"--config.total_steps={steps}", "--config.batch_size=8", "--config.log_every=1",
            "--config.checkpoint_every=2", "--config.loss.disc_start=0", "--config.mesh.data=2",
            "--config.mesh.fsdp=2", "--config.mesh.min_shard_size=256", *SMALL, f"--config.data.data_dir={data_dir}",
            "--config.data.shapes.num_train=32", "--config.data.shapes.num_test=4",
            "--config.data.shapes.num_heldout=4"]
    if export_dir:
        args.append(f"--export_dir={export_dir}")
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_cli_sharded_resume_export(tmp_path):
    workdir, out = tmp_path / "run", tmp_path / "export"
    train_cli(workdir, tmp_path / "tfds", steps=2)
    train_cli(workdir, tmp_path / "tfds", steps=3, export_dir=out)  # resumes at step 2
    rows = metrics(workdir)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(np.isfinite(r[k]) and r["d_weight"] > 0 for r in rows for k in ("loss", "d_loss", "g_loss"))
    assert_exported(out, load_params(str(workdir))["vae"])

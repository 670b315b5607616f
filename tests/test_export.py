"""Export of a run (sdjax.train.export): written whole or not at all, no stale files, the base weights and
foreign folders refused. The run is the autoencoder stage's (its export writes no rebuilt parts: fast), its
checkpoint written directly."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

from configs.train import vae_tiny as train_vae_tiny
from sdjax.models import registry
from sdjax.train import run_config
from sdjax.train.export import export
from sdjax.train.checkpoint import Checkpointer
from sdjax.train.state import create_state
from sdjax.train.vae import vae_stage
from sdjax.weights import diffusers as diffusers_weights
from sdjax.weights.diffusers import load_component

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEIGHTS = "vae/diffusion_pytorch_model.safetensors"


def config():
    c = train_vae_tiny.get_config()
    c.model.vae.update(block_out_channels=(8, 16), norm_num_groups=4)
    return c


@pytest.fixture
def workdir(tmp_path):
    """A run's workdir with a checkpoint at step 3 whose EMA VAE params are random (the raw params: 0)."""
    c = config()
    rng = np.random.default_rng(0)
    shapes = registry.param_shapes("vae", vae_stage.vae_module(c))
    ema = {"vae": jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes),
           "discriminator": {"w": np.ones(3, np.float32)}}
    state = create_state(jax.tree.map(np.zeros_like, ema), optax.adam(1e-3), 0)
    state = state.replace(step=np.int32(3), ema_params=ema)
    w = str(tmp_path / "run")
    run_config.save_config(c, w)
    ckpt = Checkpointer(w)
    ckpt.save(state, {"process_count": 1, "states": [{}]})
    ckpt.wait()
    ckpt.close()
    return w, ema["vae"]


def files(folder):
    """{relative path: bytes} of every file under folder."""
    out = {}
    for root, _, names in os.walk(folder):
        for n in names:
            with open(os.path.join(root, n), "rb") as f:
                out[os.path.relpath(os.path.join(root, n), folder)] = f.read()
    return out


def test_reexport_leaves_no_stale_file(workdir, tmp_path):
    w, params = workdir
    out = tmp_path / "export"
    export(w, str(out))
    first = files(out)
    assert sorted(first) == ["sdjax_export.json", "vae/config.json", WEIGHTS]
    jax.tree.map(np.testing.assert_array_equal, load_component(str(out), "vae")[1], params)
    # an fp16 variant from elsewhere (variant="fp16" would load it), and a note: an export replaces them
    (out / "vae" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(first[WEIGHTS])
    (out / "notes.txt").write_text("mine")
    export(w, str(out))
    assert files(out) == first
    assert sorted(os.listdir(tmp_path)) == ["export", "run"]  # no partial or old sibling left


def test_interrupted_export_leaves_the_previous_one(workdir, tmp_path, monkeypatch):
    w, _ = workdir
    out = tmp_path / "export"
    export(w, str(out), ema=False)  # the raw params: zeros
    before = files(out)

    def disk_full(tensors, path):  # half a file written, then the disk is full
        with open(path, "wb") as f:
            f.write(b"\0" * 100)
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(diffusers_weights, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        export(w, str(out))  # the EMA params
    assert files(out) == before
    assert sorted(os.listdir(tmp_path)) == ["export", "run"]


def test_base_weights_checkpoints_and_foreign_folders_are_refused(workdir, tmp_path):
    w, params = workdir
    base = tmp_path / "base"
    export(w, str(base))  # a diffusers folder with vae/: the base weights of a run that fine-tunes it
    c = config()
    c.pretrained = str(base)
    run_config.save_config(c, w)
    kept = files(base)
    for target in (base, tmp_path / "link", tmp_path, tmp_path / "run", tmp_path / "run" / "checkpoints" / "x"):
        if target.name == "link":
            os.symlink(base, target)
        with pytest.raises(ValueError, match=r"overlaps the run's (pretrained weights|checkpoints)"):
            export(w, str(target), overwrite=True)
    assert files(base) == kept
    # a folder of someone else's files: refused, unless overwrite
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"foreign is not empty and holds no earlier export .*--overwrite"):
        export(w, str(foreign))
    assert files(foreign) == {"notes.txt": b"mine"}
    export(w, str(foreign), overwrite=True)
    assert sorted(files(foreign)) == ["sdjax_export.json", "vae/config.json", WEIGHTS]
    assert json.loads((foreign / "sdjax_export.json").read_text())["workdir"] == w
    jax.tree.map(np.testing.assert_array_equal, load_component(str(foreign), "vae")[1], params)


def test_train_py_refuses_the_export_folder_before_training(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "train.py", "--config=configs/train/vae_tiny.py",
                           f"--workdir={tmp_path / 'run'}", f"--export_dir={foreign}", "--config.total_steps=1"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1 and proc.stderr.strip().endswith(
        f"train.py: export folder {foreign} is not empty and holds no earlier export (sdjax_export.json): choose "
        "another, or replace it with --overwrite (export(..., overwrite=True))"), proc.stderr[-2000:]
    assert not (tmp_path / "run").exists()  # nothing trained

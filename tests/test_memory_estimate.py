"""sdjax.train.memory: XLA's per-device count of the train step matches the shards the layout rules give,
and FSDP divides the state by the mesh size (the effect the estimate exists to show)."""
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.long_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = """
import dataclasses, json, jax
jax.config.update("jax_num_cpu_devices", 4)
from configs.train import tiny
from sdjax.models import registry
from sdjax.train.memory import estimate, report
def config():  # configs/train/tiny.py with one level in the U-Net and the VAE, one text layer: 2/3 the compile
    c = tiny.get_config()
    m = c.model
    m.unet.update(block_out_channels=(32,), down_block_types=("CrossAttnDownBlock2D",),
                  up_block_types=("CrossAttnUpBlock2D",), sample_size=16)
    m.vae.update(block_out_channels=(32,), down_block_types=("DownEncoderBlock2D",),
                 up_block_types=("UpDecoderBlock2D",), sample_size=16)
    m.text_encoder.num_hidden_layers = 1
    c.data.image_size = 16
    return c
unet = config().model.unet.to_dict()
shapes = registry.param_shapes("unet", registry.build("unet", unet))
out = {"unet_params": sum(x.size for x in jax.tree.leaves(shapes))}
for name, (data, fsdp, batch) in {"fsdp": (1, 4, 8), "data": (4, 1, 8), "one": (1, 1, 2)}.items():
    c = config()
    c.mesh.update(data=data, fsdp=fsdp, min_shard_size=1)
    c.batch_size = batch
    est = estimate(c, jax.devices()[:data * fsdp])
    out[name] = dataclasses.asdict(est)
    print(report(c, est))
print("JSON" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def estimates():
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    run = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "per device (GiB):" in run.stdout
    return json.loads(run.stdout.split("JSON")[-1])


def test_xla_counts_one_device_s_shards(estimates):
    n = estimates["unet_params"]
    # replicated: params, EMA and Adam's two moments in float32, + step, rng and the bad-step counters
    assert 16 * n < estimates["data"]["state"] < 16 * n + 64
    for est in (estimates["fsdp"], estimates["data"]):
        assert est["devices"] == 4
        # XLA's own count of one device's arguments: the state and batch, and the frozen weights the step
        # reads (not the VAE decoder)
        assert est["state"] + est["batch"] < est["arguments"] < est["state"] + est["frozen"] + est["batch"]
        assert est["temp"] > 0 and est["flops"] > 0


def test_fsdp_divides_the_state_over_the_mesh(estimates):
    fsdp, data = estimates["fsdp"], estimates["data"]
    assert data["batch"] == fsdp["batch"]                  # the batch is split over all 4 devices either way
    assert fsdp["state"] < 0.3 * data["state"]             # ~1/4: a few small arrays have no dim divisible by 4
    assert fsdp["frozen"] < 0.3 * data["frozen"]


def test_a_device_s_activations_are_those_of_its_share_of_the_batch(estimates):
    """4 devices at batch 8 hold what 1 device at batch 2 holds: each attends its own rows (attention's
    shard_map; without it the chunked path's loop gathered the whole batch: 3.3x here)."""
    four, one = estimates["data"]["temp"], estimates["one"]["temp"]
    assert abs(four - one) < 0.05 * one

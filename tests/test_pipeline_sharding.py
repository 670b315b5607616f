"""The batch is spread over all local devices; the images are the single-device ones and each image alone."""
import os
import subprocess
import sys

import numpy as np

from sdjax.pipeline import StableDiffusion

KW = dict(num_steps=3, guidance_scale=5.0, sampler="euler_a", seed=4, height=16, width=16,
          output_type="np", progress=False)
PROMPTS = ["a red circle", "a blue square", "a green triangle"]  # 3 images on 8 devices: padded batch

CHILD = """
import sys, numpy as np, jax
from sdjax.pipeline import StableDiffusion
sd = StableDiffusion.load(sys.argv[1])
assert len(sd.mesh.devices.flat) == 8, jax.devices()
np.save(sys.argv[2], sd.generate({prompts!r}, **{kw!r}))
"""


def test_eight_devices_give_the_single_device_images(torch_folder, tmp_path):
    folder = torch_folder[1]
    env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    out = tmp_path / "eight.npy"
    subprocess.run([sys.executable, "-c", CHILD.format(prompts=PROMPTS, kw=KW), folder, str(out)],
                   env=env, check=True, timeout=600)
    sd = StableDiffusion.load(folder)
    eight, one = np.load(out), sd.generate(PROMPTS, **KW)
    # image by image on each device (per_image): the same bits as one device, and as each image alone
    np.testing.assert_array_equal(eight, one)
    alone = [sd.generate(p, **{**KW, "seed": KW["seed"] + i})[0] for i, p in enumerate(PROMPTS)]
    np.testing.assert_array_equal(eight, np.stack(alone))
    # the effect: computed as one batch, XLA:CPU rounds some dots and GroupNorm sums differently
    sd.per_image = False
    whole = sd.generate(PROMPTS, **KW)
    assert not np.array_equal(whole, one)
    np.testing.assert_allclose(whole, one, atol=1e-5)

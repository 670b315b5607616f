"""The bundled demo model: a real diffusers folder, and sample.py's default."""
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from sdjax.demo import DEMO_MODEL
from sdjax.pipeline import StableDiffusion

pytestmark = pytest.mark.skipif(not os.path.isfile(os.path.join(DEMO_MODEL, "model_index.json")),
                                reason="the demo model is not built (python scripts/build_demo.py)")


def test_demo_model_is_small():
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(DEMO_MODEL) for f in files)
    assert size <= 20e6, f"{size / 1e6:.1f} MB"


def test_diffusers_gives_the_same_images(monkeypatch):
    import diffusers
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(DEMO_MODEL, safety_checker=None)
    pipe.scheduler = diffusers.DDIMScheduler.from_pretrained(DEMO_MODEL, subfolder="scheduler")
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a red circle on the left", "a blue square"]
    latents = np.random.default_rng(0).standard_normal((2, 16, 16, 4)).astype(np.float32)
    ref = pipe(prompts, latents=torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()), num_inference_steps=10,
               guidance_scale=4.0, output_type="np").images
    got = StableDiffusion.load(DEMO_MODEL).generate(prompts, num_steps=10, guidance_scale=4.0, sampler="ddim",
                                                    latents=latents, output_type="np", progress=False)
    err = np.abs(got - ref).mean()
    print(f"demo model, sdjax vs diffusers: mean abs diff {err:.2e}")
    assert err <= 1e-3


def test_sample_py_defaults_to_the_demo(tmp_path):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import sample
    sample.main(["--prompt", "a blue square", "--steps", "5", "--out", str(tmp_path)])
    sd = StableDiffusion.load(DEMO_MODEL)
    assert sd.default_sampler() == "ddim"  # the demo folder's own scheduler (DDIM), as diffusers runs it
    expected = sd.generate("a blue square", num_steps=5, progress=False)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "0000-seed0.png")), expected[0])


@pytest.mark.slow
def test_demo_model_meets_its_accuracy_targets():
    # The targets on one-shape prompts of trained colour-shape pairs, with guidance:
    # colour >= 90%, shape >= 80% (the deterministic pixel detector of sdjax.eval.shapes; ~2 min).
    from sdjax.eval.shapes import evaluate
    result, _, _ = evaluate(StableDiffusion.load(DEMO_MODEL), seeds=2)
    print(result)
    assert result["seen"]["color"] >= 0.9 and result["seen"]["shape"] >= 0.8, result

"""StableDiffusion.generate against diffusers' StableDiffusionPipeline on the same tiny random model."""
import numpy as np
import pytest
import torch

from sdjax import sampling
from sdjax.pipeline import StableDiffusion, image_keys

SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}), "ddpm": ("DDPMScheduler", {}), "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "euler": ("EulerDiscreteScheduler", {}), "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
}
PROMPTS = ["a red circle", "a blue square on the left"]
SIZE = 16  # tiny VAE: f = 2, latents 8x8


@pytest.fixture(scope="module")
def sd(torch_folder):
    return StableDiffusion.load(torch_folder[1])


def _noise(n, seed, shape):
    """The unit noise sdjax draws per image and per iteration, as diffusers' randn_tensor returns (NCHW)."""
    _, step_keys = image_keys(seed, n)
    return lambda index: torch.from_numpy(
        np.asarray(sampling.step_noise(step_keys, index, shape)).transpose(0, 3, 1, 2).copy())


def _inject_noise(monkeypatch, module, draw, first=0):
    """Make a diffusers module's randn_tensor return sdjax's per-iteration noise."""
    calls = iter(range(first, 10_000))
    monkeypatch.setattr(module, "randn_tensor", lambda *a, **k: draw(next(calls)))


def _reference(pipe, sampler, monkeypatch, latents, seed, **kw):
    import diffusers
    name, extra = SCHEDULERS[sampler]
    pipe.scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config, **extra)
    module = __import__(type(pipe.scheduler).__module__, fromlist=["randn_tensor"])
    if hasattr(module, "randn_tensor"):
        _inject_noise(monkeypatch, module, _noise(len(latents), seed, latents.shape[1:]))
    lat = torch.from_numpy(latents.transpose(0, 3, 1, 2).copy())
    return pipe(latents=lat, output_type="np", height=SIZE, width=SIZE, **kw).images


@pytest.mark.parametrize("guidance", [1.0, 7.5])
@pytest.mark.parametrize("sampler", sorted(SCHEDULERS))
def test_text_to_image_matches_diffusers(sd, torch_folder, sampler, guidance, monkeypatch):
    pipe = torch_folder[0]
    latents = np.random.default_rng(0).standard_normal((2, SIZE // 2, SIZE // 2, 4)).astype(np.float32)
    kw = dict(num_inference_steps=4, guidance_scale=guidance, prompt=PROMPTS, negative_prompt=["", "ugly"])
    ref = _reference(pipe, sampler, monkeypatch, latents, seed=3, **kw)
    got = sd.generate(PROMPTS, negative_prompt=["", "ugly"], num_steps=4, guidance_scale=guidance,
                      sampler=sampler, seed=3, height=SIZE, width=SIZE, latents=latents,
                      output_type="np", progress=False)
    err = np.abs(got - ref).mean()
    print(f"{sampler} guidance={guidance}: mean abs diff {err:.2e}")
    assert err <= 1e-3, f"{sampler} guidance={guidance}: mean abs diff {err:.2e}"
    assert np.abs(ref - ref.mean()).mean() > 1e-2  # the images are not flat: the check has teeth

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


def _use_scheduler(pipe, folder, sampler):
    """The diffusers scheduler of `sampler`, configured from the folder's scheduler_config.json."""
    import diffusers
    name, extra = SCHEDULERS[sampler]
    pipe.scheduler = getattr(diffusers, name).from_pretrained(folder, subfolder="scheduler", **extra)


def _reference(pipe, folder, sampler, monkeypatch, latents, seed, **kw):
    _use_scheduler(pipe, folder, sampler)
    module = __import__(type(pipe.scheduler).__module__, fromlist=["randn_tensor"])
    if hasattr(module, "randn_tensor"):
        _inject_noise(monkeypatch, module, _noise(len(latents), seed, latents.shape[1:]))
    lat = torch.from_numpy(latents.transpose(0, 3, 1, 2).copy())
    return pipe(latents=lat, output_type="np", height=SIZE, width=SIZE, **kw).images


@pytest.mark.parametrize("guidance", [1.0, 7.5])
@pytest.mark.parametrize("sampler", sorted(SCHEDULERS))
def test_text_to_image_matches_diffusers(sd, torch_folder, sampler, guidance, monkeypatch):
    pipe, folder = torch_folder
    latents = np.random.default_rng(0).standard_normal((2, SIZE // 2, SIZE // 2, 4)).astype(np.float32)
    kw = dict(num_inference_steps=4, guidance_scale=guidance, prompt=PROMPTS, negative_prompt=["", "ugly"])
    ref = _reference(pipe, folder, sampler, monkeypatch, latents, seed=3, **kw)
    got = sd.generate(PROMPTS, negative_prompt=["", "ugly"], num_steps=4, guidance_scale=guidance,
                      sampler=sampler, seed=3, height=SIZE, width=SIZE, latents=latents,
                      output_type="np", progress=False)
    err = np.abs(got - ref).mean()
    print(f"{sampler} guidance={guidance}: mean abs diff {err:.2e}")
    assert err <= 1e-3, f"{sampler} guidance={guidance}: mean abs diff {err:.2e}"
    assert np.abs(ref - ref.mean()).mean() > 1e-2  # the images are not flat: the check has teeth


def _picture(rng, mode="RGB"):
    from PIL import Image
    shape = (SIZE, SIZE, 3) if mode == "RGB" else (SIZE, SIZE)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)


def _patch_image_encoding(monkeypatch, module, latents):
    """diffusers samples the VAE posterior with torch's RNG; take its mode (as sdjax does) and our noise."""
    monkeypatch.setattr(module, "retrieve_latents", lambda out, generator=None: out.latent_dist.mode())
    monkeypatch.setattr(module, "randn_tensor", lambda *a, **k: torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()))


@pytest.mark.parametrize("sampler", ["ddim", "euler"])
def test_img2img_matches_diffusers(sd, torch_folder, sampler, monkeypatch):
    import diffusers
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as module
    rng = np.random.default_rng(1)
    image, latents = _picture(rng), rng.standard_normal((1, SIZE // 2, SIZE // 2, 4)).astype(np.float32)
    _patch_image_encoding(monkeypatch, module, latents)
    pipe = diffusers.StableDiffusionImg2ImgPipeline(**torch_folder[0].components)
    _use_scheduler(pipe, torch_folder[1], sampler)
    ref = pipe(PROMPTS[0], image=image, strength=0.6, num_inference_steps=5, guidance_scale=5.0,
               output_type="np").images
    got = sd.generate(PROMPTS[0], image=image, strength=0.6, num_steps=5, guidance_scale=5.0, sampler=sampler,
                      latents=latents, height=SIZE, width=SIZE, output_type="np", progress=False)
    err = np.abs(got - ref).mean()
    print(f"img2img {sampler}: mean abs diff {err:.2e}")
    assert err <= 1e-3


@pytest.mark.parametrize("nine_channels", [False, True])
def test_inpainting_matches_diffusers(torch_folder, torch_inpaint_folder, nine_channels, monkeypatch):
    import diffusers
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_inpaint as module
    pipe, folder = torch_inpaint_folder if nine_channels else torch_folder
    rng = np.random.default_rng(2)
    image, mask = _picture(rng), _picture(rng, "L")
    latents = rng.standard_normal((1, SIZE // 2, SIZE // 2, 4)).astype(np.float32)
    _patch_image_encoding(monkeypatch, module, latents)
    ref_pipe = diffusers.StableDiffusionInpaintPipeline(**pipe.components)
    _use_scheduler(ref_pipe, folder, "ddim")
    ref = ref_pipe(PROMPTS[1], image=image, mask_image=mask, strength=0.75, num_inference_steps=4,
                   guidance_scale=6.0, height=SIZE, width=SIZE, output_type="np").images
    got = StableDiffusion.load(folder).generate(
        PROMPTS[1], image=image, mask=mask, strength=0.75, num_steps=4, guidance_scale=6.0, latents=latents,
        height=SIZE, width=SIZE, output_type="np", progress=False)
    err = np.abs(got - ref).mean()
    print(f"inpainting nine_channels={nine_channels}: mean abs diff {err:.2e}")
    assert err <= 1e-3


def test_seed_is_per_image(sd):
    """Image i of a batch drawn with seed s is the image drawn alone with seed s + i."""
    kw = dict(num_steps=3, guidance_scale=3.0, height=SIZE, width=SIZE, progress=False, sampler="euler_a")
    batch = sd.generate(PROMPTS * 2, seed=10, **kw)
    for i in (0, 3):
        alone = sd.generate(PROMPTS[i % 2], seed=10 + i, **kw)
        np.testing.assert_array_equal(alone[0], batch[i])
    assert not np.array_equal(batch[0], batch[2])  # same prompt, other seed: another picture


def test_sampler_compiles_once(sd):
    kw = dict(num_steps=3, guidance_scale=4.0, height=SIZE, width=SIZE, progress=False, sampler="dpmpp_2m")
    sd.generate(["a"] * 10, seed=0, **kw)
    count = sd.compile_count
    sd.generate(["b"] * 10, seed=10, **kw)
    assert sd.compile_count == count


@pytest.mark.parametrize("kwargs, message", [
    (dict(height=15), "multiples of 2"),
    (dict(num_steps=0), "num_steps"),
    (dict(sampler="plms2"), "valid: ddim, ddpm, dpmpp_2m, euler, euler_a, heun, pndm"),
    (dict(image=np.zeros((16, 16, 3), np.uint8), strength=1.5), "strength"),
    (dict(image=np.zeros((16, 16, 3), np.uint8), mask=np.zeros((8, 8), np.uint8)), "mask size"),
    (dict(latents=np.zeros((1, 4, 4, 4), np.float32)), "latents must have shape"),
])
def test_bad_input_is_refused_before_compiling(sd, kwargs, message):
    count = sd.compile_count
    with pytest.raises(ValueError, match=message):
        sd.generate("a", **{"height": SIZE, "width": SIZE, "progress": False, **kwargs})
    assert sd.compile_count == count


def test_long_prompt_is_truncated_with_a_warning(sd, caplog):
    long = " ".join(["circle"] * 100)
    kw = dict(num_steps=1, guidance_scale=1.0, height=SIZE, width=SIZE, progress=False)
    with caplog.at_level("WARNING", logger="sdjax"):
        a = sd.generate(long, **kw)
    assert "truncated" in caplog.text
    b = sd.generate(" ".join(["circle"] * 75), **kw)  # 75 tokens + start + end = 77: the kept part
    np.testing.assert_array_equal(a, b)


def test_guidance_rescale_matches_diffusers(sd, torch_folder, monkeypatch):
    pipe, folder = torch_folder
    latents = np.random.default_rng(5).standard_normal((2, SIZE // 2, SIZE // 2, 4)).astype(np.float32)
    kw = dict(num_inference_steps=3, guidance_scale=6.0, prompt=PROMPTS, guidance_rescale=0.7)
    ref = _reference(pipe, folder, "ddim", monkeypatch, latents, seed=0, **kw)
    got = sd.generate(PROMPTS, num_steps=3, guidance_scale=6.0, guidance_rescale=0.7, sampler="ddim",
                      height=SIZE, width=SIZE, latents=latents, output_type="np", progress=False)
    err = np.abs(got - ref).mean()
    plain = sd.generate(PROMPTS, num_steps=3, guidance_scale=6.0, sampler="ddim", height=SIZE, width=SIZE,
                        latents=latents, output_type="np", progress=False)
    # The rescale moves this tiny model's images by ~2e-4; the match is far closer than that.
    assert err <= 1e-5 and np.abs(plain - ref).mean() > 10 * err, (err, np.abs(plain - ref).mean())

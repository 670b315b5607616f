"""StableDiffusion.generate against diffusers' StableDiffusionPipeline on the same tiny random model."""
import numpy as np
import pytest
import torch

from sdjax.pipeline import StableDiffusion

pytestmark = pytest.mark.long_file

SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}), "ddpm": ("DDPMScheduler", {}), "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "euler": ("EulerDiscreteScheduler", {}), "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_3m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 3}),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "dpmpp_3m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 3}),
    "dpmpp_2s": ("DPMSolverSinglestepScheduler", {}), "deis": ("DEISMultistepScheduler", {}),
}
PROMPTS = ["a red circle", "a blue square on the left"]
SIZE = 16  # tiny VAE: f = 2, latents 8x8
# The pipeline's parity in the default run for a first-order, an ancestral (noise draws) and a second-order
# sampler; the others (each sampler's steps are checked against its diffusers scheduler in test_samplers.py)
# run with -m slow.
SAMPLERS = [s if s in ("ddim", "euler_a", "heun") else pytest.param(s, marks=pytest.mark.slow)
            for s in sorted(SCHEDULERS)]


STOCHASTIC = ("ddpm", "euler_a", "dpmpp_2m_sde", "dpmpp_3m_sde")  # samplers whose every iteration draws unit noise
TOL = 1e-5  # mean abs difference of float images in [0, 1]; each test shows its feature moves them far more


@pytest.fixture(scope="module")
def sd(torch_folder):
    return StableDiffusion.load(torch_folder[1])


def _draws(seed, shape, count):
    """`count` unit-normal NHWC arrays of `shape`, drawn in turn from torch.Generator(seed) as diffusers'
    randn_tensor draws them (NCHW, float32, CPU): the reference's noise, replayed independently."""
    g = torch.Generator().manual_seed(seed)
    n, h, w, c = shape
    return [torch.randn((n, c, h, w), generator=g).numpy().transpose(0, 2, 3, 1) for _ in range(count)]


def _scheduler(folder, sampler):
    """The diffusers scheduler of `sampler`, configured from the folder's scheduler_config.json."""
    import diffusers
    name, extra = SCHEDULERS[sampler]
    return getattr(diffusers, name).from_pretrained(folder, subfolder="scheduler", **extra)


def _pipeline(kind, folder, sampler):
    """diffusers' `kind` pipeline loaded from the saved folder, with `sampler`'s scheduler."""
    import diffusers
    pipe = getattr(diffusers, kind).from_pretrained(folder, safety_checker=None)
    pipe.scheduler = _scheduler(folder, sampler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def reference(torch_folder):
    return _pipeline("StableDiffusionPipeline", torch_folder[1], "ddim")


@pytest.mark.parametrize("guidance", [1.0, 7.5])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_text_to_image_matches_diffusers(sd, reference, torch_folder, sampler, guidance):
    reference.scheduler = _scheduler(torch_folder[1], sampler)
    shape, steps = (2, SIZE // 2, SIZE // 2, 4), 4
    draws = _draws(3, shape, 1 + steps)
    kw = dict(num_inference_steps=steps, guidance_scale=guidance, prompt=PROMPTS, negative_prompt=["", "ugly"])
    ref = reference(generator=torch.Generator().manual_seed(3), output_type="np", height=SIZE, width=SIZE,
                    **kw).images
    noise = {"initial": draws[0], **({"steps": np.stack(draws[1:])} if sampler in STOCHASTIC else {})}
    run = lambda g: sd.generate(PROMPTS, negative_prompt=["", "ugly"], num_steps=steps, guidance_scale=g,  # noqa: E731
                                sampler=sampler, height=SIZE, width=SIZE, noise=noise, output_type="np",
                                progress=False)
    err = np.abs(run(guidance) - ref).mean()
    print(f"{sampler} guidance={guidance}: mean abs diff {err:.2e}")
    assert err <= TOL, f"{sampler} guidance={guidance}: mean abs diff {err:.2e}"
    if guidance > 1:  # the tolerance sits far below what guidance 7.5 -> 6 changes
        effect = np.abs(run(6.0) - ref).mean()
        assert effect > 20 * TOL, (sampler, effect)


def _picture(rng, mode="RGB"):
    from PIL import Image
    shape = (SIZE, SIZE, 3) if mode == "RGB" else (SIZE, SIZE)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)


@pytest.mark.parametrize("sampler, strength", [("ddim", 0.6), pytest.param("euler", 0.6, marks=pytest.mark.slow),
                                               ("euler_a", 1.0)])
def test_img2img_matches_diffusers(sd, torch_folder, sampler, strength):
    """diffusers draws the posterior sample of the image first, then the noise, then the steps' noise."""
    image, steps = _picture(np.random.default_rng(1)), 5
    pipe = _pipeline("StableDiffusionImg2ImgPipeline", torch_folder[1], sampler)
    ref = pipe(PROMPTS[0], image=image, strength=strength, num_inference_steps=steps, guidance_scale=5.0,
               generator=torch.Generator().manual_seed(4), output_type="np").images
    runs = int(steps * strength)
    draws = _draws(4, (1, SIZE // 2, SIZE // 2, 4), 2 + runs)
    noise = {"image": draws[0], "initial": draws[1], **({"steps": np.stack(draws[2:])} if sampler in STOCHASTIC else {})}
    run = lambda **kw: sd.generate(PROMPTS[0], image=image, strength=strength, num_steps=steps,  # noqa: E731
                                   guidance_scale=5.0, sampler=sampler, noise=noise, height=SIZE, width=SIZE,
                                   output_type="np", progress=False, **kw)
    err = np.abs(run() - ref).mean()
    effect = np.abs(run(sample_posterior=False) - ref).mean()  # the posterior's mean instead of its sample
    print(f"img2img {sampler} strength {strength}: mean abs diff {err:.2e}, posterior mean {effect:.2e}")
    assert err <= TOL and effect > 20 * TOL, (err, effect)


@pytest.mark.parametrize("nine_channels, strength", [(False, 0.75), (True, 0.75), (True, 1.0)])
def test_inpainting_matches_diffusers(torch_folder, torch_inpaint_folder, nine_channels, strength):
    """diffusers draws (image posterior, unless 9 channels at full strength), noise, masked-image posterior."""
    _, folder = torch_inpaint_folder if nine_channels else torch_folder
    rng = np.random.default_rng(2)
    image, mask, steps = _picture(rng), _picture(rng, "L"), 4
    ref = _pipeline("StableDiffusionInpaintPipeline", folder, "ddim")(
        PROMPTS[1], image=image, mask_image=mask, strength=strength, num_inference_steps=steps, guidance_scale=6.0,
        height=SIZE, width=SIZE, generator=torch.Generator().manual_seed(5), output_type="np").images
    draws = _draws(5, (1, SIZE // 2, SIZE // 2, 4), 3)
    if nine_channels and strength == 1:
        noise = {"initial": draws[0], "masked_image": draws[1]}
    else:
        noise = {"image": draws[0], "initial": draws[1], "masked_image": draws[2]}
    sd = StableDiffusion.load(folder)
    run = lambda **kw: sd.generate(  # noqa: E731
        PROMPTS[1], image=image, mask=mask, strength=strength, num_steps=steps, guidance_scale=6.0, noise=noise,
        height=SIZE, width=SIZE, output_type="np", progress=False, **kw)
    err = np.abs(run() - ref).mean()
    effect = np.abs(run(sample_posterior=False) - ref).mean()
    print(f"inpainting nine_channels={nine_channels} strength {strength}: mean abs diff {err:.2e}, "
          f"posterior mean {effect:.2e}")
    assert err <= TOL and effect > 20 * TOL, (err, effect)


def test_clip_skip_matches_diffusers(sd, reference, torch_folder):
    reference.scheduler = _scheduler(torch_folder[1], "ddim")
    draws = _draws(6, (1, SIZE // 2, SIZE // 2, 4), 1)
    # diffusers' own clip_skip path reads text_encoder.text_model, which transformers 5 dropped: its steps here,
    # on the negative prompt none (as diffusers).
    ids = reference.tokenizer([PROMPTS[0]], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = reference.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        embeds = reference.text_encoder.final_layer_norm(hidden)
    ref = reference(prompt_embeds=embeds, negative_prompt="", num_inference_steps=3, guidance_scale=5.0, height=SIZE,
                    width=SIZE, generator=torch.Generator().manual_seed(6), output_type="np").images
    run = lambda k: sd.generate(PROMPTS[0], num_steps=3, guidance_scale=5.0, clip_skip=k, sampler="ddim",  # noqa: E731
                                latents=draws[0], height=SIZE, width=SIZE, output_type="np", progress=False)
    err, effect = np.abs(run(1) - ref).mean(), np.abs(run(0) - ref).mean()
    print(f"clip_skip=1: mean abs diff {err:.2e}, without {effect:.2e}")
    assert err <= TOL and effect > 20 * TOL, (err, effect)


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
    (dict(sampler="plms2"), "unknown sampler 'plms2'; valid: ddim, ddpm, "),
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


def test_guidance_rescale_matches_diffusers(sd, reference, torch_folder):
    reference.scheduler = _scheduler(torch_folder[1], "ddim")
    latents = _draws(0, (2, SIZE // 2, SIZE // 2, 4), 1)[0]
    ref = reference(PROMPTS, num_inference_steps=3, guidance_scale=6.0, guidance_rescale=0.7, height=SIZE,
                    width=SIZE, generator=torch.Generator().manual_seed(0), output_type="np").images
    run = lambda r: sd.generate(PROMPTS, num_steps=3, guidance_scale=6.0, guidance_rescale=r, sampler="ddim",  # noqa: E731
                                height=SIZE, width=SIZE, latents=latents, output_type="np", progress=False)
    err, effect = np.abs(run(0.7) - ref).mean(), np.abs(run(0.0) - ref).mean()
    # The rescale moves this tiny model's images by ~2e-4; the match is far closer than that.
    assert err <= 1e-6 and effect > 20 * err, (err, effect)


def test_seeds_cover_uint32(sd):
    kw = dict(num_steps=1, guidance_scale=1.0, height=SIZE, width=SIZE, output_type="np", progress=False)
    top = sd.generate("a", seed=2 ** 32 - 1, **kw)
    assert not np.array_equal(top, sd.generate("a", seed=2 ** 31 - 1, **kw))
    count = sd.compile_count
    for bad in (-1, 2 ** 32, 1.5):
        with pytest.raises(ValueError, match="seed must be an integer"):
            sd.generate("a", seed=bad, **kw)
    with pytest.raises(ValueError, match="seed must be an integer"):
        sd.generate(["a", "b"], seed=2 ** 32 - 1, **kw)  # the second image's seed would be 2^32
    assert sd.compile_count == count


def test_strength_does_not_recompile(sd):
    image = _picture(np.random.default_rng(7))
    kw = dict(image=image, num_steps=4, guidance_scale=3.0, height=SIZE, width=SIZE, sampler="dpmpp_2m",
              output_type="np", progress=False)
    outs = [sd.generate("a", strength=0.5, **kw)]
    count = sd.compile_count
    outs += [sd.generate("a", strength=s, **kw) for s in (0.75, 1.0)]
    assert sd.compile_count == count
    assert np.abs(outs[0] - outs[1]).mean() > 1e-3 and np.abs(outs[1] - outs[2]).mean() > 1e-3

"""StableDiffusion.generate against diffusers' StableDiffusionPipeline on the same tiny random model."""
import contextlib
import importlib
import json
import shutil

import numpy as np
import pytest
import torch

from sdjax.diffusion.samplers import SCHEDULER_CLASSES
from sdjax.pipeline import StableDiffusion

# diffusers' k-diffusion schedulers call numpy on torch tensors, thousands of DeprecationWarnings a run
pytestmark = [pytest.mark.long_file, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

_DPMPP = "DPMSolverMultistepScheduler"
SCHEDULERS = {  # sampler -> (diffusers scheduler class, from_pretrained keywords choosing the variant)
    "ddim": ("DDIMScheduler", {}), "ddpm": ("DDPMScheduler", {}), "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "euler": ("EulerDiscreteScheduler", {}), "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpmpp_2m": (_DPMPP, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_3m": (_DPMPP, {"algorithm_type": "dpmsolver++", "solver_order": 3}),
    "dpmpp_2m_sde": (_DPMPP, {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "dpmpp_3m_sde": (_DPMPP, {"algorithm_type": "sde-dpmsolver++", "solver_order": 3}),
    "dpmpp_2s": ("DPMSolverSinglestepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "deis": ("DEISMultistepScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}), "lms": ("LMSDiscreteScheduler", {}),
    "lcm": ("LCMScheduler", {}), "tcd": ("TCDScheduler", {}),
    "dpm2": ("KDPM2DiscreteScheduler", {}), "dpm2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "dpmpp_sde": ("DPMSolverSDEScheduler", {}),
}
PROMPTS = ["a red circle", "a blue square on the left"]
SIZE = 16  # tiny VAE: f = 2, latents 8x8


# The pipeline's parity in the default run for a first-order, an ancestral (noise draws) and a second-order
# sampler (SDXL's too); the others (each sampler's steps are checked against its diffusers scheduler in
# the tests/test_*samplers.py files) run with -m slow.
FIRST = ("ddim", "euler_a", "heun")
SAMPLERS = [s if s in FIRST else pytest.param(s, marks=pytest.mark.slow) for s in sorted(SCHEDULERS)]
# Text-to-image here: FIRST at both guidance scales, the samplers added since at 7.5 (1.0 with -m slow).
ADDED = ("dpm2", "dpm2_a", "dpmpp_sde", "unipc", "lms", "lcm", "tcd", "dpmpp_3m", "dpmpp_2m_sde", "dpmpp_3m_sde",
         "dpmpp_2s", "deis")
THIRD_ORDER = ("dpmpp_3m", "dpmpp_3m_sde")
TEXT_TO_IMAGE = [(s, g) if s in FIRST or (s in ADDED and g > 1) else pytest.param(s, g, marks=pytest.mark.slow)
                 for s in sorted(SCHEDULERS) for g in (1.0, 7.5)]

# Samplers whose iterations draw unit noise, replayed with noise={"steps": ...} (`_step_noise`). diffusers draws
# them in turn from the pipeline's generator (TCD: none at eta 0, which pipelines pass), at every iteration from
# the first (LCM and DPM++ SDE: all but the last); DPM2 a at a step's second stage only; DPM++ SDE's come from
# torchsde's Brownian tree, replaced by the draws (`_brownian_replayed`).
STOCHASTIC = ("ddpm", "euler_a", "dpm2_a", "dpmpp_sde", "lcm", "tcd", "dpmpp_2m_sde", "dpmpp_3m_sde")
SECOND_STAGE_DRAWS = ("dpm2_a",)
TOL = 1e-5  # mean abs difference of float images in [0, 1]; each test shows its feature moves them far more


def test_every_sampler_is_checked_against_its_scheduler():
    assert {name: cls for name, (cls, _) in SCHEDULERS.items()} == SCHEDULER_CLASSES


@pytest.fixture(scope="module")
def sd(torch_folder):
    return StableDiffusion.load(torch_folder[1])


def _draws(seed, shape, count):
    """`count` unit-normal NHWC arrays of `shape`, drawn in turn from torch.Generator(seed) as diffusers'
    randn_tensor draws them (NCHW, float32, CPU): the reference's noise, replayed independently."""
    g = torch.Generator().manual_seed(seed)
    n, h, w, c = shape
    return [torch.randn((n, c, h, w), generator=g).numpy().transpose(0, 2, 3, 1) for _ in range(count)]


def _step_noise(sampler, draws, runs):
    """noise={"steps": [runs, ...]} of a run of `runs` iterations: draws[k] at the k-th iteration whose step draws
    noise in diffusers ({} for a sampler that draws none)."""
    if sampler not in STOCHASTIC:
        return {}
    steps = np.zeros((runs, *draws[0].shape), np.float32)
    at = slice(1, None, 2) if sampler in SECOND_STAGE_DRAWS else slice(None)
    drawing = len(steps[at])
    steps[at] = np.stack(draws[:drawing])
    return {"steps": steps}


@contextlib.contextmanager
def _brownian_replayed(sampler, noise):
    """Within the block, DPM++ SDE's Brownian noise sampler (torchsde) returns noise["steps"][k] at its k-th query
    (as torch NCHW), the unit noise of iteration k; for other samplers nothing changes."""
    if sampler != "dpmpp_sde":
        yield
        return
    module = importlib.import_module("diffusers.schedulers.scheduling_dpmsolver_sde")
    original, queue = module.BrownianTreeNoiseSampler, iter(noise["steps"])

    class Replaying:
        def __init__(self, *args, **kwargs):
            pass

        def __call__(self, sigma, sigma_next):
            return torch.from_numpy(next(queue).transpose(0, 3, 1, 2).copy())

    module.BrownianTreeNoiseSampler = Replaying
    try:
        yield
    finally:
        module.BrownianTreeNoiseSampler = original


def _scheduler(folder, sampler):
    """The diffusers scheduler of `sampler`, configured from the folder's scheduler_config.json."""
    import diffusers
    name, extra = SCHEDULERS[sampler]
    return getattr(diffusers, name).from_pretrained(folder, subfolder="scheduler", **extra)


def _iterations(folder, sampler, steps):
    """The iterations (model calls) of a text-to-image run of `steps` steps: diffusers' scheduler.timesteps."""
    scheduler = _scheduler(folder, sampler)
    scheduler.set_timesteps(steps)
    return len(scheduler.timesteps)


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


@pytest.mark.parametrize("sampler, guidance", TEXT_TO_IMAGE)
def test_text_to_image_matches_diffusers(sd, reference, torch_folder, sampler, guidance):
    reference.scheduler = _scheduler(torch_folder[1], sampler)
    # third-order samplers: under 15 steps diffusers lowers the last two steps' order, so 4 steps would run 2M
    shape, steps = (2, SIZE // 2, SIZE // 2, 4), 5 if sampler in THIRD_ORDER else 4
    runs = _iterations(torch_folder[1], sampler, steps)
    draws = _draws(3, shape, 1 + runs)
    noise = {"initial": draws[0], **_step_noise(sampler, draws[1:], runs)}
    kw = dict(num_inference_steps=steps, guidance_scale=guidance, prompt=PROMPTS, negative_prompt=["", "ugly"])
    with _brownian_replayed(sampler, noise):
        ref = reference(generator=torch.Generator().manual_seed(3), output_type="np", height=SIZE, width=SIZE,
                        **kw).images
    run = lambda g: sd.generate(PROMPTS, negative_prompt=["", "ugly"], num_steps=steps, guidance_scale=g,  # noqa: E731
                                sampler=sampler, height=SIZE, width=SIZE, noise=noise, output_type="np",
                                progress=False)
    err = np.abs(run(guidance) - ref).mean()
    print(f"{sampler} guidance={guidance}: mean abs diff {err:.2e}")
    assert err <= TOL, f"{sampler} guidance={guidance}: mean abs diff {err:.2e}"
    if guidance > 1:  # the tolerance sits far below what guidance 7.5 -> 6 changes
        effect = np.abs(run(6.0) - ref).mean()
        assert effect > 20 * TOL, (sampler, effect)


def _picture(rng, mode="RGB", size=(SIZE, SIZE)):
    """A random PIL picture of `size` (height, width)."""
    from PIL import Image
    shape = (*size, 3) if mode == "RGB" else size
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)


@pytest.mark.parametrize("sampler, strength, size", [
    ("ddim", 0.6, (SIZE, SIZE)), pytest.param("euler", 0.6, (SIZE, SIZE), marks=pytest.mark.slow),
    ("euler_a", 1.0, (SIZE, SIZE)), ("ddim", 0.6, (24, 16)), ("ddim", 0.6, (25, 17))])
def test_img2img_matches_diffusers(sd, torch_folder, sampler, strength, size):
    """diffusers draws the posterior sample of the image first, then the noise, then the steps' noise. Without
    height/width the output keeps the picture's size, rounded down to a multiple of the VAE's factor (2; 25x17 is
    resized to 24x16), as diffusers' image processor does."""
    image, steps = _picture(np.random.default_rng(1), size=size), 5
    pipe = _pipeline("StableDiffusionImg2ImgPipeline", torch_folder[1], sampler)
    ref = pipe(PROMPTS[0], image=image, strength=strength, num_inference_steps=steps, guidance_scale=5.0,
               generator=torch.Generator().manual_seed(4), output_type="np").images
    height, width = (d - d % sd.vae_scale_factor for d in size)
    assert ref.shape == (1, height, width, 3)
    runs = int(steps * strength)
    draws = _draws(4, (1, height // 2, width // 2, 4), 2 + runs)
    noise = {"image": draws[0], "initial": draws[1], **_step_noise(sampler, draws[2:], runs)}
    run = lambda **kw: sd.generate(PROMPTS[0], image=image, strength=strength, num_steps=steps,  # noqa: E731
                                   guidance_scale=5.0, sampler=sampler, noise=noise, output_type="np",
                                   progress=False, **kw)
    out = run()
    assert out.shape == ref.shape, (out.shape, ref.shape)
    err = np.abs(out - ref).mean()
    effect = np.abs(run(sample_posterior=False) - ref).mean()  # the posterior's mean instead of its sample
    print(f"img2img {sampler} strength {strength} {size}: mean abs diff {err:.2e}, posterior mean {effect:.2e}")
    assert err <= TOL and effect > 20 * TOL, (err, effect)


# strength None: left out in both calls (diffusers' inpainting default, 1.0, is ours)
@pytest.mark.parametrize("nine_channels, strength", [(False, 0.75), (True, 0.75), (True, None)])
def test_inpainting_matches_diffusers(torch_folder, torch_inpaint_folder, nine_channels, strength):
    """diffusers draws (image posterior, unless 9 channels at full strength), noise, masked-image posterior."""
    _, folder = torch_inpaint_folder if nine_channels else torch_folder
    rng = np.random.default_rng(2)
    image, mask, steps = _picture(rng), _picture(rng, "L"), 4
    given = {} if strength is None else {"strength": strength}
    ref = _pipeline("StableDiffusionInpaintPipeline", folder, "ddim")(
        PROMPTS[1], image=image, mask_image=mask, num_inference_steps=steps, guidance_scale=6.0, height=SIZE,
        width=SIZE, generator=torch.Generator().manual_seed(5), output_type="np", **given).images
    draws = _draws(5, (1, SIZE // 2, SIZE // 2, 4), 3)
    if nine_channels and strength is None:  # full strength: no image posterior
        noise = {"initial": draws[0], "masked_image": draws[1]}
    else:
        noise = {"image": draws[0], "initial": draws[1], "masked_image": draws[2]}
    sd = StableDiffusion.load(folder)
    run = lambda **kw: sd.generate(  # noqa: E731
        PROMPTS[1], image=image, mask=mask, num_steps=steps, guidance_scale=6.0, noise=noise, height=SIZE,
        width=SIZE, output_type="np", progress=False, **given, **kw)
    err = np.abs(run() - ref).mean()
    effect = np.abs(run(sample_posterior=False) - ref).mean()
    print(f"inpainting nine_channels={nine_channels} strength {strength}: mean abs diff {err:.2e}, "
          f"posterior mean {effect:.2e}")
    assert err <= TOL and effect > 20 * TOL, (err, effect)


@pytest.mark.parametrize("sampler, scheduler, variant", [("unipc", "UniPCMultistepScheduler", {}),
                                                       ("dpmpp_2m_sde", _DPMPP, {"algorithm_type": "sde-dpmsolver++"})])
def test_the_models_scheduler_is_the_default_sampler(torch_folder, tmp_path, sampler, scheduler, variant):
    """A folder whose scheduler_config.json names another scheduler: generate() without sampler= runs it, as
    diffusers' pipeline loaded from the folder runs its own (the tiny folder's DDIM moves the images far more)."""
    import diffusers
    folder = tmp_path / "model"
    shutil.copytree(torch_folder[1], folder)
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    getattr(diffusers, scheduler).from_config(config, **variant).save_config(folder / "scheduler")
    index = json.loads((folder / "model_index.json").read_text())  # where diffusers reads the class from
    (folder / "model_index.json").write_text(json.dumps({**index, "scheduler": ["diffusers", scheduler]}))
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.scheduler).__name__ == scheduler
    steps, shape = 4, (1, SIZE // 2, SIZE // 2, 4)
    ref = pipe(PROMPTS[0], num_inference_steps=steps, height=SIZE, width=SIZE,
               generator=torch.Generator().manual_seed(8), output_type="np").images
    runs = len(pipe.scheduler.timesteps)
    draws = _draws(8, shape, 1 + runs)
    sd = StableDiffusion.load(str(folder))
    assert sd.default_sampler() == sampler
    run = lambda **kw: sd.generate(PROMPTS[0], num_steps=steps, height=SIZE, width=SIZE,  # noqa: E731
                                   output_type="np", progress=False, **kw)
    err = np.abs(run(noise={"initial": draws[0], **_step_noise(sampler, draws[1:], runs)}) - ref).mean()
    effect = np.abs(run(sampler="ddim", latents=draws[0]) - ref).mean()
    print(f"default {sampler}: mean abs diff {err:.2e}, ddim {effect:.2e}")
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


def test_calls_of_any_size_give_the_same_bits(sd, monkeypatch):
    """The loop runs in calls of several iterations (progress between them): the images do not depend on how many
    iterations a call runs; the pipeline's own choice keeps a call's overhead under MAX_OVERHEAD of its time."""
    from sdjax.pipeline import loop_calls
    kw = dict(num_steps=3, guidance_scale=3.0, height=SIZE, width=SIZE, progress=False, sampler="euler_a", seed=10)
    ref = sd.generate(PROMPTS * 2, **kw)  # test_seed_is_per_image's executable
    for chunk in (1, 2, 10):
        monkeypatch.setattr(loop_calls, "CHUNK", chunk)
        np.testing.assert_array_equal(sd.generate(PROMPTS * 2, **kw), ref)
    monkeypatch.setattr(loop_calls, "CHUNK", None)
    chunk_size = loop_calls.chunk_size
    assert chunk_size(0.28, 0.9) == 32 and chunk_size(0.001, 0.05) == 2 and chunk_size(0, 1) == 1
    assert 0.28 / (32 * 0.9) <= loop_calls.MAX_OVERHEAD < 0.28 / (31 * 0.9)


def test_sampler_compiles_once(sd):
    kw = dict(num_steps=3, guidance_scale=4.0, height=SIZE, width=SIZE, progress=False, sampler="dpmpp_2m")
    sd.generate(["a"] * 10, seed=0, **kw)
    count = sd.compile_count
    sd.generate(["b"] * 10, seed=10, **kw)
    assert sd.compile_count == count


@pytest.mark.parametrize("kwargs, message", [
    (dict(height=15), "multiples of 2"),
    (dict(num_steps=0), "num_steps"),
    (dict(sampler="plms2"), "unknown sampler .plms2.; valid: ddim, ddpm, "),
    (dict(image=np.zeros((16, 16, 3), np.uint8), strength=1.5), "strength"),
    (dict(image=np.zeros((16, 16, 3), np.uint8), mask=np.zeros((8, 8), np.uint8)), "mask size"),
    (dict(latents=np.zeros((1, 4, 4, 4), np.float32)), "latents must have shape"),
])
def test_bad_input_is_refused_before_compiling(sd, kwargs, message):
    count = sd.compile_count
    with pytest.raises(ValueError, match=message):
        sd.generate("a", **{"height": SIZE, "width": SIZE, "progress": False, **kwargs})
    assert sd.compile_count == count


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

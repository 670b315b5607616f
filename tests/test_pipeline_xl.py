"""StableDiffusion.load of SDXL folders (a StableDiffusionXL) against diffusers' StableDiffusionXLPipeline,
StableDiffusionXLImg2ImgPipeline (the refiner) and StableDiffusionXLInpaintPipeline loaded from the same tiny
random folders, and the base -> refiner hand-off (denoising_end / denoising_start)."""
import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from sdjax.pipeline import StableDiffusion  # noqa: E402
from sdjax.pipeline import StableDiffusionXL  # noqa: E402
from test_pipeline import (SAMPLERS, STOCHASTIC, THIRD_ORDER, _brownian_replayed, _draws, _iterations,  # noqa: E402
                           _picture, _scheduler, _step_noise)

# diffusers' k-diffusion schedulers call numpy on torch tensors, thousands of DeprecationWarnings a run
pytestmark = [pytest.mark.long_file, pytest.mark.filterwarnings("ignore::DeprecationWarning")]
# mean abs difference of float images in [0, 1]: the differences here are 5e-7 .. 2e-6, and each test shows that
# its feature moves the images by more than 10 * TOL (prompt_2 moves this tiny model's unguided images by 4e-5)
TOL = 3e-6
SIZE, LATENT = 16, (8, 8, 4)  # tiny VAE: f = 2
PROMPTS = ["a red circle", "a blue square on the left"]
PROMPTS_2 = ["a small square", "a green triangle at the top"]


def _reference(cls, folder, sampler):
    pipe = getattr(diffusers, cls).from_pretrained(folder)
    pipe.scheduler = _scheduler(folder, sampler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def base(sdxl_folders):
    return StableDiffusion.load(sdxl_folders["base"])


@pytest.fixture(scope="module")
def refiner(sdxl_folders):
    return StableDiffusion.load(sdxl_folders["refiner"])


def _noise(seed, n, runs, sampler, kinds=("initial",)):
    """The reference's draws from torch.Generator(seed), in its order: `kinds` first, then the `runs` iterations'
    (stochastic samplers only, `_step_noise`)."""
    draws = _draws(seed, (n, *LATENT), len(kinds) + runs)
    return {**dict(zip(kinds, draws)), **_step_noise(sampler, draws[len(kinds):], runs)}


def _err(a, b):
    return float(np.abs(a - b).mean())


def test_load_gives_the_sdxl_pipeline(base, refiner):
    assert isinstance(base, StableDiffusionXL) and isinstance(refiner, StableDiffusionXL)
    assert not base.conditioning.aesthetic and refiner.conditioning.aesthetic
    assert [kind for kind, _, _ in refiner.conditioning.towers] == ["text_encoder_2"]


@pytest.mark.parametrize("guidance", [1.0, 5.0])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_text_to_image_matches_diffusers(base, sdxl_folders, sampler, guidance):
    """prompt_2 goes to the second tower; without a negative prompt, guidance is away from zero text
    (force_zeros_for_empty_prompt)."""
    steps = 5 if sampler in THIRD_ORDER else 4
    noise = _noise(3, 2, _iterations(sdxl_folders["base"], sampler, steps), sampler)
    with _brownian_replayed(sampler, noise):
        ref = _reference("StableDiffusionXLPipeline", sdxl_folders["base"], sampler)(
            prompt=PROMPTS, prompt_2=PROMPTS_2, num_inference_steps=steps, guidance_scale=guidance, height=SIZE,
            width=SIZE, generator=torch.Generator().manual_seed(3), output_type="np").images
    run = lambda **kw: base.generate(PROMPTS, num_steps=steps, sampler=sampler, height=SIZE, width=SIZE,  # noqa: E731
                                     noise=noise, output_type="np", progress=False,
                                     **{"prompt_2": PROMPTS_2, "guidance_scale": guidance, **kw})
    err = _err(run(), ref)
    effect = _err(run(guidance_scale=4.0) if guidance > 1 else run(prompt_2=None), ref)
    print(f"{sampler} guidance={guidance}: mean abs diff {err:.2e}, effect {effect:.2e}")
    assert err <= TOL and effect > 10 * TOL, (err, effect)


def ref_timesteps(folder, sampler, steps):
    scheduler = _scheduler(folder, sampler)
    scheduler.set_timesteps(steps)
    return scheduler.timesteps


def test_negative_prompts_clip_skip_and_micro_conditioning_match_diffusers(base, sdxl_folders):
    """One image: diffusers repeats its time ids as [negative, positive] * batch against rows [negatives...,
    positives...], so with negative sizes of their own it conditions a batch's images on the wrong ones."""
    micro = dict(original_size=(512, 384), crops_coords_top_left=(16, 0), target_size=(896, 1152),
                 negative_original_size=(256, 256), negative_crops_coords_top_left=(4, 4),
                 negative_target_size=(1024, 1024))
    kw = dict(prompt_2=PROMPTS_2[1], negative_prompt="ugly", negative_prompt_2="blurry",
              clip_skip=1, guidance_scale=6.0, height=SIZE, width=SIZE)
    ref = _reference("StableDiffusionXLPipeline", sdxl_folders["base"], "ddim")(
        PROMPTS[0], num_inference_steps=3, generator=torch.Generator().manual_seed(4), output_type="np",
        **micro, **kw).images
    latents = _draws(4, (1, *LATENT), 1)[0]
    run = lambda **m: base.generate(PROMPTS[0], num_steps=3, sampler="ddim", latents=latents,  # noqa: E731
                                    output_type="np", progress=False, **kw, **{**micro, **m})
    err, effect = _err(run(), ref), _err(run(negative_original_size=(1024, 1024)), ref)
    print(f"micro-conditioning: mean abs diff {err:.2e}, another negative_original_size {effect:.2e}")
    assert err <= TOL and effect > 10 * TOL, (err, effect)


@pytest.mark.parametrize("sampler, strength", [("ddim", 0.6), pytest.param("euler", 0.6, marks=pytest.mark.slow),
                                               ("euler_a", 1.0)])
def test_refiner_img2img_matches_diffusers(refiner, sdxl_folders, sampler, strength):
    """The refiner: the second tower only, fed `prompt`; aesthetic scores instead of the target size."""
    image, steps = _picture(np.random.default_rng(1)), 5
    kw = dict(image=image, strength=strength, guidance_scale=5.0, aesthetic_score=7.0, negative_aesthetic_score=2.0)
    ref = _reference("StableDiffusionXLImg2ImgPipeline", sdxl_folders["refiner"], sampler)(
        PROMPTS[0], num_inference_steps=steps, generator=torch.Generator().manual_seed(4), output_type="np",
        **kw).images
    noise = _noise(4, 1, int(steps * strength), sampler, kinds=("image", "initial"))
    run = lambda **a: refiner.generate(PROMPTS[0], num_steps=steps, sampler=sampler, noise=noise,  # noqa: E731
                                       height=SIZE, width=SIZE, output_type="np", progress=False, **{**kw, **a})
    err, effect = _err(run(), ref), _err(run(aesthetic_score=6.0), ref)
    print(f"refiner img2img {sampler} strength {strength}: mean abs diff {err:.2e}, aesthetic 6 {effect:.2e}")
    assert err <= TOL and effect > 10 * TOL, (err, effect)


@pytest.mark.parametrize("strength", [0.75, 1.0])
def test_inpainting_matches_diffusers(base, sdxl_folders, strength):
    """A 4-channel U-Net inpaints by latent blending; diffusers draws image posterior, noise, masked image."""
    rng = np.random.default_rng(2)
    image, mask, steps = _picture(rng), _picture(rng, "L"), 4
    kw = dict(image=image, strength=strength, guidance_scale=6.0, height=SIZE, width=SIZE)
    ref = _reference("StableDiffusionXLInpaintPipeline", sdxl_folders["base"], "euler")(
        PROMPTS[1], mask_image=mask, num_inference_steps=steps, generator=torch.Generator().manual_seed(5),
        output_type="np", **kw).images
    noise = _noise(5, 1, 0, "euler", kinds=("image", "initial", "masked_image"))
    run = lambda m: base.generate(PROMPTS[1], mask=m, num_steps=steps, sampler="euler", noise=noise,  # noqa: E731
                                  output_type="np", progress=False, **kw)
    err, effect = _err(run(mask), ref), _err(run(np.zeros((SIZE, SIZE), np.uint8)), ref)
    print(f"inpainting strength {strength}: mean abs diff {err:.2e}, empty mask {effect:.2e}")
    assert err <= TOL and effect > 10 * TOL, (err, effect)


@pytest.mark.parametrize("sampler", [pytest.param("euler", marks=pytest.mark.slow),
                                     pytest.param("euler_a", marks=pytest.mark.slow), "heun"])
def test_base_to_refiner_hand_off_matches_diffusers(base, refiner, sdxl_folders, sampler):
    """The base stops at denoising_end and returns latents; the refiner continues from them at denoising_start
    (a 2nd-order sampler's refiner begins on a whole step, as diffusers cuts its timesteps)."""
    steps, split = 6, 0.7
    pipe_base = _reference("StableDiffusionXLPipeline", sdxl_folders["base"], sampler)
    pipe_refiner = _reference("StableDiffusionXLImg2ImgPipeline", sdxl_folders["refiner"], sampler)
    g = torch.Generator().manual_seed(7)
    handed = pipe_base(PROMPTS[0], num_inference_steps=steps, denoising_end=split, guidance_scale=5.0, height=SIZE,
                       width=SIZE, generator=g, output_type="latent").images
    ref = pipe_refiner(PROMPTS[0], image=handed, num_inference_steps=steps, denoising_start=split,
                       guidance_scale=5.0, generator=g, output_type="np").images
    # one torch generator runs on: the base draws its noise and its iterations' noise, the refiner its own
    t = ref_timesteps(sdxl_folders["base"], sampler, steps)
    n_base = int((t >= round(1000 * (1 - split))).sum())
    draws = _draws(7, (1, *LATENT), 1 + len(t))
    step_noise = lambda a, b: {"steps": np.stack(draws[1 + a:1 + b])} if sampler in STOCHASTIC else {}  # noqa: E731
    latents = base.generate(PROMPTS[0], num_steps=steps, denoising_end=split, guidance_scale=5.0, sampler=sampler,
                            height=SIZE, width=SIZE, output_type="latent", progress=False,
                            noise={"initial": draws[0], **step_noise(0, n_base)})
    np.testing.assert_allclose(latents, handed.numpy().transpose(0, 2, 3, 1), atol=1e-4)
    run = lambda at: refiner.generate(  # noqa: E731
        PROMPTS[0], image=latents, num_steps=steps, denoising_start=at, guidance_scale=5.0, sampler=sampler,
        output_type="np", progress=False, noise=step_noise(n_base, len(t)))
    err = _err(run(split), ref)
    effect = None if sampler in STOCHASTIC else _err(run(0.5), ref)  # the refiner from another point
    print(f"hand-off {sampler}: mean abs diff {err:.2e}, refiner from 0.5: {effect}")
    assert err <= TOL, err
    assert effect is None or effect > 10 * TOL, effect


def _training_batch(pre):
    """Token ids of PROMPTS / PROMPTS_2 and a micro-batch's sizes and crops (the images: zeros)."""
    from sdjax.text.tokenizer import tokenize
    ids = {"input_ids": tokenize(pre.tokenizer, PROMPTS)[0], "input_ids_2": tokenize(pre.tokenizer_2, PROMPTS_2)[0]}
    return {"images": np.zeros((2, SIZE, SIZE, 3), np.float32), "original_size": np.array([[512, 384], [20, 16]]),
            "crop_top_left": np.array([[16, 0], [2, 0]]), **ids}


def test_training_conditions_as_sampling(base):
    """The train step's conditioning (ldm_step.conditioning) of a batch is the text and pooled text the pipeline
    samples with, and the time ids of each example's recorded original size and crop, the training size last."""
    import jax
    from sdjax.train.ldm import ldm_stage
    from sdjax.train.ldm.ldm_step import conditioning
    pre = base.pretrained
    micro, keep = _training_batch(pre), np.zeros(2, bool)
    got = jax.jit(lambda p, m: conditioning(pre.modules, p, m, keep, ldm_stage.empty_prompt_ids(pre)))(pre.params, micro)
    text, pooled = base.encode_prompts(PROMPTS, PROMPTS_2)
    np.testing.assert_allclose(got["encoder_hidden_states"], text, atol=1e-6)
    np.testing.assert_allclose(got["text_embeds"], pooled, atol=1e-6)
    c = dict(original_size=None, crops_coords_top_left=(0, 0), target_size=None)
    want = [base.conditioning.time_ids((SIZE, SIZE), {**c, "original_size": tuple(o), "crops_coords_top_left": tuple(k)})
            for o, k in zip(micro["original_size"], micro["crop_top_left"])]
    np.testing.assert_array_equal(got["time_ids"], np.stack(want))
    np.testing.assert_array_equal(want[1], [20, 16, 2, 0, SIZE, SIZE])


def test_dropped_captions_train_on_the_unconditional_branch_of_sampling(base):
    """Caption dropout conditions a dropped caption on what sampling's unconditional branch (without a negative
    prompt) is: zero text and pooled text for the base (force_zeros_for_empty_prompt, test_text_to_image_matches_
    diffusers), the empty prompt's encoding where model_index.json sets the flag false; from token ids and from
    the latent cache alike. The time ids stay the example's."""
    import dataclasses

    import jax
    from sdjax.train.ldm import ldm_stage
    from sdjax.train.ldm.ldm_step import conditioning
    pre, drop = base.pretrained, np.array([True, False])
    micro, empty_ids = _training_batch(pre), ldm_stage.empty_prompt_ids(pre)
    text, pooled = base.encode_prompts(PROMPTS, PROMPTS_2)
    empty = dict(zip(("encoder_hidden_states", "text_embeds"), base.encode_prompts([""], [""])))
    cached = {"latent_mean": np.zeros((2, *LATENT), np.float32), "encoder_hidden_states": text, "text_embeds": pooled,
              **{k: micro[k] for k in ("original_size", "crop_top_left")}}
    unflagged = dataclasses.replace(pre, options={**pre.options, "force_zeros_for_empty_prompt": False})
    assert ldm_stage.zero_dropped(pre) and not ldm_stage.zero_dropped(unflagged)
    for model in (pre, unflagged):
        zeros = ldm_stage.zero_dropped(model)
        fn = jax.jit(lambda p, m, e: conditioning(pre.modules, p, m, drop, empty_ids, e, zeros))
        for batch in (micro, cached):
            got = fn(pre.params, batch, {k: v[0] for k, v in empty.items()})
            for key, kept in (("encoder_hidden_states", text), ("text_embeds", pooled)):
                dropped = np.zeros_like(kept[0]) if zeros else empty[key][0]
                np.testing.assert_allclose(got[key][0], dropped, atol=1e-6, err_msg=f"{key} zeros={zeros}")
                np.testing.assert_allclose(got[key][1], kept[1], atol=1e-6, err_msg=key)
            np.testing.assert_array_equal(got["time_ids"][0][:4], [512, 384, 16, 0])
    assert np.abs(empty["encoder_hidden_states"]).mean() > 0.1  # the empty prompt's text is far from zeros


def test_default_strengths_are_diffusers():
    """generate's strength without one: each family's as diffusers' pipelines default it (test_pipeline.py runs the
    SD inpainting default against the pipeline)."""
    import inspect

    import diffusers
    from sdjax.pipeline.conditioning import TextConditioning
    from sdjax.pipeline.conditioning_xl import XLConditioning
    default = lambda cls: inspect.signature(getattr(diffusers, cls).__call__).parameters["strength"].default  # noqa: E731
    assert XLConditioning.default_strength == {"img2img": default("StableDiffusionXLImg2ImgPipeline"),
                                               "inpaint": default("StableDiffusionXLInpaintPipeline")}
    assert TextConditioning.default_strength == {"img2img": default("StableDiffusionImg2ImgPipeline"),
                                                 "inpaint": default("StableDiffusionInpaintPipeline")}

"""The VAE's per-channel latents_mean / latents_std (Playground-style SDXL VAEs): sampling against diffusers'
SDXL pipelines loading the same folder, training's latents (from images and from the latent cache) against the
formula, and the keys kept by loading and export."""
import json
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from sdjax.models.autoencoder import from_latents, to_latents  # noqa: E402
from sdjax.pipeline import StableDiffusion  # noqa: E402
from sdjax.train.ldm import ldm_step  # noqa: E402
from sdjax.weights.pretrained import load_pretrained, save_pretrained  # noqa: E402
from test_pipeline import _iterations, _picture  # noqa: E402
from test_pipeline_xl import PROMPTS, PROMPTS_2, SIZE, TOL, _err, _noise, _reference  # noqa: E402
from train_fakes import ABAR, EMPTY, toy_setup  # noqa: E402

MEAN, STD = [0.4, -0.3, 0.2, -0.6], [0.7, 1.6, 1.1, 0.5]


@pytest.fixture(scope="module")
def stats_folder(sdxl_folders, tmp_path_factory):
    """The tiny SDXL base with latents_mean / latents_std in vae/config.json."""
    folder = str(tmp_path_factory.mktemp("sdxl_stats") / "model")
    shutil.copytree(sdxl_folders["base"], folder)
    path = os.path.join(folder, "vae", "config.json")
    with open(path) as f:
        config = json.load(f)
    with open(path, "w") as f:
        json.dump({**config, "latents_mean": MEAN, "latents_std": STD}, f)
    return folder


@pytest.fixture(scope="module")
def pipe(stats_folder):
    return StableDiffusion.load(stats_folder)


def _plain(pipe):
    return pipe.vae.clone(latents_mean=None, latents_std=None)


def _decoded_without_stats(pipe, latents):
    """Images [B, H, W, 3] in [0, 1] of the diffusion model's latents decoded as if the VAE had no stats."""
    images = from_latents(_plain(pipe), pipe.params["vae"], jnp.asarray(latents))
    return np.clip(np.asarray(images, np.float32) / 2 + 0.5, 0, 1)


def test_text_to_image_matches_diffusers(pipe, stats_folder):
    """The decode: latents * std / scaling_factor + mean, per channel. (The run of test_pipeline_xl's
    test_text_to_image_matches_diffusers[ddim-1.0]: its text and loop programs are compiled once, jax's cache.)"""
    kw = dict(prompt_2=PROMPTS_2, num_steps=4, sampler="ddim", guidance_scale=1.0, height=SIZE, width=SIZE,
              noise=_noise(3, 2, _iterations(stats_folder, "ddim", 4), "ddim"), progress=False)
    ref = _reference("StableDiffusionXLPipeline", stats_folder, "ddim")(
        prompt=PROMPTS, prompt_2=PROMPTS_2, num_inference_steps=4, guidance_scale=1.0, height=SIZE, width=SIZE,
        generator=torch.Generator().manual_seed(3), output_type="np").images
    err = _err(pipe.generate(PROMPTS, output_type="np", **kw), ref)
    effect = _err(_decoded_without_stats(pipe, pipe.generate(PROMPTS, output_type="latent", **kw)), ref)
    print(f"text-to-image with latent stats: mean abs diff {err:.2e}, decoded without them {effect:.2e}")
    assert err <= TOL and effect > 10 * TOL, (err, effect)


def test_image_to_image_matches_diffusers(pipe, stats_folder):
    """The encode: (z - mean) * scaling_factor / std, per channel (diffusers' SDXL img2img prepare_latents)."""
    image, steps, strength = _picture(np.random.default_rng(1)), 4, 0.5
    ref = _reference("StableDiffusionXLImg2ImgPipeline", stats_folder, "ddim")(
        PROMPTS[1], image=image, strength=strength, num_inference_steps=steps, guidance_scale=1.0,
        generator=torch.Generator().manual_seed(4), output_type="np").images
    noise = _noise(4, 1, int(steps * strength), "ddim", kinds=("image", "initial"))
    err = _err(pipe.generate(PROMPTS[1], image=image, strength=strength, num_steps=steps, sampler="ddim",
                             guidance_scale=1.0, noise=noise, output_type="np", progress=False), ref)
    # the effect: the image's latents encoded without the stats (the same posterior draw), denoised the same way
    pixels = jnp.asarray(np.asarray(image, np.float32)[None] / 127.5 - 1)
    plain = to_latents(_plain(pipe), pipe.params["vae"], pixels, jnp.asarray(noise["image"]))
    effect = _err(pipe.generate(PROMPTS[1], image=plain, strength=strength, num_steps=steps, sampler="ddim",
                                guidance_scale=1.0, noise={"initial": noise["initial"]}, output_type="np",
                                progress=False), ref)
    print(f"image-to-image with latent stats: mean abs diff {err:.2e}, encoded without them {effect:.2e}")
    assert err <= TOL and effect > 10 * TOL, (err, effect)


def test_load_and_export_keep_the_stats(stats_folder, sdxl_folders, tmp_path, caplog):
    """The stats survive load -> save_pretrained (the export) -> diffusers; a separate VAE (`vae=`) with other
    stats keeps the model's, with a warning."""
    pre = load_pretrained(stats_folder)
    assert pre.modules["vae"].latents_mean == tuple(MEAN) and pre.modules["vae"].latents_std == tuple(STD)
    save_pretrained(pre, str(tmp_path / "out"))
    ref = diffusers.AutoencoderKL.from_pretrained(str(tmp_path / "out"), subfolder="vae")
    assert list(ref.config.latents_mean) == MEAN and list(ref.config.latents_std) == STD
    with caplog.at_level(logging.WARNING, logger="sdjax"):
        other = load_pretrained(sdxl_folders["base"], vae=stats_folder)
    assert other.modules["vae"].latents_mean is None and "latents_mean" in caplog.text


def test_training_latents_follow_the_stats():
    """The train step's encode (ldm_step.latents) gives (z - mean) * scaling_factor / std; the loss from the latent
    cache's posteriors (scaled_latents) equals the loss from the images, and both move without the stats."""
    modules, params, micro = toy_setup()
    vae = modules["vae"].clone(latents_mean=tuple(MEAN), latents_std=tuple(STD))
    post = vae.apply({"params": params["vae"]}, micro["images"], method="encode")
    want = (np.asarray(post.mean, np.float64) - MEAN) * vae.scaling_factor / np.asarray(STD)
    np.testing.assert_allclose(ldm_step.latents(vae, params["vae"], micro["images"], None, False), want,
                               rtol=1e-6, atol=1e-6)
    text = lambda ids: modules["text_encoder"].apply({"params": params["text_encoder"]}, ids)["last_hidden_state"]  # noqa: E731
    cached = {"latent_mean": post.mean, "latent_std": post.std, "encoder_hidden_states": text(micro["input_ids"]),
              "key": micro["key"]}
    config = ml_collections.ConfigDict(dict(loss=dict(prediction_type="epsilon", min_snr_gamma=0.0, offset_noise=0.0,
                                                      caption_dropout=0.0, latent="sample")))
    trainable, frozen = {"unet": params["unet"]}, {k: params[k] for k in ("vae", "text_encoder")}
    empty_text = {"encoder_hidden_states": text(EMPTY["input_ids"][None])[0]}

    def loss(vae, batch):
        fn = ldm_step.make_loss_fn({**modules, "vae": vae}, config, jnp.asarray(ABAR), EMPTY, empty_text)
        return float(jax.jit(fn)(trainable, frozen, batch))
    from_images, from_cache = loss(vae, micro), loss(vae, cached)
    effect = abs(loss(modules["vae"], micro) - from_images)
    print(f"loss from images {from_images:.6f}, from the cache {from_cache:.6f}, without the stats: moved {effect:.2e}")
    assert abs(from_cache - from_images) <= 1e-6 * from_images < effect / 100

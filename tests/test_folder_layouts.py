"""Diffusers folders as users hold them (older writers' names, pickles, shards, variants, old scheduler
configs), each loaded by sdjax and by diffusers from the same folder."""
import json
import logging
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from conftest import torch_state
from sdjax.diffusion import samplers
from sdjax.pipeline import StableDiffusion
from sdjax.weights.convert import to_state_dict
from sdjax.weights.diffusers import SD_SCHEDULER
from sdjax.weights.pretrained import load_pretrained

SIZE = 16
PROMPT = "a red circle"
# SD 1.4's scheduler_config.json as diffusers 0.2 wrote it: no steps_offset, timestep_spacing, prediction_type.
OLD_SCHEDULER = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.2.2", "beta_end": 0.012,
                 "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
                 "skip_prk_steps": True}
OLD_VAE_NAMES = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def _save_bin_shards(tensors, folder, stem, n=2):
    """PyTorch pickles in n shards plus `{stem}.bin.index.json`, as save_pretrained(max_shard_size) wrote them."""
    names = sorted(tensors)
    weight_map = {}
    for i in range(n):
        shard = f"{stem}-{i + 1:05d}-of-{n:05d}.bin"
        part = names[i::n]
        torch.save({k: torch.from_numpy(tensors[k]) for k in part}, os.path.join(folder, shard))
        weight_map.update({k: shard for k in part})
    with open(os.path.join(folder, f"{stem}.bin.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def _save_safetensors_shards(tensors, folder, stem, n=2):
    names = sorted(tensors)
    weight_map = {}
    for i in range(n):
        shard = f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file({k: tensors[k] for k in names[i::n]}, os.path.join(folder, shard))
        weight_map.update({k: shard for k in names[i::n]})
    with open(os.path.join(folder, f"{stem}.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def _old_vae_name(name):
    for new, old in OLD_VAE_NAMES.items():
        name = name.replace(f"mid_block.attentions.0.{new}.", f"mid_block.attentions.0.{old}.")
    return name


@pytest.fixture(scope="module")
def legacy_folder(torch_folder, tmp_path_factory):
    """The tiny pipeline re-saved as old hub folders are: VAE with pre-0.15 attention names in a .bin, text
    encoder as sharded pytorch_model-*.bin with the `text_model.` prefix, sharded U-Net safetensors, a
    model_index.json that lists a safety checker and feature extractor, diffusers 0.2's scheduler config."""
    src = torch_folder[1]
    folder = str(tmp_path_factory.mktemp("legacy") / "sd")
    shutil.copytree(src, folder)
    vae = load_file(os.path.join(folder, "vae", "diffusion_pytorch_model.safetensors"))
    os.remove(os.path.join(folder, "vae", "diffusion_pytorch_model.safetensors"))
    torch.save({_old_vae_name(k): torch.from_numpy(v) for k, v in vae.items()},
               os.path.join(folder, "vae", "diffusion_pytorch_model.bin"))
    text = load_file(os.path.join(folder, "text_encoder", "model.safetensors"))
    os.remove(os.path.join(folder, "text_encoder", "model.safetensors"))
    text = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in text.items()}
    _save_bin_shards(text, os.path.join(folder, "text_encoder"), "pytorch_model")
    unet = load_file(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"))
    os.remove(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"))
    _save_safetensors_shards(unet, os.path.join(folder, "unet"), "diffusion_pytorch_model")
    index = json.load(open(os.path.join(folder, "model_index.json")))
    index.update(_diffusers_version="0.2.2", requires_safety_checker=True,
                 safety_checker=["stable_diffusion", "StableDiffusionSafetyChecker"],
                 feature_extractor=["transformers", "CLIPFeatureExtractor"], scheduler=["diffusers", "PNDMScheduler"])
    json.dump(index, open(os.path.join(folder, "model_index.json"), "w"))
    json.dump(OLD_SCHEDULER, open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w"))
    assert any(".query." in k for k in torch.load(os.path.join(folder, "vae", "diffusion_pytorch_model.bin")))
    return folder


def _diffusers_pipeline(folder, **kw):
    from diffusers import StableDiffusionPipeline
    return StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, feature_extractor=None, **kw)


def test_legacy_folder_loads_the_tensors_diffusers_loads(legacy_folder, torch_folder, caplog):
    with caplog.at_level(logging.INFO, logger="sdjax"):
        got = load_pretrained(legacy_folder)
    ignored = [r.message for r in caplog.records if "not used by sdjax" in r.message]
    assert len(ignored) == 1 and "safety_checker" in ignored[0] and "CLIPFeatureExtractor" in ignored[0]
    ref = _diffusers_pipeline(legacy_folder)
    for kind in ("unet", "vae", "text_encoder"):
        want, have = torch_state(getattr(ref, kind)), to_state_dict(got.params[kind])
        assert set(have) == set(want), kind
        for name in want:
            np.testing.assert_array_equal(have[name], want[name], err_msg=f"{kind}: {name}")
    # and they are the weights the folder was made from (the renames did happen)
    np.testing.assert_array_equal(have["text_model.final_layer_norm.weight"],
                                  torch_state(torch_folder[0].text_encoder)["text_model.final_layer_norm.weight"])


def _images(sd, sampler, latents, **kw):
    return sd.generate(PROMPT, num_steps=4, guidance_scale=7.5, sampler=sampler, height=SIZE, width=SIZE,
                       latents=latents, output_type="np", progress=False, **kw)


@pytest.mark.parametrize("sampler", ["pndm", "ddim"])
def test_old_scheduler_config_samples_as_diffusers(legacy_folder, sampler):
    """diffusers' pipeline updates steps_offset to 1 on its own (PNDM) scheduler; DDIM.from_config of that
    takes the class defaults of the keys the file leaves out (steps_offset 0, clip_sample and set_alpha_to_one True)."""
    import diffusers
    latents = np.random.default_rng(0).standard_normal((1, SIZE // 2, SIZE // 2, 4)).astype(np.float32)
    pipe = _diffusers_pipeline(legacy_folder)
    if sampler != "pndm":
        cls = getattr(diffusers, samplers.SCHEDULER_CLASSES[sampler])
        pipe.scheduler = cls.from_config(pipe.scheduler.config)
    assert pipe.scheduler.config.steps_offset == (1 if sampler == "pndm" else 0)
    ref = pipe(PROMPT, num_inference_steps=4, guidance_scale=7.5, height=SIZE, width=SIZE, output_type="np",
               latents=torch.from_numpy(latents.transpose(0, 3, 1, 2).copy())).images
    sd = StableDiffusion.load(legacy_folder)
    got = _images(sd, sampler, latents)
    err = np.abs(got - ref).mean()
    # The effect checked: the other steps_offset (pndm: 0, as on a class that is not the file's) moves the
    # images far more than the remaining difference.
    sd.scheduler_config.update(_class_name="DDIMScheduler") if sampler == "pndm" else sd.scheduler_config.update(
        steps_offset=1)
    effect = np.abs(_images(sd, sampler, latents) - ref).mean()
    print(f"{sampler}: mean abs diff {err:.2e}, other steps_offset {effect:.2e}")
    assert err <= 1e-5 and effect > 20 * err, (err, effect)


@pytest.fixture(scope="module")
def variant_folder(torch_folder, tmp_path_factory):
    """fp16 files for every component (the U-Net's values shifted) and a non_ema U-Net, beside the main files."""
    folder = str(tmp_path_factory.mktemp("variants") / "sd")
    shutil.copytree(torch_folder[1], folder)
    for kind, name in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                       ("text_encoder", "model")):
        tensors = load_file(os.path.join(folder, kind, f"{name}.safetensors"))
        shift = 0.25 if kind == "unet" else 0.0
        save_file({k: (v + shift).astype(np.float16) for k, v in tensors.items()},
                  os.path.join(folder, kind, f"{name}.fp16.safetensors"))
        if kind == "unet":
            save_file({k: v - 0.25 for k, v in tensors.items()},
                      os.path.join(folder, kind, f"{name}.non_ema.safetensors"))
    return folder


@pytest.mark.parametrize("variant", ["fp16", "non_ema"])
def test_variant_loads_what_diffusers_loads(variant_folder, variant):
    got = load_pretrained(variant_folder, variant=variant)
    ref = _diffusers_pipeline(variant_folder, variant=variant, torch_dtype=torch.float32)
    main = load_pretrained(variant_folder).params["unet"]
    for kind in ("unet", "vae", "text_encoder"):
        want, have = torch_state(getattr(ref, kind)), to_state_dict(got.params[kind])
        for name in want:
            np.testing.assert_array_equal(have[name], want[name].astype(np.float32), err_msg=f"{kind}: {name}")
    shifted = to_state_dict(main)["conv_in.bias"] - to_state_dict(got.params["unet"])["conv_in.bias"]
    assert np.abs(shifted).min() > 0.2  # the variant's file, not the main one


def test_folder_without_scheduler_config_uses_sd_schedule(torch_folder, tmp_path, caplog):
    folder = str(tmp_path / "sd")
    shutil.copytree(torch_folder[1], folder)
    shutil.rmtree(os.path.join(folder, "scheduler"))
    with caplog.at_level(logging.WARNING, logger="sdjax"):
        got = load_pretrained(folder)
    assert "scaled_linear" in caplog.text and "no scheduler" in caplog.text
    from diffusers import PNDMScheduler
    ref = PNDMScheduler(**{k: v for k, v in SD_SCHEDULER.items() if not k.startswith("_") and k != "clip_sample"})
    settings, _ = samplers.configure("pndm", got.scheduler)
    from sdjax.diffusion import schedules
    np.testing.assert_allclose(schedules.alphas_cumprod(settings), ref.alphas_cumprod.numpy(), rtol=1e-6)
    assert (settings["steps_offset"], settings["timestep_spacing"]) == (1, "leading")


def test_scheduler_keys_are_honoured_or_named(caplog):
    config = dict(SD_SCHEDULER, _class_name="DPMSolverMultistepScheduler", use_karras_sigmas=True,
                  algorithm_type="sde-dpmsolver++", final_sigmas_type="sigma_min")
    with caplog.at_level(logging.WARNING, logger="sdjax"):
        _, options = samplers.configure("dpmpp_2m", config)
        _, given = samplers.configure("dpmpp_2m", config, use_karras_sigmas=False)
        _, euler = samplers.configure("euler", dict(config, interpolation_type="log_linear"))
    assert options == {"use_karras_sigmas": True, "final_sigmas_type": "sigma_min"}
    assert given["use_karras_sigmas"] is False  # an explicit option wins over the config
    assert euler == {"use_karras_sigmas": True, "final_sigmas_type": "sigma_min"}
    warned = [r.message for r in caplog.records]
    assert sum("algorithm_type='sde-dpmsolver++'" in m for m in warned) == 1  # once, not per call
    assert any("interpolation_type='log_linear'" in m and "'euler'" in m for m in warned)
    with pytest.raises(ValueError, match="does not take options"):
        samplers.configure("euler_a", config, use_karras_sigmas=True)


def test_karras_sigmas_from_the_config_sample_as_diffusers(torch_folder, tmp_path):
    """A DPMSolverMultistep config with use_karras_sigmas=True changes the images; sdjax follows it."""
    import diffusers
    folder = str(tmp_path / "sd")
    shutil.copytree(torch_folder[1], folder)
    path = os.path.join(folder, "scheduler", "scheduler_config.json")
    config = dict(json.load(open(path)), _class_name="DPMSolverMultistepScheduler", use_karras_sigmas=True)
    json.dump(config, open(path, "w"))
    index = json.load(open(os.path.join(folder, "model_index.json")))
    json.dump(dict(index, scheduler=["diffusers", "DPMSolverMultistepScheduler"]),
              open(os.path.join(folder, "model_index.json"), "w"))
    latents = np.random.default_rng(1).standard_normal((1, SIZE // 2, SIZE // 2, 4)).astype(np.float32)
    pipe = _diffusers_pipeline(folder)
    assert isinstance(pipe.scheduler, diffusers.DPMSolverMultistepScheduler) and pipe.scheduler.use_karras_sigmas
    ref = pipe(PROMPT, num_inference_steps=4, guidance_scale=7.5, height=SIZE, width=SIZE, output_type="np",
               latents=torch.from_numpy(latents.transpose(0, 3, 1, 2).copy())).images
    sd = StableDiffusion.load(folder)
    err = np.abs(_images(sd, "dpmpp_2m", latents) - ref).mean()
    effect = np.abs(_images(sd, "dpmpp_2m", latents, use_karras_sigmas=False) - ref).mean()
    print(f"karras from config: mean abs diff {err:.2e}, without karras {effect:.2e}")
    assert err <= 1e-5 and effect > 20 * err, (err, effect)


def test_sample_cli_variant(variant_folder, tmp_path):
    """sample.py --variant writes the images of load(path, variant=...), which differ from the main files'."""
    import sys
    from PIL import Image
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import sample
    kw = dict(num_steps=2, guidance_scale=3.0, sampler="ddim", seed=1, height=SIZE, width=SIZE, progress=False)
    sample.main(["--model", variant_folder, "--variant", "non_ema", "--prompt", PROMPT, "--steps", "2",
                 "--guidance", "3", "--sampler", "ddim", "--seed", "1", "--height", str(SIZE), "--width", str(SIZE),
                 "--out", str(tmp_path)])
    got = np.asarray(Image.open(tmp_path / "0000-seed1.png"))
    want = StableDiffusion.load(variant_folder, variant="non_ema").generate(PROMPT, **kw)[0]
    main = StableDiffusion.load(variant_folder).generate(PROMPT, **kw)[0]
    np.testing.assert_array_equal(got, want)
    assert np.abs(got.astype(int) - main).mean() > 1

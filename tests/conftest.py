"""Shared fixtures: a tiny random Stable Diffusion pipeline built with diffusers (PyTorch CPU)."""
import atexit
import os
import shutil
import tempfile

import pytest
import torch

from configs.models import tiny
from sdjax.text.clip_vocab import write_clip_tokenizer

torch.set_num_threads(1)
# the CLIs' persistent compilation cache stays off in tests (test_sample_cli checks it in a folder of its own)
os.environ.setdefault("SDJAX_COMPILATION_CACHE", "off")
# jax's persistent cache, one fresh folder per test run, shared by both xdist workers (they inherit the
# controller's environment) and the subprocesses: a program compiled again (sample.main then the same images
# through the API, the same pipeline in another file) is loaded; compiles under jax's 1 s are not kept
if "PYTEST_XDIST_WORKER" not in os.environ and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="sdjax_test_xla_")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


def pytest_collection_modifyitems(items):
    """Files marked long_file first (stable): the two workers start on them and the short files fill in."""
    items.sort(key=lambda item: item.get_closest_marker("long_file") is None)


def _randomize(model, seed):
    """Random values everywhere (zero-initialised layers would hide naming mistakes); norm scales near 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            is_scale = p.ndim == 1 and name.endswith("weight")
            p.copy_(1 + 0.1 * noise if is_scale else noise * min(0.05, p[0].numel() ** -0.5))
    return model


def build_torch_pipeline(folder, **unet_overrides):
    """A tiny random StableDiffusionPipeline saved as a diffusers folder; returns the pipeline."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    cfg = tiny.get_config().to_dict()
    pipe = StableDiffusionPipeline(
        unet=_randomize(UNet2DConditionModel(**{**cfg["unet"], **unet_overrides}), 0),
        vae=_randomize(AutoencoderKL(**cfg["vae"]), 1),
        text_encoder=_randomize(CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"])), 2),
        tokenizer=CLIPTokenizer.from_pretrained(write_clip_tokenizer(os.path.join(folder, "_tok"))),
        scheduler=DDIMScheduler(**cfg["scheduler"]),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    shutil.rmtree(os.path.join(folder, "_tok"))
    return pipe


@pytest.fixture(scope="session")
def torch_folder(tmp_path_factory):
    """(diffusers StableDiffusionPipeline, the folder it is saved in), tiny and random."""
    folder = str(tmp_path_factory.mktemp("tiny_sd"))
    return build_torch_pipeline(folder), folder


@pytest.fixture(scope="session")
def torch_inpaint_folder(tmp_path_factory):
    """The same, with a 9-channel (inpainting) U-Net."""
    folder = str(tmp_path_factory.mktemp("tiny_sd_inpaint"))
    return build_torch_pipeline(folder, in_channels=9), folder


def torch_state(model):
    """State dict as numpy, CLIP names with their `text_model.` prefix (transformers 5 drops it from
    CLIPTextModel's; SDXL's projection stays `text_projection`)."""
    clip = getattr(getattr(model, "config", None), "model_type", "") == "clip_text_model"
    name = lambda k: k if not clip or k.startswith(("text_model.", "text_projection.")) else f"text_model.{k}"  # noqa: E731
    return {name(k): v.numpy() for k, v in model.state_dict().items() if not k.endswith("position_ids")}



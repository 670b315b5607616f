"""Shared fixtures: a tiny random Stable Diffusion pipeline built with diffusers (PyTorch CPU)."""
import atexit
import os
import shutil
import tempfile

import numpy as np
import pytest
import torch

from configs.models import tiny
from sdjax.text.clip_vocab import write_clip_tokenizer
from torchvision_ops import torchvision_without_ops

torch.set_num_threads(1)
torchvision_without_ops()
# XLA compiles with little LLVM optimisation here and in the subprocesses (which inherit it): the tiny test
# programs compile ~1/3 faster and run little slower (tests/test_ae_step.py: 131 -> 89 s); the numerics are XLA's
# same HLO (the backend level does not change fusion or buffer assignment)
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
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


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    """A CLIP tokenizer of the full vocabulary (transformers')."""
    import transformers
    return transformers.CLIPTokenizer.from_pretrained(write_clip_tokenizer(str(tmp_path_factory.mktemp("tok"))))


def _randomize(model, seed):
    """Random values everywhere (zero-initialised layers would hide naming mistakes); norm scales near 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            is_scale = p.ndim == 1 and name.endswith("weight")
            fan_in = p[0].numel() if p.ndim else 1  # 0-d: CLIPModel's logit_scale
            p.copy_(1 + 0.1 * noise if is_scale else noise * min(0.05, fan_in ** -0.5))
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


# ---- SDXL (tests/test_sdxl_weights.py, tests/test_pipeline_xl.py) ----

SDXL_TIME_DIM, SDXL_PROJECTION = 8, 16
SDXL_TOWER = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


def _sdxl_unet(cross_attention_dim, time_ids, projection, file_sized):
    import diffusers
    # file_sized: what an original single file can say (64-channel heads, 32 norm groups)
    sizes = (dict(block_out_channels=(64, 128), attention_head_dim=(1, 2), norm_num_groups=32) if file_sized else
             dict(block_out_channels=(16, 32), attention_head_dim=(2, 4), norm_num_groups=8))
    return diffusers.UNet2DConditionModel(
        sample_size=8, layers_per_block=1, use_linear_projection=True, transformer_layers_per_block=(1, 2),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim, addition_embed_type="text_time", addition_time_embed_dim=SDXL_TIME_DIM,
        projection_class_embeddings_input_dim=projection + time_ids * SDXL_TIME_DIM, **sizes)


def _age_sdxl(folder):
    """The towers as the hub's SDXL 1.0 holds them: transformers < 5 names (`text_model.` prefix; transformers 5
    drops it from CLIPTextModel), and an fp16 variant of text_encoder_2."""
    for tower in ("text_encoder", "text_encoder_2"):
        path = os.path.join(folder, tower, "model.safetensors")
        if not os.path.isfile(path):
            continue
        from safetensors.numpy import load_file, save_file
        tensors = load_file(path)
        old = {k if k.startswith(("text_model.", "text_projection.")) else f"text_model.{k}": v
               for k, v in tensors.items()}
        save_file(old, path)
        if tower == "text_encoder_2":
            save_file({k: v.astype(np.float16) for k, v in old.items()}, path.replace(".safetensors", ".fp16.safetensors"))


def build_sdxl(folder, refiner, file_sized=False):
    """A tiny random SDXL base (or refiner) pipeline saved in `folder`, aged (`_age_sdxl`). file_sized: with the
    sizes an original single file implies (64-channel heads, 32 norm groups, the second tower's projection as
    wide as the tower, as bigG's, and 10 layers, by which diffusers tells an SDXL file; towers of two widths)."""
    import diffusers
    from diffusers import AutoencoderKL, EulerDiscreteScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
    cfg = tiny.get_config().to_dict()
    tower, tower_2, projection = SDXL_TOWER, dict(SDXL_TOWER), SDXL_PROJECTION
    if file_sized:  # and the towers of other widths, by which diffusers tells them apart
        tower = dict(SDXL_TOWER, hidden_size=64, num_attention_heads=1)
        tower_2, projection = dict(SDXL_TOWER, hidden_size=128, num_attention_heads=2, num_hidden_layers=10), 128
        cfg["vae"]["norm_num_groups"] = 32
    tok = lambda name, pad: CLIPTokenizer.from_pretrained(write_clip_tokenizer(os.path.join(folder, name), pad))  # noqa: E731
    width, width_2 = tower["hidden_size"], tower_2["hidden_size"]
    parts = dict(
        vae=_randomize(AutoencoderKL(**{**cfg["vae"], "scaling_factor": 0.13025}), 1),
        text_encoder_2=_randomize(CLIPTextModelWithProjection(CLIPTextConfig(
            **tower_2, hidden_act="gelu", projection_dim=projection)), 3),
        tokenizer_2=tok("_tok2", "!"),
        unet=_randomize(_sdxl_unet(width_2 if refiner else width + width_2, 5 if refiner else 6, projection,
                                   file_sized), 0),
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                         steps_offset=1, timestep_spacing="leading"))
    if refiner:
        pipe = diffusers.StableDiffusionXLImg2ImgPipeline(
            text_encoder=None, tokenizer=None, requires_aesthetics_score=True, force_zeros_for_empty_prompt=False,
            **parts)
    else:
        pipe = diffusers.StableDiffusionXLPipeline(
            text_encoder=_randomize(CLIPTextModel(CLIPTextConfig(**tower)), 2), tokenizer=tok("_tok", "<|endoftext|>"),
            **parts)
    pipe.save_pretrained(folder)
    _age_sdxl(folder)


@pytest.fixture(scope="session")
def sdxl_folders(tmp_path_factory):
    """{"base": folder, "refiner": folder}: tiny random SDXL pipelines saved by diffusers and aged as the hub's
    are (the refiner: text_encoder_2 only, aesthetic score, force_zeros_for_empty_prompt false)."""
    folders = {kind: str(tmp_path_factory.mktemp(f"tiny_sdxl_{kind}")) for kind in ("base", "refiner")}
    for kind, folder in folders.items():
        build_sdxl(folder, kind == "refiner")
    return folders


@pytest.fixture
def refused_files(tmp_path):
    """check(load, {name: (tensors, message)}): each tensor dict saved as a .safetensors file, load(path) refuses
    it with one line that starts with the path and holds the message."""
    from safetensors.numpy import save_file

    def check(load, cases):
        for name, (tensors, message) in cases.items():
            path = str(tmp_path / f"{name}.safetensors")
            save_file(tensors, path)
            with pytest.raises(ValueError) as e:
                load(path)
            text = str(e.value)
            assert text.startswith(f"{path}: ") and message in text and "\n" not in text, text
    return check

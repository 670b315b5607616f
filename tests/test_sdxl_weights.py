"""SDXL diffusers folders (base and refiner), tiny and random, saved by diffusers and aged as the hub's are:
load_pretrained reads the tensors diffusers reads from the same folder, the loaded towers and U-Net compute what
the diffusers pipeline loaded from it computes, and the export loads back in diffusers."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from conftest import _randomize, torch_state  # noqa: E402
from configs.models import tiny  # noqa: E402
from sdjax.errors import UnsupportedConfig  # noqa: E402
from sdjax.text.clip_vocab import write_clip_tokenizer  # noqa: E402
from sdjax.text.tokenizer import tokenize  # noqa: E402
from sdjax.weights.convert import to_state_dict  # noqa: E402
from sdjax.weights.pretrained import load_pretrained, save_pretrained  # noqa: E402

torch.set_num_threads(1)
TIME_DIM, PROJECTION = 8, 16
TOWER = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


def _unet(cross_attention_dim, time_ids):
    return diffusers.UNet2DConditionModel(
        sample_size=8, block_out_channels=(16, 32), layers_per_block=1, attention_head_dim=(2, 4),
        norm_num_groups=8, use_linear_projection=True, transformer_layers_per_block=(1, 2),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim, addition_embed_type="text_time", addition_time_embed_dim=TIME_DIM,
        projection_class_embeddings_input_dim=PROJECTION + time_ids * TIME_DIM)


def _age(folder):
    """The towers as the hub's SDXL 1.0 holds them: transformers < 5 names (`text_model.` prefix; transformers 5
    drops it from CLIPTextModel), and an fp16 variant of text_encoder_2."""
    for tower in ("text_encoder", "text_encoder_2"):
        path = os.path.join(folder, tower, "model.safetensors")
        if not os.path.isfile(path):
            continue
        tensors = load_file(path)
        old = {k if k.startswith(("text_model.", "text_projection.")) else f"text_model.{k}": v
               for k, v in tensors.items()}
        save_file(old, path)
        if tower == "text_encoder_2":
            save_file({k: v.astype(np.float16) for k, v in old.items()}, path.replace(".safetensors", ".fp16.safetensors"))


def _build(folder, refiner):
    from diffusers import AutoencoderKL, EulerDiscreteScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
    cfg = tiny.get_config().to_dict()
    tok = lambda name, pad: CLIPTokenizer.from_pretrained(write_clip_tokenizer(os.path.join(folder, name), pad))  # noqa: E731
    parts = dict(
        vae=_randomize(AutoencoderKL(**{**cfg["vae"], "scaling_factor": 0.13025}), 1),
        text_encoder_2=_randomize(CLIPTextModelWithProjection(CLIPTextConfig(
            **TOWER, hidden_act="gelu", projection_dim=PROJECTION)), 3),
        tokenizer_2=tok("_tok2", "!"),
        unet=_randomize(_unet(32 if refiner else 64, 5 if refiner else 6), 0),
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                         steps_offset=1, timestep_spacing="leading"))
    if refiner:
        pipe = diffusers.StableDiffusionXLImg2ImgPipeline(
            text_encoder=None, tokenizer=None, requires_aesthetics_score=True, force_zeros_for_empty_prompt=False,
            **parts)
    else:
        pipe = diffusers.StableDiffusionXLPipeline(
            text_encoder=_randomize(CLIPTextModel(CLIPTextConfig(**TOWER)), 2), tokenizer=tok("_tok", "<|endoftext|>"),
            **parts)
    pipe.save_pretrained(folder)
    _age(folder)
    return type(pipe)


@pytest.fixture(scope="module", params=["base", "refiner"])
def sdxl(request, tmp_path_factory):
    """(kind, folder, the diffusers pipeline class, that pipeline loaded from the folder, load_pretrained of it)."""
    folder = str(tmp_path_factory.mktemp(f"tiny_sdxl_{request.param}"))
    cls = _build(folder, request.param == "refiner")
    return request.param, folder, cls, cls.from_pretrained(folder), load_pretrained(folder)


def _towers(pipe):
    return {k: getattr(pipe, k) for k in ("text_encoder", "text_encoder_2") if getattr(pipe, k) is not None}


def test_folder_loads_the_tensors_diffusers_loads(sdxl):
    kind, folder, _, ref, pre = sdxl
    assert sorted(pre.modules) == sorted(["unet", "vae", *_towers(ref)])
    for name, module in {"unet": ref.unet, "vae": ref.vae, **_towers(ref)}.items():
        want, got = torch_state(module), to_state_dict(pre.params[name])
        assert sorted(got) == sorted(want), name
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=f"{name}: {k}")
    assert pre.tokenizer_2.pad_token == "!"
    assert (pre.tokenizer is None) == (kind == "refiner")
    assert pre.options == ({"force_zeros_for_empty_prompt": False, "requires_aesthetics_score": True}
                           if kind == "refiner" else {"force_zeros_for_empty_prompt": True})
    assert pre.modules["vae"].scaling_factor == 0.13025
    # the fp16 variant: the same tensors, rounded
    half = load_pretrained(folder, variant="fp16")
    for a, b in zip(jax.tree.leaves(half.params["text_encoder_2"]), jax.tree.leaves(pre.params["text_encoder_2"])):
        np.testing.assert_array_equal(a, b.astype(np.float16).astype(np.float32))


def test_loaded_model_computes_what_the_diffusers_pipeline_computes(sdxl):
    """Prompt embeddings (penultimate states of each tower, concatenated), the pooled projection of the second,
    and the U-Net on them with the micro-conditioning: against the pipeline's own encode_prompt and U-Net."""
    kind, _, _, ref, pre = sdxl
    prompts = ["a red circle", "two blue squares on the left of a small green triangle"]
    with torch.no_grad():
        embeds, _, pooled, _ = ref.encode_prompt(prompts, do_classifier_free_guidance=False)
    states = []
    for tower, tokenizer in (("text_encoder", pre.tokenizer), ("text_encoder_2", pre.tokenizer_2)):
        if tower in pre.modules:
            ids = jnp.asarray(tokenize(tokenizer, prompts)[0])
            out = pre.modules[tower].apply({"params": pre.params[tower]}, ids)
            states.append(out["hidden_states"][-2])
    context = jnp.concatenate(states, -1)
    np.testing.assert_allclose(context, embeds.numpy(), atol=1e-4)
    np.testing.assert_allclose(out["text_embeds"], pooled.numpy(), atol=1e-4)
    time_ids = np.array([[6.0, 8.0, 0.0, 0.0, 2.5], [512.0, 384.0, 16.0, 0.0, 6.0]] if kind == "refiner" else
                        [[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0], [512.0, 384.0, 16.0, 0.0, 896.0, 1152.0]],
                        np.float32)
    latents = np.random.default_rng(0).standard_normal((2, 8, 8, 4), dtype=np.float32)
    t = np.array([999.0, 301.0], np.float32)
    with torch.no_grad():
        want = ref.unet(torch.from_numpy(latents.transpose(0, 3, 1, 2)), torch.from_numpy(t), embeds,
                        added_cond_kwargs=dict(text_embeds=pooled, time_ids=torch.from_numpy(time_ids))).sample
    got = jax.jit(pre.modules["unet"].apply)({"params": pre.params["unet"]}, jnp.asarray(latents), jnp.asarray(t), context,
                                    out["text_embeds"], jnp.asarray(time_ids))
    d = float(np.abs(np.asarray(got) - want.numpy().transpose(0, 2, 3, 1)).max())
    assert d <= 1e-4, d


def test_export_loads_in_diffusers(sdxl, tmp_path):
    kind, _, cls, ref, pre = sdxl
    save_pretrained(pre, str(tmp_path / "out"))
    back = cls.from_pretrained(str(tmp_path / "out"))
    for name, module in {"unet": back.unet, "vae": back.vae, **_towers(back)}.items():
        want = torch_state(getattr(ref, name))
        for k, v in torch_state(module).items():
            np.testing.assert_array_equal(v, want[k], err_msg=f"{name}: {k}")
    assert (back.text_encoder is None) == (kind == "refiner")
    assert dict(back.config).get("requires_aesthetics_score", False) == (kind == "refiner")
    assert back.tokenizer_2.pad_token == "!"
    again = load_pretrained(str(tmp_path / "out"))
    assert again.options == pre.options and sorted(again.modules) == sorted(pre.modules)


def test_sampling_says_it_does_not_do_sdxl_yet(sdxl):
    from sdjax.pipeline import StableDiffusion
    with pytest.raises(UnsupportedConfig, match="SDXL"):
        StableDiffusion(sdxl[-1])

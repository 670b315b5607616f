"""SDXL diffusers folders (base and refiner), tiny and random, saved by diffusers and aged as the hub's are:
load_pretrained reads the tensors diffusers reads from the same folder, the loaded towers and U-Net compute what
the diffusers pipeline loaded from it computes, and the export loads back in diffusers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from conftest import torch_state  # noqa: E402
from sdjax.text.tokenizer import tokenize  # noqa: E402
from sdjax.weights.convert import to_state_dict  # noqa: E402
from sdjax.weights.pretrained import load_pretrained, save_pretrained  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module", params=["base", "refiner"])
def sdxl(request, sdxl_folders):
    """(kind, folder, the diffusers pipeline class, that pipeline loaded from the folder, load_pretrained of it)."""
    folder = sdxl_folders[request.param]
    cls = diffusers.StableDiffusionXLImg2ImgPipeline if request.param == "refiner" else diffusers.StableDiffusionXLPipeline
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


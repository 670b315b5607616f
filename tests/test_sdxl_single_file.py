"""SDXL single files (sd_xl_base_1.0.safetensors / the refiner's layout): the export of a tiny SDXL folder is read
by diffusers' from_single_file as that folder, and load_pretrained of the file computes what the folder does."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

diffusers = pytest.importorskip("diffusers")

from conftest import build_sdxl, torch_state  # noqa: E402
from sdjax.text.tokenizer import tokenize  # noqa: E402
from sdjax.weights.convert import to_state_dict  # noqa: E402
from sdjax.weights.ldm_names import SDXL_PREFIX  # noqa: E402
from sdjax.weights.pretrained import load_pretrained  # noqa: E402
from sdjax.weights.single_file import to_original  # noqa: E402

torch.set_num_threads(1)
CLASSES = {"base": "StableDiffusionXLPipeline", "refiner": "StableDiffusionXLImg2ImgPipeline"}


@pytest.fixture(scope="module", params=["base", "refiner"])
def sdxl_file(request, tmp_path_factory):
    """(kind, folder, the single file written from it as Stability's are: float16, with buffers besides)."""
    folder = str(tmp_path_factory.mktemp(f"sdxl_file_{request.param}"))
    build_sdxl(folder, request.param == "refiner", file_sized=True)
    pre = load_pretrained(folder)
    original = to_original({k: to_state_dict(p) for k, p in pre.params.items()})
    open_clip = f"{SDXL_PREFIX}{0 if request.param == 'refiner' else 1}.model."
    extras = {"denoiser.sigmas": np.linspace(0.03, 14.6, 1000, dtype=np.float32),
              open_clip + "logit_scale": np.array(4.6, np.float32)}
    if request.param == "base":
        extras[f"{SDXL_PREFIX}0.transformer.text_model.embeddings.position_ids"] = np.arange(77)[None]
    path = str(tmp_path_factory.mktemp("file") / f"sd_xl_{request.param}.safetensors")
    save_file({**{k: v.astype(np.float16) for k, v in original.items()}, **extras}, path)
    return request.param, folder, path


def test_file_layout_is_stabilitys(sdxl_file):
    kind, _, path = sdxl_file
    from safetensors import safe_open
    with safe_open(path, "np") as f:
        keys = set(f.keys())
    assert "model.diffusion_model.label_emb.0.0.weight" in keys and "model.diffusion_model.label_emb.0.2.bias" in keys
    tower_2 = f"{SDXL_PREFIX}{0 if kind == 'refiner' else 1}.model."
    assert {tower_2 + "text_projection", tower_2 + "transformer.resblocks.9.attn.in_proj_weight"} <= keys
    assert (f"{SDXL_PREFIX}0.transformer.text_model.final_layer_norm.weight" in keys) == (kind == "base")


def test_diffusers_reads_the_export_as_the_folder(sdxl_file):
    kind, folder, path = sdxl_file
    cls = getattr(diffusers, CLASSES[kind])
    want, got = cls.from_pretrained(folder), cls.from_single_file(path, config=folder, torch_dtype=torch.float32)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if getattr(want, name) is None:
            assert getattr(got, name) is None
            continue
        a, b = torch_state(getattr(want, name)), torch_state(getattr(got, name))
        assert sorted(a) == sorted(b), name
        for k in a:  # the file is float16
            np.testing.assert_array_equal(b[k], a[k].astype(np.float16).astype(np.float32), err_msg=f"{name}: {k}")


def test_load_pretrained_of_the_file_computes_what_the_folder_does(sdxl_file):
    kind, folder, path = sdxl_file
    ref, pre = load_pretrained(folder), load_pretrained(path)
    assert sorted(pre.modules) == sorted(ref.modules) and pre.options == ref.options
    assert pre.tokenizer_2.pad_token == "!" and (pre.tokenizer is None) == (kind == "refiner")
    assert pre.scheduler["_class_name"] == "EulerDiscreteScheduler" and pre.modules["vae"].force_upcast
    rounded = jax.tree.map(lambda x: np.asarray(x, np.float16).astype(np.float32), ref.params)
    for name in ref.params:
        for a, b in zip(jax.tree.leaves(pre.params[name]), jax.tree.leaves(rounded[name])):
            np.testing.assert_array_equal(a, b)
    # the inferred architectures compute what the folder's configs do, on the same (rounded) weights
    prompts = ["a red circle", "two blue squares"]
    outs = []
    for p in (ref, pre):
        towers = [k for k in ("text_encoder", "text_encoder_2") if k in p.modules]
        text = [p.modules[k].apply({"params": rounded[k]}, jnp.asarray(tokenize(t, prompts)[0]))
                for k, t in zip(towers, [tok for tok in (p.tokenizer, p.tokenizer_2) if tok is not None])]
        context = jnp.concatenate([o["hidden_states"][-2] for o in text], -1)
        ids = np.array([[16, 16, 0, 0] + ([16, 16] if kind == "base" else [6.0])] * 2, np.float32)
        x = np.random.default_rng(0).standard_normal((2, 8, 8, 4), dtype=np.float32)
        unet = p.modules["unet"].apply({"params": rounded["unet"]}, x, jnp.asarray([900.0, 100.0]), context,
                                       text[-1]["text_embeds"], ids)
        outs.append((context, text[-1]["text_embeds"], unet))
    for a, b in zip(*outs):
        np.testing.assert_allclose(a, b, atol=1e-6)

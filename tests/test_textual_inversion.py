"""sd.load_textual_inversion against diffusers' load_textual_inversion on the same tiny saved pipelines and files."""
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from sdjax.pipeline import StableDiffusion
from sdjax.text.prompt_weighting import weight_states

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
TOL = 1e-4  # mean abs difference of float images in [0, 1]; the embedding moves them by more than 100x that
STEPS, SIZE, PROMPT, GUIDANCE = 3, 16, "a my-style circle", 20.0  # strong guidance: the text shows


@pytest.fixture(scope="module")
def vectors():
    """Two random vectors for the tiny SD's 64-wide tokens (its own are ~0.05: these stand out)."""
    return np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32) * 3


@pytest.fixture(scope="module")
def a1111_pt(vectors, tmp_path_factory):
    """An AUTOMATIC1111 .pt embedding of two vectors; its token is its stem, "my-style"."""
    path = tmp_path_factory.mktemp("ti") / "my-style.pt"
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.from_numpy(vectors)},
                "name": "my-style", "step": 500}, path)
    return str(path)


@pytest.fixture(scope="module")
def sd(torch_folder):
    return StableDiffusion.load(torch_folder[1])


@pytest.fixture(scope="module")
def reference(torch_folder, a1111_pt):
    """diffusers' pipeline of the folder with the embedding loaded as "my-style"."""
    import diffusers
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(torch_folder[1])
    pipe.set_progress_bar_config(disable=True)
    pipe.load_textual_inversion(a1111_pt, token="my-style")
    return pipe


def test_embedding_matches_diffusers_without_recompiling_the_loop(sd, reference, a1111_pt):
    noise = np.random.default_rng(1).standard_normal((1, SIZE // 2, SIZE // 2, 4), np.float32)
    run = lambda: sd.generate(PROMPT, num_steps=STEPS, sampler="ddim", height=SIZE, width=SIZE,  # noqa: E731
                              guidance_scale=GUIDANCE, noise={"initial": noise}, output_type="np", progress=False)
    before = run()  # "my-style" as plain words
    compiled = sd.compile_count
    assert sd.load_textual_inversion(a1111_pt) == "my-style"
    out = run()
    assert sd.compile_count == compiled + 1 and set(sd.last_timings) & {"compile_sample"} == set()  # the text tower
    ref = reference(PROMPT, num_inference_steps=STEPS, height=SIZE, width=SIZE, guidance_scale=GUIDANCE,
                    output_type="np", latents=torch.from_numpy(noise.transpose(0, 3, 1, 2).copy())).images
    err, effect = np.abs(out - ref).mean(), np.abs(out - before).mean()
    print(f"textual inversion: mean abs diff {err:.2e}, effect {effect:.2e}")
    assert err <= TOL and effect > 100 * TOL, (err, effect)


def test_weighted_prompt_and_other_formats(sd, reference, vectors, a1111_pt, tmp_path):
    """(my-style:1.3) weights both of its vectors' states (the closed form on diffusers' states of the expanded
    prompt); the same vectors as A1111 .safetensors and diffusers' learned_embeds give the same states."""
    if "my-style" not in sd.conditioning.towers[0][2].get_vocab():
        sd.load_textual_inversion(a1111_pt)
    tok = reference.tokenizer
    ids = tok(reference.maybe_convert_prompt(PROMPT, tok), padding="max_length", max_length=77,
              return_tensors="pt").input_ids
    with torch.no_grad():
        states = reference.text_encoder(ids)[0].numpy()
    weights = np.where(np.isin(ids.numpy(), tok.convert_tokens_to_ids(["my-style", "my-style_1"])), 1.3, 1.0)
    ours = sd.encode_prompts(["a (my-style:1.3) circle"])
    np.testing.assert_allclose(ours, weight_states(states, weights.astype(np.float32)), atol=1e-5)
    assert np.abs(ours - sd.encode_prompts([PROMPT])).max() > 1e-2  # the weight shows
    save_file({"emb_params": vectors}, str(tmp_path / "style-b.safetensors"))
    save_file({"<style-c>": vectors}, str(tmp_path / "learned_embeds.safetensors"))
    assert sd.load_textual_inversion(str(tmp_path / "style-b.safetensors")) == "style-b"
    assert sd.load_textual_inversion(str(tmp_path / "learned_embeds.safetensors"), token="style-c") == "style-c"
    for token in ("style-b", "style-c"):
        np.testing.assert_array_equal(sd.encode_prompts([PROMPT.replace("my-style", token)]),
                                      sd.encode_prompts([PROMPT]))


def test_sdxl_embedding_on_both_towers_matches_diffusers(sdxl_folders, tmp_path):
    import diffusers
    folder, prompt = sdxl_folders["base"], "a xl-style circle"
    rng = np.random.default_rng(2)
    tensors = {k: rng.standard_normal((3, 32)).astype(np.float32) for k in ("clip_l", "clip_g")}
    path = str(tmp_path / "xl-style.safetensors")
    save_file(tensors, path)
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(folder)
    for name, tower, tokenizer in (("clip_g", pipe.text_encoder_2, pipe.tokenizer_2),
                                   ("clip_l", pipe.text_encoder, pipe.tokenizer)):
        pipe.load_textual_inversion(torch.from_numpy(tensors[name]), token="xl-style", text_encoder=tower,
                                    tokenizer=tokenizer)
    with torch.no_grad():
        text, _, pooled, _ = pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
    sd = StableDiffusion.load(folder)
    before = sd.encode_prompts([prompt])
    sd.load_textual_inversion(path)
    ours = sd.encode_prompts([prompt])
    for a, b, c in zip(ours, (text.numpy(), pooled.numpy()), before):
        np.testing.assert_allclose(a, b, atol=1e-5)
        assert np.abs(a - c).max() > 1e-2


def test_what_is_not_an_embedding_for_this_model_is_refused(sd, tmp_path, refused_files):
    cases = {
        "lora": ({"lora_unet_conv_in.lora_down.weight": np.zeros((2, 4), np.float32), "x": np.zeros(1, np.float32)},
                 "not a textual-inversion embedding (tensors: lora_unet_conv_in.lora_down.weight, x); sdjax loads "
                 "A1111 embeddings"),
        "xl": ({"clip_l": np.zeros((1, 64), np.float32), "clip_g": np.zeros((1, 64), np.float32)},
               "an embedding for ['text_encoder', 'text_encoder_2']; this model's text towers are ['text_encoder']"),
        "narrow": ({"emb_params": np.zeros((1, 48), np.float32)},
                   "vectors of width 48 for text_encoder, whose tokens are 64 wide"),
        "a": ({"emb_params": np.zeros((1, 64), np.float32)}, "the token 'a' is in text_encoder's vocabulary already"),
    }
    refused_files(sd.load_textual_inversion, cases)
    with pytest.raises(ValueError, match="embedding file not found: nope.pt"):
        sd.load_textual_inversion("nope.pt")

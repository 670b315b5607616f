"""Textual inversion training (config.textual_inversion) through train.py on the tiny saved pipeline: only the
placeholder's rows train, and the embedding it exports (A1111's and diffusers' formats) gives in diffusers'
load_textual_inversion the images sdjax gives."""
import os
import sys

import jax
import ml_collections
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import load_file

from sdjax.pipeline import StableDiffusion
from sdjax.text.tokenizer import tokenize
from sdjax.train.checkpoint import Checkpointer
from sdjax.train.export import export_embedding
from sdjax.train.ldm import textual_inversion
from sdjax.weights.pretrained import load_pretrained

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
TOL = 1e-4  # mean abs difference of float images in [0, 1]; the training moves them by more than 100x that
STEPS, SIZE, GUIDANCE = 3, 16, 20.0  # strong guidance: the text shows
PLACEHOLDER, PROMPT, INITIAL = "<cat-toy>", "a <cat-toy> circle", "a toy toy circle"  # two vectors, from "toy"
TABLE = ("text_model", "embeddings", "token_embedding", "embedding")


def _table(params):
    for key in TABLE:
        params = params[key]
    return np.asarray(params)


@pytest.fixture(scope="module")
def run(torch_folder, tmp_path_factory):
    """train.py: 3 steps (a large learning rate: the vectors move) on 4 images captioned with the placeholder, a
    sample of the prompt at the last, --export_embedding (A1111's format) and --export_dir; then the diffusers
    format of the same run."""
    from absl import flags
    tmp = tmp_path_factory.mktemp("ti_train")
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), np.uint8)).save(tmp / f"img{i}.png")
        (tmp / f"img{i}.txt").write_text(f"a photo of {PLACEHOLDER}, number {i}")
    paths = {"workdir": str(tmp / "run"), "a1111": str(tmp / "cat-toy.safetensors"),
             "diffusers": str(tmp / "learned_embeds.safetensors"), "folder": str(tmp / "exported")}
    argv = ["train.py", f"--config={ROOT}/configs/train/tiny.py", f"--workdir={paths['workdir']}",
            f"--export_embedding={paths['a1111']}", f"--export_dir={paths['folder']}"]
    config = {"pretrained": torch_folder[1], "data.source": "folder", "data.path": str(tmp),
              "data.data_dir": str(tmp / "tfds"), "data.image_size": SIZE, "batch_size": 2, "total_steps": 3,
              "mesh.data": 1, "ema_decay": 0.0, "loss.caption_dropout": 0.0, "optimizer.learning_rate": 0.1,
              "optimizer.warmup_steps": 0, "optimizer.schedule": "constant", "textual_inversion.placeholder":
              PLACEHOLDER, "textual_inversion.initializer": "toy", "textual_inversion.vectors": 2,
              "sample.every": 3, "sample.prompts": (PROMPT,), "sample.num_steps": STEPS,
              "sample.guidance_scale": GUIDANCE}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", argv)
        try:
            flags.FLAGS(argv)
            for key, value in config.items():
                *parents, leaf = key.split(".")
                node = flags.FLAGS.config
                for name in parents:
                    node = node[name]
                node[leaf] = value
            train.main(["train.py"])
        finally:
            flags.FLAGS.unparse_flags()  # the next test's train.py starts from the defaults
    for _ in range(2):  # the second replaces the first, an earlier export
        assert export_embedding(paths["workdir"], paths["diffusers"], "diffusers") == [paths["diffusers"]]
    return paths


def test_only_the_placeholder_rows_train(run, torch_folder):
    """The state holds the rows only (params, EMA, optimizer); the exported folder has every weight of the base bit
    for bit, and the token table the two rows more, which moved away from the initializer's embedding."""
    ckpt = Checkpointer(run["workdir"], read_only=True)
    try:
        items = {name: ckpt.restore_item(name) for name in ("params", "ema_params", "opt_state")}
    finally:
        ckpt.close()
    for name in ("params", "ema_params"):
        assert jax.tree.map(np.shape, items[name]) == {"textual_inversion": {"text_encoder": (2, 64)}}
    assert {np.shape(x) for x in jax.tree.leaves(items["opt_state"])} == {(), (2, 64)}  # Adam's moments, counts
    base, exported = load_pretrained(torch_folder[1]), load_pretrained(run["folder"])
    vectors = load_file(run["a1111"])["emb_params"]
    np.testing.assert_array_equal(vectors, items["ema_params"]["textual_inversion"]["text_encoder"])
    table, trained = _table(base.params["text_encoder"]), _table(exported.params["text_encoder"])
    assert trained.shape == (49410, 64)
    np.testing.assert_array_equal(trained[:49408], table)
    np.testing.assert_array_equal(trained[49408:], vectors)
    toy = table[base.tokenizer.convert_tokens_to_ids("toy</w>")]
    assert np.abs(vectors - toy).max(axis=1).min() > 0.1, "both vectors moved"  # by ~lr a coordinate: in captions
    exported.params["text_encoder"] = base.params["text_encoder"]
    for a, b in zip(jax.tree.leaves(base.params), jax.tree.leaves(exported.params)):
        np.testing.assert_array_equal(a, b)
    assert exported.tokenizer.get_added_vocab()[PLACEHOLDER + "_1"] == 49409


def test_captions_write_the_placeholder_tokens(tokenizer):
    """Captions tokenize to the new ids, a multi-vector placeholder to all of its tokens; the template replaces
    the captions."""
    config = ml_collections.ConfigDict({"textual_inversion": textual_inversion.default_config()})
    config.textual_inversion.update(placeholder="<x>", initializer="toy", vectors=2)
    tokenizer = type(tokenizer).from_pretrained(tokenizer.name_or_path)  # a copy: the tokens are added to it
    tokenizer.add_tokens(["<x>", "<x>_1"])
    captions = textual_inversion.caption_tokenizers(config, {"input_ids": tokenizer})["input_ids"]
    ids = tokenize(captions, ["a photo of <x>", "<x> on a beach"])[0]
    assert list(ids[0, :7]) == [49406, 320, 1125, 539, 49408, 49409, 49407]
    assert list(ids[1, 1:3]) == [49408, 49409]
    config.textual_inversion.template = "a painting of {}"
    captions = textual_inversion.caption_tokenizers(config, {"input_ids": tokenizer})["input_ids"]
    np.testing.assert_array_equal(tokenize(captions, ["a dog"])[0], tokenize(tokenizer, ["a painting of <x> <x>_1"])[0])


def test_exported_embedding_gives_sdjax_images_in_diffusers(run, torch_folder):
    """diffusers (the base folder + load_textual_inversion of the diffusers file) and sdjax (of the A1111 file) make
    the same images of a prompt with the placeholder; sdjax gives the same text states from the diffusers file and
    from the exported folder (whose tokenizer holds the tokens)."""
    import diffusers
    files = {fmt: load_file(run[fmt]) for fmt in ("a1111", "diffusers")}
    assert list(files["diffusers"]) == [PLACEHOLDER]
    np.testing.assert_array_equal(files["diffusers"][PLACEHOLDER], files["a1111"]["emb_params"])
    noise = np.random.default_rng(1).standard_normal((1, SIZE // 2, SIZE // 2, 4), np.float32)
    sd = StableDiffusion.load(torch_folder[1])
    assert sd.load_textual_inversion(run["a1111"], token=PLACEHOLDER) == PLACEHOLDER
    generate = lambda prompt: sd.generate(  # noqa: E731
        prompt, num_steps=STEPS, sampler="ddim", height=SIZE, width=SIZE, guidance_scale=GUIDANCE,
        noise={"initial": noise}, output_type="np", progress=False)
    ours, initial = generate(PROMPT), generate(INITIAL)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(torch_folder[1])
    pipe.set_progress_bar_config(disable=True)
    pipe.load_textual_inversion(run["diffusers"])
    ref = pipe(PROMPT, num_inference_steps=STEPS, height=SIZE, width=SIZE, guidance_scale=GUIDANCE, output_type="np",
               latents=torch.from_numpy(noise.transpose(0, 3, 1, 2).copy())).images
    err, effect = np.abs(ours - ref).mean(), np.abs(ours - initial).mean()
    print(f"textual inversion training: mean abs diff {err:.2e}, effect {effect:.2e}")
    assert err <= TOL and effect > 100 * TOL, (err, effect)
    sampled = np.asarray(Image.open(os.path.join(run["workdir"], "samples", "step_0000003.png")))  # in training
    np.testing.assert_array_equal(sd.generate(PROMPT, num_steps=STEPS, guidance_scale=GUIDANCE, seed=0,
                                              progress=False)[0], sampled)
    states = sd.encode_prompts([PROMPT])
    assert sd.load_textual_inversion(run["diffusers"]) == "learned_embeds"
    np.testing.assert_array_equal(sd.encode_prompts([PROMPT.replace(PLACEHOLDER, "learned_embeds")]), states)
    np.testing.assert_allclose(StableDiffusion.load(run["folder"]).encode_prompts([PROMPT]), states, atol=1e-6)


def test_sdxl_placeholder_on_both_towers(sdxl_folders, tmp_path):
    """SDXL: the placeholder's rows start from "toy" in each tower; the towers' tables with the rows (what the step
    and sampling see) are those of sdjax loading the A1111 export (clip_l + clip_g), whose text is that of diffusers
    loading the diffusers export (a file per tower, as its SDXL example writes them)."""
    import diffusers
    import optax
    from configs.train import tiny as train_tiny
    from sdjax.train import run_config
    from sdjax.train.ldm import ldm_stage
    from sdjax.train.state import create_state
    config = train_tiny.get_config("sdxl")
    config.pretrained, prompt = sdxl_folders["base"], "a <xl> circle"
    config.textual_inversion.update(placeholder="<xl>", initializer="toy", vectors=2)
    pre, sd = ldm_stage.load(config), StableDiffusion.load(sdxl_folders["base"])
    for tower in ("text_encoder", "text_encoder_2"):
        toy = _table(sd.params[tower])[sd.tokenizer.convert_tokens_to_ids("toy</w>")]
        np.testing.assert_array_equal(pre.params["textual_inversion"][tower], [toy, toy])
        assert pre.modules[tower].vocab_size == 49410
    rng = np.random.default_rng(3)
    rows = {"textual_inversion": {t: rng.standard_normal((2, 32)).astype(np.float32) for t in ("text_encoder",
                                                                                                 "text_encoder_2")}}
    workdir = str(tmp_path / "run")
    run_config.save_config(config, workdir)
    ckpt = Checkpointer(workdir)
    ckpt.save(create_state(rows, optax.adam(1e-3), 0), {"process_count": 1, "states": [{}]})
    ckpt.close()
    a1111, learned = str(tmp_path / "xl.safetensors"), str(tmp_path / "learned_embeds.safetensors")
    export_embedding(workdir, a1111)
    assert sorted(load_file(a1111)) == ["clip_g", "clip_l"]
    assert export_embedding(workdir, learned, "diffusers") == [learned, learned.replace(".safe", "_2.safe")]
    sd.load_textual_inversion(a1111, token="<xl>")
    ours = sd.encode_prompts([prompt])
    trained = textual_inversion.model_params(config, pre, {**pre.params, **rows})
    for tower in ("text_encoder", "text_encoder_2"):
        np.testing.assert_array_equal(_table(trained[tower]), _table(sd.params[tower]))
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(sdxl_folders["base"])
    for path, tower, tokenizer in ((learned, pipe.text_encoder, pipe.tokenizer),
                                   (learned.replace(".safe", "_2.safe"), pipe.text_encoder_2, pipe.tokenizer_2)):
        pipe.load_textual_inversion(path, text_encoder=tower, tokenizer=tokenizer)
    with torch.no_grad():
        text, _, pooled, _ = pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
    for a, b in zip(ours, (text.numpy(), pooled.numpy())):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert np.abs(ours[0] - sd.encode_prompts(["a toy toy circle"])[0]).max() > 1e-2  # the rows show

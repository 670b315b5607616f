"""ControlNet training (config.stage = "controlnet") on the tiny saved pipeline of conftest, with (image, conditioning
image, caption) examples from a JSONL listing: the ControlNet starts as diffusers' from_unet makes it and trains alone
(its params and Adam's moments the checkpoint's state), the loss goes down, the export loads in diffusers and gives
sdjax's residuals; the conditioning images are cropped and flipped with their images (JSONL, webdataset), and a
missing one is an error naming it."""
import io
import json
import os
import tarfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

from configs.train import controlnet as controlnet_config
from sdjax.data.input_pipeline import make_iterator
from sdjax.train import loop
from sdjax.train.checkpoint import Checkpointer
from sdjax.train.export import export, load_params
from sdjax.train.sharding import global_batch
from sdjax.train.ldm import controlnet_stage
from sdjax.weights.controlnet_files import load_controlnet
from sdjax.weights.convert import to_state_dict
from conftest import torch_state
from test_lora_train import train

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning"),
              pytest.mark.long_file]
SIZE, N = 16, 4
EMBED = (8, 16)  # the tiny VAE's factor 2


def _examples(n=N, seed=0):
    """[(image uint8 [20, 24, 3] of 4x4 blocks, its conditioning image: the negative at twice the size, caption)]."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        image = np.repeat(np.repeat(rng.integers(0, 256, (5, 6, 3), np.uint8), 4, 0), 4, 1)
        out.append((image, np.repeat(np.repeat(255 - image, 2, 0), 2, 1), f"a red circle number {i}"))
    return out


def _png(array):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def write_jsonl(folder, examples, drop=None):
    """A JSONL listing of `examples` (their PNGs beside it); row `drop` without its conditioning image."""
    os.makedirs(folder, exist_ok=True)
    rows = []
    for i, (image, cond, caption) in enumerate(examples):
        Image.fromarray(image).save(os.path.join(folder, f"{i}.png"))
        Image.fromarray(cond).save(os.path.join(folder, f"{i}_cond.png"))
        rows.append({"image": f"{i}.png", "caption": caption, **({} if i == drop else {"hint": f"{i}_cond.png"})})
    path = os.path.join(folder, "train.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return path


def write_shard(path, examples, drop=None):
    """A webdataset shard: `{key}.png`, `{key}.cond.png`, `{key}.txt` per example (example `drop` without .cond)."""
    with tarfile.open(path, "w") as tar:
        for i, (image, cond, caption) in enumerate(examples):
            members = {"png": _png(image), "txt": caption.encode(), **({} if i == drop else {"cond.png": _png(cond)})}
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def cn_config(pretrained, listing, tfds):
    c = controlnet_config.get_config()
    c.pretrained, c.controlnet.conditioning_embedding_out_channels, c.mesh.data = pretrained, EMBED, 1
    c.data.update(path=listing, data_dir=tfds, image_size=SIZE, center_crop=False, random_flip=True,
                  conditioning_image="hint")
    c.batch_size, c.total_steps, c.log_every, c.checkpoint_every = N, 3, 1, 100
    c.optimizer.learning_rate = 1e-2  # a visible effect in 3 steps
    return c


@pytest.fixture(scope="module")
def trained(torch_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("controlnet_train")
    c = cn_config(torch_folder[1], write_jsonl(str(root / "data"), _examples()), str(root / "tfds"))
    state, run = train(c, root / "run", loop.pipeline_iterator)  # the real input pipeline
    return c, root, state, run


def test_the_controlnet_starts_as_from_unet_trains_alone_and_learns(trained, torch_folder):
    from diffusers import ControlNetModel
    c, root, state, run = trained
    assert list(state.params) == ["controlnet"] and list(run.frozen) == ["text_encoder", "unet", "vae"]
    # the checkpoint's state: the ControlNet's params and Adam's two moments of each
    ckpt = Checkpointer(str(root / "run"), read_only=True)
    try:
        stored, moments = ckpt.restore_item("params"), [x for x in jax.tree.leaves(ckpt.restore_item("opt_state"))
                                                        if np.ndim(x)]
    finally:
        ckpt.close()
    assert list(stored) == ["controlnet"]
    assert sum(x.size for x in moments) == 2 * sum(x.size for x in jax.tree.leaves(stored))
    # the initial ControlNet is diffusers' from_unet of the base U-Net: copies and zeros exact, the conditioning
    # embedding's convolutions drawn from torch's default bounds
    ref = torch_state(ControlNetModel.from_unet(torch_folder[0].unet, conditioning_embedding_out_channels=EMBED))
    init = to_state_dict(jax.device_get(run.pretrained.params["controlnet"]))
    assert init.keys() == ref.keys()
    drawn = [k for k in ref if k.startswith("controlnet_cond_embedding.") and ".conv_out." not in k]
    for k in ref:
        if k in drawn:
            fan_in = np.prod(ref[k.replace(".bias", ".weight")].shape[1:])
            bound, most = fan_in ** -0.5, np.abs(init[k]).max()
            assert most <= bound and (k.endswith("bias") or most > 0.9 * bound), k  # (8 biases: not near the bound)
        else:
            np.testing.assert_array_equal(init[k], ref[k], err_msg=k)
    # the loss on the same batches and draws: lower with the trained ControlNet than with the initial one (which adds
    # nothing: the frozen U-Net's loss)
    batch = global_batch(next(make_iterator(c.data, {"input_ids": run.pretrained.tokenizer}, N, 1)), run.mesh)

    def loss(params):
        out = []
        for step in range(4):  # (a fresh copy each time: the step donates it; laid out as the state, no recompile)
            fresh = jax.tree.map(lambda x, ref: jax.device_put(jnp.array(x, ref.dtype), ref.sharding),
                                 state.replace(params=params, step=step), state)
            out.append(float(run.step_fn(fresh, run.frozen, batch)[1]["loss"]))
        return np.mean(out)

    before, after = loss({"controlnet": run.pretrained.params["controlnet"]}), loss(state.params)
    print(f"loss {before:.4f} -> {after:.4f}")
    assert after < 0.95 * before, (before, after)


def _residuals_close(ours, ref, tol=1e-4):
    for a, b in zip(jax.tree.leaves(ours), ref):
        b = b.numpy().transpose(0, 2, 3, 1)
        np.testing.assert_allclose(np.asarray(a), b, atol=tol * max(1.0, np.abs(b).max()))


def test_export_loads_in_diffusers_and_gives_sdjax_residuals(trained, tmp_path):
    from diffusers import ControlNetModel
    c, root, state, run = trained
    out = export(str(root / "run"), str(tmp_path / "controlnet"))
    assert sorted(os.listdir(out)) == ["config.json", "diffusion_pytorch_model.safetensors", "sdjax_export.json"]
    net = ControlNetModel.from_pretrained(out).eval()
    module, params = load_controlnet(out)  # sdjax reads its export as the EMA params it wrote
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(load_params(str(root / "run"))["controlnet"])):
        np.testing.assert_array_equal(a, b)
    r = np.random.default_rng(0)
    x = r.standard_normal((2, SIZE // 2, SIZE // 2, 4)).astype(np.float32)
    t, text = np.array([10, 700]), r.standard_normal((2, 5, 64)).astype(np.float32)
    cond = r.uniform(size=(2, SIZE, SIZE, 3)).astype(np.float32)
    nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))  # noqa: E731
    with torch.no_grad():
        down, mid = net(nchw(x), torch.from_numpy(t), torch.from_numpy(text), controlnet_cond=nchw(cond),
                        conditioning_scale=0.8, return_dict=False)
    ours = jax.jit(module.apply)({"params": params}, x, t, text, cond, 0.8)
    _residuals_close(ours, [*down, mid])
    # trained from zero convolutions: residuals far above the tolerance
    assert min(float(np.abs(d.numpy()).mean()) for d in [*down, mid]) > 100 * 1e-4
    # and the images: diffusers' ControlNet pipeline with the export against sdjax's, both on the same folders
    from sdjax.pipeline import StableDiffusion
    from test_pipeline_controlnet import TOL, _control, _err, _reference, _txt2img
    ref, run = _txt2img(StableDiffusion.load(c.pretrained, controlnet=out),
                        _reference("StableDiffusionControlNetPipeline", c.pretrained, [out]), 1, _control(0))
    got, without = run(), run(controlnet_conditioning_scale=0.0)
    assert _err(got, ref) <= TOL and _err(without, ref) > 20 * TOL, (_err(got, ref), _err(without, ref))


@pytest.mark.parametrize("source", ["jsonl", "webdataset"])
def test_conditioning_images_are_cropped_and_flipped_with_their_images(tmp_path, tokenizer, source):
    examples = _examples(8, seed=1)
    path = (write_jsonl(str(tmp_path / "data"), examples) if source == "jsonl"
            else write_shard(str(tmp_path / "shard.tar"), examples))
    data = dict(source=source, path=path, data_dir=str(tmp_path / "tfds"), image_size=SIZE, center_crop=False,
                random_flip=True, conditioning_image="hint", num_threads=1)
    it = make_iterator(data, {"input_ids": tokenizer}, 8, 0)
    batch = next(it)
    images, conds = (batch["images"] + 1) / 2, batch["conditioning_images"]
    assert conds.shape == images.shape and conds.min() >= 0 and conds.max() <= 1
    # the negative of its image (the two resized from other sizes: their block edges differ a little); flipped or
    # cropped otherwise, far off
    err = np.abs(conds - (1 - images)).mean(axis=(1, 2, 3))
    mirrored = np.abs(conds - (1 - images[:, :, ::-1])).mean(axis=(1, 2, 3))
    shifted = np.abs(conds[:, 1:] - (1 - images[:, :-1])).mean(axis=(1, 2, 3))
    assert err.max() <= 0.02 and mirrored.min() > 0.1 and shifted.min() > 0.05, (err, mirrored, shifted)
    assert len({tuple(c) for c in batch["crop_top_left"]}) > 2  # crops drawn at several places


def test_a_missing_conditioning_image_is_an_error_naming_it(tmp_path, tokenizer):
    examples = _examples(3)
    data = dict(data_dir=str(tmp_path / "tfds"), image_size=SIZE, conditioning_image="hint", num_threads=1)
    with pytest.raises(ValueError, match=r"train.jsonl row 2 has no conditioning image \(column 'hint'"):
        make_iterator({**data, "source": "jsonl", "path": write_jsonl(str(tmp_path / "d"), examples, drop=1)},
                      {"input_ids": tokenizer}, 3, 0)
    shard = write_shard(str(tmp_path / "s.tar"), examples, drop=1)
    with pytest.raises(ValueError, match=r"s.tar:0001 has no conditioning image"):
        next(make_iterator({**data, "source": "webdataset", "path": shard}, {"input_ids": tokenizer}, 3, 0))
    with pytest.raises(ValueError, match="source 'shapes' has no conditioning images"):
        make_iterator({**data, "source": "shapes"}, {"input_ids": tokenizer}, 3, 0)
    c = controlnet_config.get_config()
    c.data.conditioning_image = ""
    with pytest.raises(ValueError, match="data.conditioning_image is empty"):
        controlnet_stage.check(c)
    for field in ("sample", "eval"):  # sampling and evaluation during training: no control images to give
        c = controlnet_config.get_config()
        c[field].every = 1
        (tmp_path / "captions.jsonl").write_text('{"id": 1, "caption": "a red circle"}\n')
        c.eval.update(clip=str(tmp_path), captions=str(tmp_path / "captions.jsonl"))  # what config.eval's check asks
        with pytest.raises(ValueError, match=f"{field}.every: sampling during ControlNet training needs control"):
            controlnet_stage.check(c)


@pytest.mark.slow  # the default run resumes full fine-tuning bit for bit (test_train_loop)
def test_controlnet_resume_is_bit_identical(trained):
    c, root, straight, _ = trained
    short = c.copy_and_resolve_references()
    short.total_steps = 2  # (a longer total_steps is let through on resume)
    train(short, root / "cut", loop.pipeline_iterator)
    resumed, _ = train(c, root / "cut", loop.pipeline_iterator)
    for a, b in zip(jax.tree.leaves((straight.params, straight.opt_state)),
                    jax.tree.leaves((resumed.params, resumed.opt_state))):
        np.testing.assert_array_equal(a, b)



@pytest.mark.slow  # an SDXL ControlNet: its train step (pooled text, time ids), export and diffusers' residuals
def test_sdxl_controlnet_trains_and_exports(sdxl_folders, tmp_path):
    from diffusers import ControlNetModel
    c = cn_config(sdxl_folders["base"], write_jsonl(str(tmp_path / "data"), _examples()), str(tmp_path / "tfds"))
    c.total_steps = 2
    state, run = train(c, tmp_path / "run", loop.pipeline_iterator)
    assert run.pretrained.modules["controlnet"].addition_embed_type == "text_time"
    net = ControlNetModel.from_pretrained(export(str(tmp_path / "run"), str(tmp_path / "controlnet"))).eval()
    r = np.random.default_rng(0)
    x, t = r.standard_normal((2, SIZE // 2, SIZE // 2, 4)).astype(np.float32), np.array([10, 700])
    text, cond = r.standard_normal((2, 5, 64)).astype(np.float32), r.uniform(size=(2, SIZE, SIZE, 3)).astype(np.float32)
    added = dict(text_embeds=r.standard_normal((2, 16)).astype(np.float32),
                 time_ids=np.tile(np.float32([[16, 16, 0, 0, 16, 16]]), (2, 1)))
    nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))  # noqa: E731
    with torch.no_grad():
        down, mid = net(nchw(x), torch.from_numpy(t), torch.from_numpy(text), controlnet_cond=nchw(cond),
                        added_cond_kwargs={k: torch.from_numpy(v) for k, v in added.items()}, return_dict=False)
    module = run.pretrained.modules["controlnet"]
    ours = jax.jit(module.apply)({"params": jax.device_get(state.ema_params["controlnet"])}, x, t, text, cond, **added)
    _residuals_close(ours, [*down, mid])
    assert min(float(np.abs(d.numpy()).mean()) for d in [*down, mid]) > 100 * 1e-4

"""LoRA training (config.lora) on the tiny saved pipeline of conftest: only the adapters train and sit in the optimizer
state, the base stays as read, a stopped run resumes bit for bit, and the exported LoRA (diffusers' and kohya's
formats) gives diffusers (load_lora_weights + fuse_lora) sdjax's images; dropout on the adapters' input as PEFT's."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from configs.train import tiny as train_tiny
from sdjax.pipeline import StableDiffusion
from sdjax.train import loop
from sdjax.train.export import export_lora
from sdjax.train.ldm import lora_params
from sdjax.weights.pretrained import load_pretrained
from test_lora import PROMPT, SIZE, STEPS, TOL, peft_gate  # noqa: F401 (peft_gate: a fixture)
from train_fakes import fake_data

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning"),
              pytest.mark.long_file]
# LoCon too: convolutions (3x3, 1x1 and the strided sampler), the time embedding, the text tower's MLP
TARGETS = ("conv1", "conv_shortcut", "downsamplers.0.conv", "proj_in", "time_emb_proj", "fc1")


def lora_config(folder):
    c = train_tiny.get_config("lora")
    c.pretrained, c.data.image_size, c.mesh.data = folder, 16, 1
    c.batch_size, c.total_steps, c.log_every, c.checkpoint_every = 4, 3, 1, 100
    c.optimizer.update(learning_rate=5e-2, warmup_steps=0, schedule="constant")  # a visible effect in 3 steps
    c.ema_decay = 0.5
    c.lora.update(components=("unet", "text_encoder"), conv=True, targets=tuple(c.lora.targets) + TARGETS)
    return c


def train(c, workdir, make_data=None, **data):
    """loop.train's final state and the Run it set up (make_data: the loop's; default fake_data(**data))."""
    runs, setup = [], loop.setup
    with pytest.MonkeyPatch.context() as m:
        m.setattr(loop, "setup", lambda *a, **k: runs.append(setup(*a, **k)) or runs[-1])
        state = loop.train(c, str(workdir), make_data or fake_data(**data), jax.devices()[:1])
    return state, runs[0]


@pytest.fixture(scope="module")
def trained(torch_folder, tmp_path_factory):
    c, root = lora_config(torch_folder[1]), tmp_path_factory.mktemp("lora_train")
    state, run = train(c, root / "straight")
    return c, root, state, run


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_only_the_adapters_train(trained, torch_folder):
    c, root, straight, run = trained
    assert list(straight.params) == ["lora"] and list(run.frozen) == ["text_encoder", "unet", "vae"]
    adapters = _leaves(straight.params)
    moments = [x for x in _leaves(straight.opt_state) if x.ndim]  # Adam's: one of each per adapter tensor
    assert {x.shape for x in moments} <= {x.shape for x in adapters}
    assert sum(x.size for x in moments) == 2 * sum(x.size for x in adapters)
    base = load_pretrained(torch_folder[1]).params
    assert all((x == y).all() for x, y in zip(_leaves(base), _leaves(run.frozen)))  # the base as read, trained
    # 2 down and 2 up tensors per layer: U-Net attention (4 x 2 x 3 blocks) + LoCon, text tower (5 x 2 layers)
    assert len(adapters) == 2 * sum(len(lora_params.targeted(c.lora, k, base[k])) for k in ("unet", "text_encoder"))


@pytest.mark.slow  # the default run resumes full fine-tuning bit for bit (test_train_step, test_train_loop)
def test_lora_resume_is_bit_identical(trained):
    c, root, straight, _ = trained
    # a SIGTERM while step 2's batch is read: saved at step 1 or 2, then resumed to step 3
    stopped, _ = train(c, root / "cut", sigterm_at=1)
    assert 1 <= int(stopped.step) < 3
    resumed, _ = train(c, root / "cut")
    for a, b in zip(_leaves((straight.params, straight.ema_params, straight.opt_state)),
                    _leaves((resumed.params, resumed.ema_params, resumed.opt_state))):
        np.testing.assert_array_equal(a, b)


def _changed(module, before):
    """Names of `module`'s tensors that differ from the state dict `before`."""
    return {k for k, v in module.state_dict().items() if not torch.equal(v, before[k])}


def test_exported_lora_loads_in_diffusers_and_gives_sdjax_images(trained, torch_folder, tmp_path):
    import diffusers
    c, root, state, _ = trained
    folder = torch_folder[1]
    noise = np.random.default_rng(0).standard_normal((1, SIZE // 2, SIZE // 2, 4), np.float32)
    kw = dict(num_steps=STEPS, sampler="ddim", height=SIZE, width=SIZE, noise={"initial": noise}, output_type="np",
              progress=False)
    pre = load_pretrained(folder)
    base = StableDiffusion(pre).generate(PROMPT, **kw)
    # the run's own sampling: its base with the (EMA) adapters merged, as sampling during training does
    merged = lora_params.model_params(c, {**pre.params, **jax.device_get(state.ema_params)})
    own = StableDiffusion(dataclasses.replace(pre, params=merged)).generate(PROMPT, **kw)
    effect = np.abs(own - base).mean()
    sd = StableDiffusion.load(folder)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    layers = {k: len(lora_params.targeted(c.lora, k, pre.params[k])) for k in ("unet", "text_encoder")}
    before = {k: {n: v.clone() for n, v in getattr(pipe, k).state_dict().items()} for k in layers}
    for fmt in ("diffusers", "kohya"):
        path = export_lora(str(root / "straight"), str(tmp_path / f"{fmt}.safetensors"), fmt)
        sd.load_lora(path)
        out = sd.generate(PROMPT, **kw)
        sd.unload_loras()
        pipe.load_lora_weights(path)  # as test_lora.reference
        pipe.fuse_lora()
        pipe.unload_lora_weights()
        # diffusers changed every adapted layer (a layer it skipped would show little in 3 steps' images)
        assert {k: len(_changed(getattr(pipe, k), before[k])) for k in layers} == layers
        ref = pipe(PROMPT, num_inference_steps=STEPS, height=SIZE, width=SIZE, output_type="np",
                   latents=torch.from_numpy(noise.transpose(0, 3, 1, 2).copy())).images
        for k in layers:
            getattr(pipe, k).load_state_dict(before[k])
        err, own_err = np.abs(out - ref).mean(), np.abs(out - own).mean()
        print(f"{fmt}: mean abs diff to diffusers {err:.2e}, to the run's sampling {own_err:.2e}, effect {effect:.2e}")
        assert err <= TOL and own_err <= TOL and effect > 100 * TOL, (err, own_err, effect)


class _Toy(nn.Module):
    """A Dense and a strided 3x3 Conv: x [b, 8, 8, 4], text [b, 8] -> [b, 4, 4, 4]."""

    @nn.compact
    def __call__(self, x, text):
        return nn.Conv(4, (3, 3), strides=2, padding=1, name="conv")(x) + nn.Dense(4, name="ctx")(text)[:, None, None]


def test_dropout_drops_the_adapters_input_as_peft():
    """W x + alpha/r up(down(dropout(x))), the dropout of example i in layer j keyed by fold_in(fold_in(key_i, 0), j);
    with nothing dropped, the merged weights' output."""
    c = lora_params.default_config()
    c.update(rank=2, alpha=3.0, dropout=0.5)
    rng = np.random.default_rng(0)
    x, text = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((3, 8, 8, 4), (3, 8)))
    params = _Toy().init(jax.random.key(0), x, text)["params"]
    shapes = {"conv": ((3, 3, 4, 2), (2, 4)), "ctx": ((8, 2), (2, 4))}
    adapters = {k: {"down": jnp.asarray(rng.standard_normal(d), jnp.float32),
                    "up": jnp.asarray(rng.standard_normal(u), jnp.float32)} for k, (d, u) in shapes.items()}
    all_params = {"unet": params, "lora": {"unet": adapters}}
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(5), i))(jnp.arange(3))

    def run(rate):
        c.dropout = rate
        modules, p = lora_params.branched(c, {"unet": _Toy()}, all_params, keys)
        return modules["unet"].apply({"params": p["unet"]}, x, text)

    merged = _Toy().apply({"params": lora_params.merged(c, all_params)["unet"]}, x, text)
    np.testing.assert_allclose(run(0.0), merged, rtol=1e-5, atol=1e-5)

    def dropped(v, j):
        keep = jax.vmap(lambda k: jax.random.bernoulli(
            jax.random.fold_in(jax.random.fold_in(k, 0), j), 0.5, v.shape[1:]))(keys)
        return jnp.where(keep, 2 * v, 0)

    conv = jax.lax.conv_general_dilated(dropped(x, 0), adapters["conv"]["down"], (2, 2), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    expected = (_Toy().apply({"params": params}, x, text) + 1.5 * conv @ adapters["conv"]["up"]
                + 1.5 * (dropped(text, 1) @ adapters["ctx"]["down"] @ adapters["ctx"]["up"])[:, None, None])
    out = run(0.5)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
    assert np.abs(out - merged).mean() > 100 * 1e-4  # what the dropout changes


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_sdxl_lora_file_fuses_in_diffusers_to_the_merged_weights(sdxl_folders, tmp_path, fmt):
    """A LoRA of the SDXL U-Net (LoCon too) and both towers written as `export_lora` writes it: diffusers' fused
    weights are sdjax's merged ones, and every adapted layer changed (kohya: the U-Net under its original names)."""
    import diffusers
    from safetensors.numpy import save_file
    from conftest import torch_state
    from sdjax.weights.convert import to_state_dict
    from sdjax.weights.lora_files import lora_tensors
    folder = sdxl_folders["base"]
    pre = load_pretrained(folder)
    c = lora_params.default_config()
    c.update(rank=2, alpha=3.0, conv=True, components=lora_params.COMPONENTS,
             targets=tuple(c.targets) + ("conv1", "time_emb_proj", "fc1"))
    adapters = jax.tree_util.tree_map_with_path(  # random, non-zero up
        lambda p, x: x + 0.1 * jax.random.normal(jax.random.key(len(p)), x.shape) if p[-1].key == "up" else x,
        lora_params.init(c, pre.params, 0))
    tensors, header = lora_tensors(lora_params.low_rank(c, adapters), pre.params, fmt)
    assert any(k.startswith("lora_unet_input_blocks_") for k in tensors) == (fmt == "kohya")
    path = str(tmp_path / "xl.safetensors")
    save_file(tensors, path, metadata=header)
    merged = lora_params.merged(c, {**pre.params, "lora": adapters})
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(folder)
    base = {k: {n: v.copy() for n, v in torch_state(getattr(pipe, k)).items()} for k in c.components}  # (views)
    pipe.load_lora_weights(path)
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    for k in c.components:
        fused, ours = torch_state(getattr(pipe, k)), to_state_dict(jax.device_get(merged[k]))
        assert fused.keys() == ours.keys()
        err = max(np.abs(fused[n] - ours[n]).max() for n in fused)
        changed = sum(not np.array_equal(fused[n], base[k][n]) for n in fused)
        assert err <= 1e-5 and changed == len(lora_params.targeted(c, k, pre.params[k])), (k, err, changed)

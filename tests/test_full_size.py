"""The full-size architectures (configs/models): parameter counts equal to diffusers' / transformers' for the
same configs (counted on torch's meta device: nothing allocated), and the SDXL U-Net built, randomly
initialised and run once (slow: 10 GB of float32 params)."""
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdjax.models import registry

torch = pytest.importorskip("torch")


def _reference(kind, config):
    """The diffusers / transformers model of `config`, on the meta device."""
    import diffusers
    import transformers
    with torch.device("meta"):
        if kind == "unet":
            return diffusers.UNet2DConditionModel.from_config(config)
        if kind == "vae":
            return diffusers.AutoencoderKL.from_config(config)
        cls = transformers.CLIPTextModel if kind == "text_encoder" else transformers.CLIPTextModelWithProjection
        fields = {k: v for k, v in config.items() if k in transformers.CLIPTextConfig().to_dict()}
        return cls(transformers.CLIPTextConfig(**fields))


@pytest.mark.parametrize("model", ["sd15", "sd21", "sdxl"])
def test_parameter_counts_equal_the_references(model):
    cfg = importlib.import_module(f"configs.models.{model}").get_config().to_dict()
    counts = {}
    for kind in [k for k in registry.MODELS if k in cfg]:
        ours = sum(x.size for x in jax.tree.leaves(registry.param_shapes(kind, registry.build(kind, cfg[kind]))))
        theirs = sum(p.numel() for p in _reference(kind, cfg[kind]).parameters())
        assert ours == theirs, (model, kind, ours, theirs)
        counts[kind] = ours
    if model == "sdxl":  # the published sizes: a 2.567 B U-Net, 123 M + 695 M text towers, an 83.7 M VAE
        assert round(counts["unet"] / 1e6) == 2567 and round(counts["text_encoder_2"] / 1e6) == 695
    if model == "sd15":
        assert round(counts["unet"] / 1e6) == 860


@pytest.mark.slow
def test_full_size_sdxl_unet_runs():
    """Random init of the 2.57 B-parameter U-Net, one call at 256² (32² latents): finite outputs, a function
    of each input it is conditioned on (text, pooled text, micro-conditioning)."""
    cfg = importlib.import_module("configs.models.sdxl").get_config().to_dict()
    unet = registry.build("unet", cfg["unet"])
    shapes = registry.param_shapes("unet", unet)  # random normal weights, array by array (a jitted init of
    leaves, tree = jax.tree.flatten(shapes)       # 10 GB needs more than this machine's 24 GB)
    params = tree.unflatten([0.02 * jax.random.normal(k, s.shape) for k, s in
                             zip(jax.random.split(jax.random.key(0), len(leaves)), leaves)])
    assert sum(x.size for x in leaves) == sum(p.numel() for p in _reference("unet", cfg["unet"]).parameters())
    keys = jax.random.split(jax.random.key(1), 3)
    sample = jax.random.normal(keys[0], (1, 32, 32, 4))
    text = jax.random.normal(keys[1], (1, 77, 2048))
    pooled = jax.random.normal(keys[2], (1, 1280))
    ids = jnp.array([[1024.0, 1024, 0, 0, 1024, 1024]])
    apply = jax.jit(lambda p, *a: unet.apply({"params": p}, *a))
    run = lambda *a: apply(params, *a)  # noqa: E731
    out = np.asarray(run(sample, jnp.array([500.0]), text, pooled, ids))
    assert out.shape == (1, 32, 32, 4) and np.isfinite(out).all()
    assert out.std() > 1e-3  # not constant (0.02-scaled weights: outputs of std ~0.02)
    for changed in [(sample, jnp.array([500.0]), -text, pooled, ids), (sample, jnp.array([500.0]), text, -pooled, ids),
                    (sample, jnp.array([500.0]), text, pooled, ids.at[0, 0].set(512.0))]:
        assert np.abs(np.asarray(run(*changed)) - out).mean() > 1e-3 * np.abs(out).mean()

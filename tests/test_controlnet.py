"""The ControlNet module and the U-Net's residual inputs against diffusers' ControlNetModel / UNet2DConditionModel."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import SDXL_PROJECTION, _randomize, _sdxl_unet, torch_state
from configs.models import tiny
from sdjax.models import registry
from sdjax.weights.convert import to_params

EMBED_CHANNELS = (8, 16)  # the tiny VAE's factor 2: one strided conv in the conditioning embedding


def tiny_controlnet(unet, seed=7, **options):
    """diffusers' ControlNetModel.from_unet of a torch U-Net, with random values everywhere (from_unet zeroes the
    residual convs: a ControlNet that adds nothing would hide mistakes)."""
    from diffusers import ControlNetModel as TorchControlNet
    net = TorchControlNet.from_unet(unet, conditioning_embedding_out_channels=EMBED_CHANNELS)
    if options:
        net = TorchControlNet.from_config({**net.config, **options})
    return _randomize(net, seed).eval()


@pytest.fixture(scope="module")
def sd_models():
    from diffusers import UNet2DConditionModel as TorchUNet
    unet = _randomize(TorchUNet(**tiny.get_config().to_dict()["unet"]), 0).eval()
    return unet, tiny_controlnet(unet)


def _inputs(unet_config, batch=2, size=8, seed=0, text=64):
    r = np.random.default_rng(seed)
    return dict(x=r.standard_normal((batch, size, size, unet_config["in_channels"])).astype(np.float32),
                t=np.array([10, 500][:batch], np.int64),
                text=r.standard_normal((batch, 5, text)).astype(np.float32),
                cond=r.uniform(size=(batch, 2 * size, 2 * size, 3)).astype(np.float32))


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _convert(torch_model, kind):
    module = registry.build(kind, dict(torch_model.config))
    return module, to_params(kind, torch_state(torch_model), registry.param_shapes(kind, module))


def _run(unet, net, inp, scale=0.8, guess_mode=False, added=None):
    """(torch down residuals, mid, U-Net output) and sdjax's, NHWC numpy."""
    added = added or {}
    with torch.no_grad():
        down, mid = net(_nchw(inp["x"]), torch.from_numpy(inp["t"]), torch.from_numpy(inp["text"]),
                        controlnet_cond=_nchw(inp["cond"]), conditioning_scale=scale, guess_mode=guess_mode,
                        added_cond_kwargs={k: torch.from_numpy(v) for k, v in added.items()} or None,
                        return_dict=False)
        out = unet(_nchw(inp["x"]), torch.from_numpy(inp["t"]), torch.from_numpy(inp["text"]),
                   added_cond_kwargs={k: torch.from_numpy(v) for k, v in added.items()} or None,
                   down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
    nhwc = lambda y: y.numpy().transpose(0, 2, 3, 1)  # noqa: E731
    ref = ([nhwc(d) for d in down], nhwc(mid), nhwc(out))

    kw = {k: jnp.asarray(v) for k, v in added.items()}
    cn, cn_params = _convert(net, "controlnet")
    un, un_params = _convert(unet, "unet")
    d, m = cn.apply({"params": cn_params}, inp["x"], inp["t"], inp["text"], inp["cond"], scale, guess_mode=guess_mode,
                    **kw)
    o = un.apply({"params": un_params}, inp["x"], inp["t"], inp["text"], down_residuals=d, mid_residual=m, **kw)
    return ref, ([np.asarray(a) for a in d], np.asarray(m), np.asarray(o))


def _close(ref, got, tol=1e-4):
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
        assert a.shape == b.shape
        np.testing.assert_allclose(b, a, atol=tol * max(1.0, np.abs(a).max()))


@pytest.mark.parametrize("guess_mode", [False, True])
def test_controlnet_and_residuals_match_diffusers(sd_models, guess_mode):
    unet, net = sd_models
    inp = _inputs(unet.config)
    ref, got = _run(unet, net, inp, guess_mode=guess_mode)
    _close(ref, got)
    # the residuals matter: the U-Net without them is far from the result
    with torch.no_grad():
        plain = unet(_nchw(inp["x"]), torch.from_numpy(inp["t"]), torch.from_numpy(inp["text"])).sample
    assert np.abs(plain.numpy().transpose(0, 2, 3, 1) - ref[2]).mean() > 100 * 1e-4 * max(1, np.abs(ref[2]).max())


def test_global_pool_and_bgr_match_diffusers(sd_models):
    unet, _ = sd_models
    net = tiny_controlnet(unet, global_pool_conditions=True, controlnet_conditioning_channel_order="bgr")
    ref, got = _run(unet, net, _inputs(unet.config), scale=0.6, guess_mode=True)
    _close(ref, got)


@pytest.mark.parametrize("small", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_sdxl_controlnet_matches_diffusers(small):
    """SDXL's; small: a cross-attention level without transformer layers, as the "small"/"mid" SDXL ControlNets."""
    unet = _randomize(_sdxl_unet(64, 6, SDXL_PROJECTION, False), 0).eval()
    net = tiny_controlnet(unet, **({"transformer_layers_per_block": [1, 0]} if small else {}))
    r = np.random.default_rng(1)
    added = dict(text_embeds=r.standard_normal((2, SDXL_PROJECTION)).astype(np.float32),
                 time_ids=np.tile(np.array([[16, 16, 0, 0, 16, 16]], np.float32), (2, 1)))
    ref, got = _run(unet, net, _inputs(unet.config), added=added)
    _close(ref, got)

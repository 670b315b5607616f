"""ControlNet files as users hold them (diffusers folders, aged; original single files), loaded by sdjax and by
diffusers from the same file; the files sdjax refuses; the folder sdjax writes, loaded by diffusers."""
import copy
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import SDXL_PROJECTION, _randomize, _sdxl_unet
from test_controlnet import _close, _nchw, tiny_controlnet
from sdjax.errors import WeightLoadError
from sdjax.weights.controlnet_files import load_controlnet

# What an original file can say: 32 norm groups, SD1's 8 heads; the conditioning embedding of every released
# ControlNet (16, 32, 96, 256): diffusers' reader of original files knows no other (conv_out = input_hint_block.14).
FILE_SIZED = dict(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  layers_per_block=1, attention_head_dim=8, cross_attention_dim=64, norm_num_groups=32)
# Keys that diffusers 0.14's ControlNet config.json (lllyasviel/sd-controlnet-canny) lacks, filled in by defaults.
NEWER_KEYS = ("conditioning_channels", "global_pool_conditions", "addition_embed_type_num_heads", "addition_embed_type",
              "addition_time_embed_dim", "transformer_layers_per_block", "encoder_hid_dim", "encoder_hid_dim_type",
              "mid_block_type", "num_attention_heads", "conditioning_embedding_out_channels", "_use_default_values")


@pytest.fixture(scope="module")
def net():
    from diffusers import ControlNetModel
    return _randomize(ControlNetModel(**FILE_SIZED), 3).eval()


def _inputs(config, added=(), size=8, factor=8, seed=0):
    r = np.random.default_rng(seed)
    return dict(x=r.standard_normal((2, size, size, config["in_channels"])).astype(np.float32),
                t=np.array([10, 500], np.int64),
                text=r.standard_normal((2, 5, config["cross_attention_dim"])).astype(np.float32),
                cond=r.uniform(size=(2, factor * size, factor * size, 3)).astype(np.float32), added=dict(added))


def _torch_residuals(net, inp):
    with torch.no_grad():
        down, mid = net(_nchw(inp["x"]), torch.from_numpy(inp["t"]), torch.from_numpy(inp["text"]),
                        controlnet_cond=_nchw(inp["cond"]), conditioning_scale=0.8, return_dict=False,
                        added_cond_kwargs={k: torch.from_numpy(v) for k, v in inp["added"].items()} or None)
    return [d.numpy().transpose(0, 2, 3, 1) for d in (*down, mid)]


@functools.cache
def _compiled(config):
    """The jitted apply of the ControlNet of `config` (JSON): compiled once for the tests sharing it."""
    from sdjax.models import registry
    module = registry.build("controlnet", json.loads(config))
    return jax.jit(lambda params, x, t, text, cond, added: module.apply({"params": params}, x, t, text, cond, 0.8,
                                                                          **added))


def _residuals(loaded, inp):
    """sdjax's residuals (conditioning scale 0.8) of (module, params), NHWC numpy."""
    from sdjax.models import registry
    module, params = loaded
    run = _compiled(json.dumps(registry.config_of(module), sort_keys=True))
    added = {k: jnp.asarray(v) for k, v in inp["added"].items()}
    down, mid = run(params, inp["x"], inp["t"], inp["text"], inp["cond"], added)
    return [np.asarray(d) for d in (*down, mid)]


def _age(folder, how):
    """A folder saved by today's diffusers, made as users hold them."""
    if how == "old config":
        path = os.path.join(folder, "config.json")
        with open(path) as f:
            config = json.load(f)
        with open(path, "w") as f:
            json.dump({k: v for k, v in config.items() if k not in NEWER_KEYS}, f)


FOLDERS = {"safetensors": dict(), "bin": dict(safe_serialization=False), "fp16 variant": dict(variant="fp16"),
           "sharded": dict(max_shard_size="100KB"), "old config": dict()}


@pytest.mark.parametrize("how", FOLDERS)
def test_diffusers_folders_load_as_diffusers_loads_them(net, tmp_path, how):
    from diffusers import ControlNetModel
    (copy.deepcopy(net).half() if how == "fp16 variant" else net).save_pretrained(tmp_path, **FOLDERS[how])
    _age(tmp_path, how)
    variant = FOLDERS[how].get("variant")
    reference = ControlNetModel.from_pretrained(tmp_path, variant=variant).eval()
    inp = _inputs(net.config)
    got = _residuals(load_controlnet(str(tmp_path), variant=variant), inp)
    _close(_torch_residuals(reference, inp), got)
    if how == "fp16 variant":  # the fp16 weights were the ones read (their rounding shows above the tolerance)
        full = _torch_residuals(net, inp)
        assert max(np.abs(a - b).max() / np.abs(a).max() for a, b in zip(full, got)) > 1e-3


def test_sdxl_controlnet_folder_loads_as_diffusers_loads_it(tmp_path):
    """diffusers/controlnet-canny-sdxl-1.0's layout: text_time conditioning, per-level transformer depth."""
    from diffusers import ControlNetModel
    net = tiny_controlnet(_randomize(_sdxl_unet(64, 6, SDXL_PROJECTION, False), 0))
    net.save_pretrained(tmp_path)
    r = np.random.default_rng(1)
    added = dict(text_embeds=r.standard_normal((2, SDXL_PROJECTION)).astype(np.float32),
                 time_ids=np.tile(np.array([[16, 16, 0, 0, 16, 16]], np.float32), (2, 1)))
    inp = _inputs(net.config, added, factor=2)
    reference = ControlNetModel.from_pretrained(tmp_path).eval()
    _close(_torch_residuals(reference, inp), _residuals(load_controlnet(str(tmp_path)), inp))

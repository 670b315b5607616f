"""ControlNet files as users hold them (diffusers folders, aged; original single files), loaded by sdjax and by
diffusers from the same file; the files sdjax refuses; the folder sdjax writes, loaded by diffusers."""
import copy
import functools
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from conftest import SDXL_PROJECTION, _randomize, torch_state
from test_controlnet import _close, _nchw
from sdjax.errors import WeightLoadError
from sdjax.models import registry
from sdjax.weights.controlnet_files import PREFIX, controlnet_tensors, load_controlnet, save_controlnet, to_original
from sdjax.weights.files import read_tensors

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
    module = registry.build("controlnet", json.loads(config))
    return jax.jit(lambda params, x, t, text, cond, added: module.apply({"params": params}, x, t, text, cond, 0.8,
                                                                          **added))


def _residuals(loaded, inp):
    """sdjax's residuals (conditioning scale 0.8) of (module, params), NHWC numpy."""
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


def test_sdxl_controlnets_load_as_diffusers_loads_them(tmp_path):
    """diffusers/controlnet-canny-sdxl-1.0's layout (text_time conditioning, per-level transformer depth) as a
    folder and as its weights file alone (diffusers names); the names table both ways in ldm names (label_emb)."""
    from diffusers import ControlNetModel
    net = _randomize(ControlNetModel(
        **{**FILE_SIZED, "block_out_channels": (64, 128), "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
           "attention_head_dim": (1, 2), "use_linear_projection": True, "transformer_layers_per_block": (1, 2),
           "addition_embed_type": "text_time", "addition_time_embed_dim": 256,  # SDXL's time ids embedding
           "projection_class_embeddings_input_dim": SDXL_PROJECTION + 6 * 256}), 5).eval()
    net.save_pretrained(tmp_path / "folder")
    single = str(tmp_path / "controlnet-canny-sdxl-1.0.safetensors")
    os.rename(tmp_path / "folder" / "diffusion_pytorch_model.safetensors", single)
    save_file(torch_state(net), tmp_path / "folder" / "diffusion_pytorch_model.safetensors")
    r = np.random.default_rng(1)
    added = dict(text_embeds=r.standard_normal((2, SDXL_PROJECTION)).astype(np.float32),
                 time_ids=np.tile(np.array([[64, 64, 0, 0, 64, 64]], np.float32), (2, 1)))
    inp = _inputs(net.config, added)
    ref = _torch_residuals(ControlNetModel.from_pretrained(tmp_path / "folder").eval(), inp)
    _close(ref, _residuals(load_controlnet(str(tmp_path / "folder")), inp))
    reference = ControlNetModel.from_single_file(single, config=str(tmp_path / "folder")).eval()
    _close(_torch_residuals(reference, inp), _residuals(load_controlnet(single), inp))
    ldm = controlnet_tensors(to_original(torch_state(net)))  # label_emb, which diffusers' reader drops
    assert ldm.keys() == torch_state(net).keys() and all(np.array_equal(ldm[k], v) for k, v in torch_state(net).items())


def _single_file(net, path, how):
    """net written as the single files that circulate, in ldm names (controlnet_files.to_original)."""
    state = to_original(torch_state(net))
    if how == "stripped fp16":  # comfy/webui conversions: no control_model. prefix, half precision
        save_file({k.removeprefix(PREFIX): v.astype(np.float16) for k, v in state.items()}, path)
        return
    if how == "1.0 whole model":  # control_sd15_*.pth: the SD model it was trained with beside it (ignored)
        r = np.random.default_rng(0)
        state.update({"model.diffusion_model." + k.removeprefix(PREFIX): r.standard_normal(v.shape).astype(np.float32)
                      for k, v in state.items() if k.startswith((PREFIX + "input_blocks.", PREFIX + "middle_block."))})
        state.update({"first_stage_model.encoder.conv_in.weight": np.ones((8, 3, 3, 3), np.float32),
                      "cond_stage_model.transformer.text_model.final_layer_norm.weight": np.ones(64, np.float32),
                      "betas": np.linspace(1e-4, 2e-2, 1000, dtype=np.float32)})
    torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}, path)


SINGLE_FILES = {"1.1": "control_v11p_sd15_canny.pth", "stripped fp16": "control_v11p_sd15_canny_fp16.safetensors",
                "1.0 whole model": "control_sd15_canny.pth"}


@pytest.mark.parametrize("how", SINGLE_FILES)
def test_original_single_files_load_as_diffusers_reads_them(net, tmp_path, how):
    from diffusers import ControlNetModel
    path = str(tmp_path / SINGLE_FILES[how])
    _single_file(net, path, how)
    net.save_config(tmp_path / "config")  # diffusers' reader takes the architecture from a folder's config.json
    reference = ControlNetModel.from_single_file(path, config=str(tmp_path / "config")).float().eval()
    inp = _inputs(net.config)
    loaded = load_controlnet(path)
    _close(_torch_residuals(reference, inp), _residuals(loaded, inp))
    if how == "1.1":  # the names table both ways: the file's tensors are the module's
        assert {k: v.shape for k, v in controlnet_tensors(read_tensors(path)).items()} == {
            k: v.shape for k, v in torch_state(net).items()}
        assert registry.config_of(loaded[0]) == registry.config_of(registry.build("controlnet", dict(net.config)))


@pytest.mark.slow  # the SD 1.x path again, with linear projections and 64-channel heads
def test_sd2_single_file_loads_as_diffusers_reads_it(tmp_path):
    from diffusers import ControlNetModel
    net = _randomize(ControlNetModel(**{**FILE_SIZED, "block_out_channels": (64, 128), "attention_head_dim": (1, 2),
                                        "use_linear_projection": True}), 4).eval()
    path = str(tmp_path / "controlnet-sd21-canny.safetensors")
    _single_file(net, path, "stripped fp16")
    net.save_config(tmp_path / "config")
    reference = ControlNetModel.from_single_file(path, config=str(tmp_path / "config")).float().eval()
    inp = _inputs(net.config)
    _close(_torch_residuals(reference, inp), _residuals(load_controlnet(path), inp))


# Files sdjax refuses: (file name, a few of its keys, what the message says it is)
OTHERS = {
    "control-lora-canny-rank128.safetensors": (
        ("lora_controlnet", "input_hint_block.0.weight", "input_blocks.1.0.in_layers.2.up", "time_embed.0.down"),
        "Control-LoRA"),
    "controlnet-union-sdxl-1.0.safetensors": (
        ("controlnet_cond_embedding.conv_in.weight", "task_embedding", "spatial_ch_projs.weight",
         "control_add_embedding.linear_1.weight", "transformer_layes.0.attn.in_proj_weight"), "ControlNet-Union"),
    "t2iadapter_canny_sd15v2.pth": (("conv_in.weight", "body.0.block1.weight", "body.0.block2.bias"), "T2I-Adapter"),
    "t2i-adapter-canny-sdxl.safetensors": (("adapter.conv_in.weight", "adapter.body.0.resnets.0.block1.weight"),
                                           "T2I-Adapter"),
    "controllllite_v01032064e_sdxl_canny.safetensors": (
        ("lllite_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.conditioning1.0.weight",), "ControlNet-LLLite"),
    "v1-5-pruned-emaonly.safetensors": (
        ("model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.encoder.conv_in.weight",
         "cond_stage_model.transformer.text_model.final_layer_norm.weight"), "Stable Diffusion checkpoint"),
    "detail_lora.safetensors": (("lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight",
                                 "lora_unet_down_blocks_0_attentions_0_proj_in.alpha"), "LoRA"),
    "vae-ft-mse-840000-ema-pruned.safetensors": (("encoder.down.0.block.0.conv1.weight", "decoder.conv_in.weight"),
                                                 "VAE"),
    "unet.safetensors": (("conv_in.weight", "time_embedding.linear_1.weight", "down_blocks.0.resnets.0.conv1.weight",
                          "up_blocks.0.resnets.0.conv1.weight"), "U-Net"),
    "embedding.safetensors": (("emb_params",), "not a ControlNet: no control_model"),
}


@pytest.mark.parametrize("name", OTHERS)
def test_other_files_are_refused_naming_what_they_are(tmp_path, name):
    keys, what = OTHERS[name]
    path = str(tmp_path / name)
    tensors = {k: torch.zeros(1) for k in keys}
    torch.save(tensors, path) if name.endswith(".pth") else save_file({k: v.numpy() for k, v in tensors.items()}, path)
    with pytest.raises(WeightLoadError, match=f"^{re.escape(path)}: .*{what}") as e:
        load_controlnet(path)
    assert "\n" not in str(e.value)


def test_saved_controlnet_loads_in_diffusers(net, tmp_path):
    """save_controlnet (training's export) writes a folder that diffusers' from_pretrained reads as sdjax's
    params: the residuals of the ControlNet it came from."""
    from diffusers import ControlNetModel
    net.save_pretrained(tmp_path / "source")
    save_controlnet(str(tmp_path / "export"), *load_controlnet(str(tmp_path / "source")))
    with open(tmp_path / "export" / "config.json") as f:
        assert json.load(f)["_class_name"] == "ControlNetModel"
    inp = _inputs(net.config)
    _close(_torch_residuals(net, inp), _torch_residuals(ControlNetModel.from_pretrained(tmp_path / "export"), inp))


def test_shuffle_single_file_pools_its_residuals(net, tmp_path):
    """Shapes cannot tell global_pool_conditions: the shuffle ControlNet's ldm config (beside it, or by its name)."""
    path = str(tmp_path / "control_v11e_sd15_shuffle.pth")
    _single_file(net, path, "1.1")
    assert load_controlnet(path)[0].global_pool_conditions
    (tmp_path / "control_v11e_sd15_shuffle.yaml").write_text("model:\n  params:\n    control_stage_config:\n"
                                                            "      params:\n        global_average_pooling: False\n")
    assert not load_controlnet(path)[0].global_pool_conditions

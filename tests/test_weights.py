"""Import of diffusers folders, export back, and the errors a user sees for bad checkpoints."""
import json
import os
import shutil

import jax
import numpy as np
import pytest
from flax import traverse_util

from conftest import torch_state as _torch_state
from sdjax.weights.convert import to_state_dict
from sdjax.errors import WeightLoadError
from sdjax.weights.pretrained import load_pretrained, save_pretrained


def test_folder_import_matches_torch_tensors(torch_folder):
    pipe, folder = torch_folder
    sd = load_pretrained(folder)
    for kind in ("unet", "vae", "text_encoder"):
        ref = _torch_state(getattr(pipe, kind))
        got = to_state_dict(sd.params[kind])
        assert set(got) == set(ref), kind
        for name in ref:
            np.testing.assert_array_equal(got[name], ref[name], err_msg=name)
    assert sd.scheduler["beta_schedule"] == "scaled_linear"
    assert sd.tokenizer("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_import_export_import_is_identity(torch_folder, tmp_path):
    _, folder = torch_folder
    first = load_pretrained(folder)
    save_pretrained(first, str(tmp_path / "export"))
    second = load_pretrained(str(tmp_path / "export"))
    for kind in first.params:
        a, b = (traverse_util.flatten_dict(x.params[kind]) for x in (first, second))
        assert a.keys() == b.keys()
        for path in a:
            assert a[path].dtype == b[path].dtype
            np.testing.assert_array_equal(np.asarray(a[path]), np.asarray(b[path]), err_msg=str(path))
    assert first.tokenizer.get_vocab() == second.tokenizer.get_vocab()


@pytest.mark.parametrize("shard", [None, 100_000])
def test_export_loads_in_diffusers(torch_folder, tmp_path, shard):
    """One file per component, or (max_shard_size) shards and their index, as diffusers writes past 10 GB."""
    from diffusers import StableDiffusionPipeline
    pipe, folder = torch_folder
    save_pretrained(load_pretrained(folder), str(tmp_path / "export"), **({"max_shard_size": shard} if shard else {}))
    unet = sorted(os.listdir(tmp_path / "export" / "unet"))
    assert (len(unet) > 3 and "diffusion_pytorch_model.safetensors.index.json" in unet) == bool(shard), unet
    again = StableDiffusionPipeline.from_pretrained(str(tmp_path / "export"), safety_checker=None)
    for kind in ("unet", "vae", "text_encoder"):
        ref, got = _torch_state(getattr(pipe, kind)), _torch_state(getattr(again, kind))
        assert set(ref) == set(got)
        for name in ref:
            np.testing.assert_array_equal(got[name], ref[name], err_msg=name)


def test_bfloat16_load_casts_params(torch_folder):
    sd = load_pretrained(torch_folder[1], dtype="bfloat16")
    leaves = jax.tree.leaves(sd.params)
    assert all(x.dtype == jax.numpy.bfloat16 for x in leaves)
    assert sd.modules["unet"].dtype == jax.numpy.bfloat16


# ---- errors a user can act on ----

def _copy(folder, tmp_path):
    dst = str(tmp_path / "copy")
    shutil.copytree(folder, dst)
    return dst


def test_error_path_not_found(tmp_path):
    with pytest.raises(WeightLoadError, match="model not found"):
        load_pretrained(str(tmp_path / "nope"))


def test_error_not_a_diffusers_folder(tmp_path):
    with pytest.raises(WeightLoadError, match="not a diffusers folder"):
        load_pretrained(str(tmp_path))


def test_error_missing_weights_file(torch_folder, tmp_path):
    folder = _copy(torch_folder[1], tmp_path)
    os.remove(os.path.join(folder, "vae", "diffusion_pytorch_model.safetensors"))
    with pytest.raises(WeightLoadError, match=r"no weights in .*vae"):
        load_pretrained(folder)


def test_error_missing_config(torch_folder, tmp_path):
    folder = _copy(torch_folder[1], tmp_path)
    os.remove(os.path.join(folder, "unet", "config.json"))
    with pytest.raises(WeightLoadError, match=r"missing file: .*unet.config\.json"):
        load_pretrained(folder)


def _rewrite_tensors(folder, kind, edit):
    from safetensors.numpy import load_file, save_file
    path = os.path.join(folder, kind, "diffusion_pytorch_model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def test_error_lists_missing_and_unexpected_names(torch_folder, tmp_path):
    folder = _copy(torch_folder[1], tmp_path)

    def edit(t):
        t["conv_in.weightz"] = t.pop("conv_in.weight")
        del t["conv_out.bias"]
    _rewrite_tensors(folder, "unet", edit)
    with pytest.raises(WeightLoadError) as err:
        load_pretrained(folder)
    msg = str(err.value)
    assert "unet" in msg and "2 missing" in msg and "conv_in.weight\n" in msg + "\n"
    assert "conv_out.bias" in msg and "1 unexpected" in msg and "conv_in.weightz" in msg


def test_error_shape_mismatch(torch_folder, tmp_path):
    folder = _copy(torch_folder[1], tmp_path)
    _rewrite_tensors(folder, "vae", lambda t: t.update({"quant_conv.bias": np.zeros(3, np.float32)}))
    with pytest.raises(WeightLoadError, match=r"shape mismatch for vae: quant_conv.bias.*\(8,\).*\(3,\)"):
        load_pretrained(folder)


def test_error_unsupported_architecture(torch_folder, tmp_path):
    folder = _copy(torch_folder[1], tmp_path)
    path = os.path.join(folder, "unet", "config.json")
    cfg = json.load(open(path))
    cfg["addition_embed_type"] = "text_time"
    json.dump(cfg, open(path, "w"))
    with pytest.raises(WeightLoadError, match="addition_embed_type"):
        load_pretrained(folder)


def test_single_file_loads_like_the_folder(torch_folder, tmp_path):
    """An original-format .safetensors of the same weights gives the same params and tokenizer."""
    from safetensors.numpy import save_file
    from sdjax.weights.single_file import to_original
    pipe, folder = torch_folder
    parts = {kind: _torch_state(getattr(pipe, kind)) for kind in ("unet", "vae", "text_encoder")}
    path = str(tmp_path / "model.safetensors")
    save_file(to_original(parts, text_format="clip"), path)
    from_file, from_folder = load_pretrained(path), load_pretrained(folder)
    for kind in parts:
        a, b = (traverse_util.flatten_dict(x.params[kind]) for x in (from_file, from_folder))
        assert a.keys() == b.keys()
        for p in a:
            np.testing.assert_array_equal(np.asarray(a[p]), np.asarray(b[p]), err_msg=str(p))
    assert from_file.scheduler["prediction_type"] == "epsilon"
    assert from_file.tokenizer("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_error_unknown_single_file_format(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"\0")
    with pytest.raises(WeightLoadError, match="unknown"):
        load_pretrained(str(path))

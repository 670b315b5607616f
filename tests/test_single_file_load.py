"""Single files as they circulate, through load_pretrained: training .ckpt with EMA, fp16 safetensors."""
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from conftest import torch_state
from sdjax.weights.convert import to_state_dict
from sdjax.errors import WeightLoadError
from sdjax.weights.pretrained import load_pretrained
from sdjax.weights.single_file import to_original

KINDS = ("unet", "vae", "text_encoder")


@pytest.fixture(scope="module")
def parts(torch_folder):
    """{kind: diffusers-named tensors} of the tiny pipeline."""
    return {kind: torch_state(getattr(torch_folder[0], kind)) for kind in KINDS}


@pytest.fixture(scope="module")
def ema_unet(parts):
    """An EMA copy of the UNet with other values than the raw weights."""
    return {k: (0.9 * v + 0.01).astype(np.float32) for k, v in parts["unet"].items()}


@pytest.fixture(scope="module")
def training_ckpt(parts, ema_unet, tmp_path_factory):
    """A Lightning-style training .ckpt (optimizer-free): nested state_dict with model_ema.*, global_step."""
    original = to_original(parts)
    ema_original = to_original({**parts, "unet": ema_unet})
    state = {**original, "betas": np.zeros(1000, np.float32),
             "model_ema.decay": np.float32(0.9999), "model_ema.num_updates": np.int32(7),
             **{"model_ema." + k[len("model."):].replace(".", ""): v
                for k, v in ema_original.items() if k.startswith("model.diffusion_model.")}}
    path = tmp_path_factory.mktemp("ckpt") / "train.ckpt"
    torch.save({"state_dict": {k: torch.from_numpy(np.asarray(v)) for k, v in state.items()},
                "global_step": 470000, "epoch": 3, "pytorch-lightning_version": "1.4.2"}, path)
    return str(path)


def assert_params(params, want):
    got = to_state_dict(params)
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_training_ckpt_takes_ema_by_default(training_ckpt, parts, ema_unet, caplog):
    with caplog.at_level("INFO", logger="sdjax"):
        ema = load_pretrained(training_ckpt)
    assert "UNet: EMA weights" in caplog.text
    assert_params(ema.params["unet"], ema_unet)
    for kind in ("vae", "text_encoder"):
        assert_params(ema.params[kind], parts[kind])
    raw = load_pretrained(training_ckpt, use_ema=False)
    assert_params(raw.params["unet"], parts["unet"])
    gap = max(np.abs(ema_unet[k] - parts["unet"][k]).max() for k in ema_unet)
    assert gap > 0.05  # the two choices really differ (exact equality above)


def test_use_ema_required_or_misplaced(parts, torch_folder, tmp_path):
    path = str(tmp_path / "pruned.safetensors")  # an ema-only file: model.diffusion_model.* only
    save_file(to_original(parts), path)
    assert_params(load_pretrained(path).params["unet"], parts["unet"])
    with pytest.raises(WeightLoadError, match="no EMA weights"):
        load_pretrained(path, use_ema=True)
    with pytest.raises(ValueError, match="single-file"):
        load_pretrained(torch_folder[1], use_ema=False)


def test_fp16_safetensors_single_file(parts, tmp_path):
    """A float16 release loads; params are the float32 ones rounded to float16."""
    path = str(tmp_path / "model-fp16.safetensors")
    save_file({k: v.astype(np.float16) for k, v in to_original(parts).items()}, path)
    sd = load_pretrained(path)
    for kind in KINDS:
        got = to_state_dict(sd.params[kind])
        for k, v in parts[kind].items():
            assert got[k].dtype == np.float32
            np.testing.assert_array_equal(got[k], v.astype(np.float16).astype(np.float32), err_msg=k)
            np.testing.assert_allclose(got[k], v, rtol=2 ** -11, atol=2 ** -24, err_msg=k)
    rounding = max(np.abs(to_state_dict(sd.params["unet"])[k] - v).max() for k, v in parts["unet"].items())
    assert rounding > 0  # float16 did round: the file really was half precision

"""load_pretrained(..., vae=...): a separate VAE as a diffusers folder, a diffusers-named file, an ldm file."""
import json
import shutil

import jax
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.numpy import save_file

from conftest import _randomize, torch_state
from sdjax.weights.convert import to_state_dict
from sdjax.errors import WeightLoadError
from sdjax.weights.ldm_names import VAE_PREFIX
from sdjax.weights.pretrained import load_pretrained
from sdjax.weights.single_file import to_original

TOL = 1e-4  # float32 decode, sdjax vs diffusers


@pytest.fixture(scope="module")
def vae_files(torch_folder, tmp_path_factory):
    """(torch VAE of another seed, {form: path}) saved in the forms that circulate."""
    pipe, _ = torch_folder
    vae = _randomize(AutoencoderKL.from_config(pipe.vae.config), 5).eval()
    root = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(root / "folder")
    shutil.copy(root / "folder" / "diffusion_pytorch_model.safetensors", root / "diffusers.safetensors")
    parts = {kind: torch_state(getattr(pipe, kind)) for kind in ("unet", "text_encoder")}
    ldm = {k[len(VAE_PREFIX):]: v for k, v in to_original({**parts, "vae": torch_state(vae)}).items()
           if k.startswith(VAE_PREFIX)}
    save_file(ldm, root / "vae-ft-ema-pruned.safetensors")
    rng = np.random.default_rng(0)  # a training .ckpt also holds the loss (LPIPS, discriminator) and EMA state
    extra = {"loss.logvar": np.zeros(()), "loss.discriminator.main.0.weight": rng.normal(size=(8, 3, 4, 4)),
             "loss.perceptual_loss.net.slice1.0.weight": rng.normal(size=(8, 3, 3, 3)),
             "model_ema.decay": np.asarray(0.9999), "model_ema.num_updates": np.asarray(3)}
    torch.save({"state_dict": {k: torch.from_numpy(np.asarray(v)) for k, v in {**ldm, **extra}.items()},
                "global_step": 840000}, root / "vae-ft.ckpt")
    forms = {"folder": root / "folder", "diffusers": root / "diffusers.safetensors",
             "ldm": root / "vae-ft-ema-pruned.safetensors", "ldm_ckpt": root / "vae-ft.ckpt"}
    return vae, {k: str(v) for k, v in forms.items()}


@pytest.fixture(scope="module")
def decode(torch_folder):
    """(the model's own Pretrained, jitted decode(params, latents [B, h, w, 4]) of its VAE module)."""
    sd = load_pretrained(torch_folder[1])
    return sd, jax.jit(lambda p, z: sd.modules["vae"].apply({"params": p}, z, method="decode"))


def _reference(form, path, folder):
    """diffusers' AutoencoderKL from the same saved folder / file."""
    if form == "folder":
        return AutoencoderKL.from_pretrained(path)
    if form == "diffusers":
        return AutoencoderKL.from_pretrained(folder)  # the same bytes as this file
    return AutoencoderKL.from_single_file(path, config=folder, local_files_only=True)


@pytest.mark.parametrize("form", ["folder", "diffusers", "ldm", "ldm_ckpt"])
def test_separate_vae_decodes_like_diffusers(form, vae_files, decode, torch_folder):
    _, paths = vae_files
    base, fn = decode
    sd = load_pretrained(torch_folder[1], vae=paths[form])
    assert sd.modules["vae"] == base.modules["vae"]  # the model's VAE config is kept
    z = np.random.default_rng(1).normal(size=(1, 4, 8, 8)).astype(np.float32)
    ref = _reference(form, paths[form], paths["folder"]).eval()
    with torch.no_grad():
        want = ref.decode(torch.from_numpy(z)).sample.numpy().transpose(0, 2, 3, 1)
    got = np.asarray(fn(sd.params["vae"], z.transpose(0, 2, 3, 1)))
    err = np.abs(got - want).max()
    effect = np.abs(np.asarray(fn(base.params["vae"], z.transpose(0, 2, 3, 1))) - want).max()
    assert err < TOL and effect > 1000 * TOL, (err, effect)


def test_old_diffusers_attention_names(vae_files, decode, torch_folder, tmp_path):
    """VAE files saved before diffusers 0.14 name the mid-block attention query/key/value/proj_attn."""
    vae, paths = vae_files
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    tensors = {}
    for k, v in torch_state(vae).items():
        for new, was in old.items():
            k = k.replace(f"mid_block.attentions.0.{new}.", f"mid_block.attentions.0.{was}.")
        tensors[k] = v
    assert any(".query." in k for k in tensors)
    save_file(tensors, tmp_path / "old.safetensors")
    got = to_state_dict(load_pretrained(torch_folder[1], vae=str(tmp_path / "old.safetensors")).params["vae"])
    want = torch_state(vae)
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_separate_vae_checks(vae_files, torch_folder, tmp_path, caplog):
    _, paths = vae_files
    folder = tmp_path / "groups"
    shutil.copytree(paths["folder"], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "scaling_factor": 0.13025}))
    with caplog.at_level("WARNING", logger="sdjax"):
        sd = load_pretrained(torch_folder[1], vae=str(folder))
    assert sd.modules["vae"].scaling_factor == 0.18215 and "keeping the model's 0.18215" in caplog.text
    (folder / "config.json").write_text(json.dumps({**config, "norm_num_groups": 4}))
    with pytest.raises(WeightLoadError, match="does not fit the model's VAE: norm_num_groups = 4"):
        load_pretrained(torch_folder[1], vae=str(folder))
    from safetensors.numpy import load_file
    ldm = load_file(paths["ldm"])
    key = "decoder.conv_in.weight"
    save_file({**ldm, key: ldm[key][:8]}, tmp_path / "narrow.safetensors")
    with pytest.raises(WeightLoadError, match=f"shape mismatch for VAE {tmp_path}.*decoder.conv_in"):
        load_pretrained(torch_folder[1], vae=str(tmp_path / "narrow.safetensors"))
    save_file({k: v for k, v in ldm.items() if k != "quant_conv.bias"}, tmp_path / "part.safetensors")
    with pytest.raises(WeightLoadError, match="(?s)missing tensor.*quant_conv.bias"):
        load_pretrained(torch_folder[1], vae=str(tmp_path / "part.safetensors"))
    save_file({"a.weight": np.zeros(1, np.float32)}, tmp_path / "other.safetensors")
    with pytest.raises(WeightLoadError, match="not a VAE"):
        load_pretrained(torch_folder[1], vae=str(tmp_path / "other.safetensors"))

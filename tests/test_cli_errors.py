"""Bad input to sample.py / train.py ends in one line naming what is wrong, not a traceback.

In-process `main(argv)` everywhere (every case fails before a compile), except one train.py run
in a subprocess with 2 CPU devices: the indivisible batch, and the real interpreter's stderr.
"""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import sample  # noqa: E402
import train  # noqa: E402
from sdjax.pipeline import StableDiffusion  # noqa: E402


def _one_line_exit(cli, main, argv, capsys):
    """The message main(argv) exits with: `cli: ...` on one line, nothing but SystemExit raised."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    message = e.value.code
    assert isinstance(message, str) and message.startswith(f"{cli}: ") and "\n" not in message, message
    assert "Traceback" not in capsys.readouterr().err
    return message


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a case that wrongly ran would write its outputs/ here, not in the repo


def sample_error(argv, capsys):
    return _one_line_exit("sample.py", sample.main, ["--prompt", "a", *argv], capsys)


def test_sample_bad_files(tmp_path, torch_folder, capsys):
    folder = torch_folder[1]
    assert "model not found" in sample_error(["--model", str(tmp_path / "nope")], capsys)

    unet = os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(open(unet, "rb").read()[:5000])
    msg = sample_error(["--model", str(cut)], capsys)
    assert str(cut) in msg and "truncated or corrupt" in msg
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"w": torch.ones(64, 64)}}, ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    for path in (ckpt, empty):
        msg = sample_error(["--model", str(path)], capsys)
        assert str(path) in msg and "truncated or corrupt" in msg

    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    (broken / "vae" / "config.json").write_text('{"in_channels": 3,')
    msg = sample_error(["--model", str(broken)], capsys)
    assert os.path.join("vae", "config.json") in msg and "not valid JSON" in msg
    shutil.rmtree(broken / "unet")
    msg = sample_error(["--model", str(broken)], capsys)
    assert "no unet/ folder" in msg and "'vae'" in msg  # what was expected, and what is there


def test_sample_bad_images_and_out(tmp_path, torch_folder, capsys):
    model = ["--model", torch_folder[1]]
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    for flag in ("--init-image", "--mask"):
        msg = sample_error([*model, flag, str(tmp_path / "nope.png")], capsys)
        assert f"{flag}: no such file" in msg and "nope.png" in msg
    msg = sample_error([*model, "--init-image", str(text)], capsys)
    assert "--init-image" in msg and str(text) in msg and "not an image" in msg
    good = tmp_path / "good.png"
    from PIL import Image
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(good)
    msg = sample_error([*model, "--init-image", str(good), "--mask", str(text)], capsys)
    assert "--mask" in msg and str(text) in msg
    out = tmp_path / "taken"
    out.write_text("")
    assert f"--out {out} is a file" in sample_error([*model, "--out", str(out)], capsys)
    assert "--prompts-file: no such file" in sample_error([*model, "--prompts-file", str(tmp_path / "p.txt")], capsys)
    cut = tmp_path / "cut.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)).save(cut)
    cut.write_bytes(cut.read_bytes()[:3000])
    assert f"--init-image: {cut} cannot be decoded" in sample_error([*model, "--init-image", str(cut)], capsys)


def test_sample_refuses_non_finite_numbers(torch_folder, capsys):
    for flag in ("--guidance", "--eta", "--strength"):
        for value in ("nan", "inf", "-inf"):
            with pytest.raises(SystemExit) as e:
                sample.main(["--model", torch_folder[1], "--prompt", "a", f"{flag}={value}"])
            assert e.value.code == 2
            err = capsys.readouterr().err
            assert f"sample.py: error: argument {flag}: must be a finite number, got '{value}'" in err and "Traceback" not in err
    # the library refuses them too, before anything is compiled
    sd = StableDiffusion.load(torch_folder[1])
    for name in ("guidance_scale", "guidance_rescale", "eta", "strength"):
        with pytest.raises(ValueError, match=f"{name} must be a finite number, got nan"):
            sd.generate("a", num_steps=2, progress=False, **{name: float("nan")})
    assert sd.compile_count == 0
    with pytest.raises(SystemExit, match="unknown sampler"):  # library ValueErrors reach the CLI's one line
        sample.main(["--model", torch_folder[1], "--prompt", "a", "--sampler", "nope"])
    for kernel in ("flash", "cudnn"):  # accelerator kernels forced on a CPU: said before loading, not at lowering
        msg = sample_error(["--model", torch_folder[1], "--attention", kernel], capsys)
        assert f"attention {kernel!r} is a GPU/TPU kernel" in msg


def train_error(tmp_path, overrides, capsys, monkeypatch):
    """train.py's exit message with the config's fields set as `--config.key=value` would set them."""
    from absl import flags
    argv = ["train.py", f"--config={ROOT}/configs/train/tiny.py", f"--workdir={tmp_path / 'run'}"]
    monkeypatch.setattr(sys, "argv", argv)  # config_flags defines --config.x flags from sys.argv: none here,
    flags.FLAGS(argv)                       # so re-parsing (a fresh config each time) defines nothing twice
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = flags.FLAGS.config
        for name in parents:
            node = node[name]
        node[leaf] = value
    return _one_line_exit("train.py", train.main, ["train.py"], capsys)


def test_train_bad_config_and_data(tmp_path, capsys, monkeypatch):
    fails = lambda **overrides: train_error(tmp_path, overrides, capsys, monkeypatch)  # noqa: E731
    msg = fails(**{"data.source": "folder", "data.path": str(tmp_path / "missing")})
    assert "needs a folder of images" in msg and str(tmp_path / "missing") in msg
    msg = fails(**{"data.source": "jsonl", "data.path": str(tmp_path / "x.jsonl")})
    assert "x.jsonl" in msg
    msg = fails(**{"batch_size": 3, "optimizer.grad_accum_steps": 2})
    assert "grad_accum_steps=2 must divide batch_size=3" in msg
    msg = fails(pretrained=str(tmp_path / "no_model"))
    assert "no_model" in msg
    assert not os.path.exists(tmp_path / "run")  # each failed before anything was set up


def test_train_batch_not_divisible_by_devices(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2")
    proc = subprocess.run([sys.executable, "train.py", "--config=configs/train/tiny.py", f"--workdir={tmp_path}",
                           "--config.batch_size=3"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "train.py: train config: batch_size=3 must be a multiple of the 2 devices" in proc.stderr

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
from safetensors.numpy import save_file

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


# Bad input to sample.py and the message it ends with: (argv after --prompt a --model <tiny SD folder>, the
# message). Exit 2 rows are argparse's own "sample.py: error: argument ...: ..." line (after the usage line).
SAMPLE_BAD_INPUT = [
    (["--steps", "0"], "num_steps must be an integer >= 1, got 0"),
    (["--steps", "x"], "argument --steps: invalid int value: 'x'"),
    (["--steps", "1001"], "num_steps must be in [1, 1000], got 1001"),
    (["--num-images", "0"], "--num-images must be >= 1, got 0"),
    (["--seed", "-1"], "seed must be an integer in [0, 2^32 - 1] for 1 image(s), got -1"),
    (["--seed", "4294967296"], "seed must be an integer in [0, 2^32 - 1] for 1 image(s), got 4294967296"),
    (["--seed", "4294967295", "--num-images", "2"], "seed must be an integer in [0, 2^32 - 2] for 2 image(s)"),
    (["--height", "31"], "height and width must be positive multiples of 2, got 31x"),
    (["--width", "-8"], "height and width must be positive multiples of 2, got "),
    (["--clip-skip", "99"], "clip_skip must be an integer in [0, 1], got 99"),
    (["--clip-skip", "-1"], "clip_skip must be an integer in [0, 1], got -1"),
    (["--sampler", "nope"], "unknown sampler 'nope'; valid: ddim, ddpm, deis,"),
    (["--sigmas", "karras", "--sampler", "ddim"], "sampler 'ddim' does not take options ['use_karras_sigmas']; "
                                                   "it takes ['eta']"),
    (["--sigmas", "karras", "--sampler", "lcm"], "sampler 'lcm' does not take options ['use_karras_sigmas']"),
    (["--sigmas", "nope"], "argument --sigmas: invalid choice: 'nope' (choose from 'karras', 'exponential', 'beta')"),
    (["--eta", "-1", "--sampler", "ddim"], "eta must be in [0, 1], got -1.0"),
    (["--eta", "2", "--sampler", "tcd"], "eta must be in [0, 1], got 2.0"),
    (["--eta", "0.5", "--sampler", "euler"], "--eta is for the samplers ddim, tcd; euler takes none"),
    (["--strength", "0.5"], "--strength is for img2img and inpainting: give --init-image"),
    (["--refiner-start", "0.7"], "--refiner-start is for --refiner: give the refiner model too"),
    (["--refiner", "."], "--prompt-2, --negative-prompt-2 and --refiner are for SDXL models"),
    (["--prompt-2", "b"], "--prompt-2, --negative-prompt-2 and --refiner are for SDXL models"),
    (["--dtype", "float16"], "argument --dtype: invalid choice: 'float16'"),
    (["--attention", "nope"], "argument --attention: invalid choice: 'nope'"),
    (["--attention", "flash"], "attention 'flash' is a GPU/TPU kernel and jax computes on the CPU here"),
    (["--attention", "cudnn"], "attention 'cudnn' is a GPU/TPU kernel and jax computes on the CPU here"),
    (["--config-name", "sd21"], "config_name applies to single-file checkpoints"),
    (["--raw-weights"], "use_ema applies to single-file checkpoints"),
    (["--vae", "/nope"], "weights file not found: /nope"),
    (["--lora", "nope.safetensors"], "--lora: no such file: nope.safetensors"),
    (["--lora", r"C:\loras\x.safetensors:0.5"], r"--lora: no such file: C:\loras\x.safetensors"),  # the scale
    (["--lora", "loha.safetensors:x"], "--lora: no such file: loha.safetensors:x"),  # no scale: part of the path
    (["--lora", "loha.safetensors:nan"], "argument --lora: must be a finite number, got 'nan'"),
    (["--lora", "loha.safetensors"], "loha.safetensors: a LoHa file (keys like lora_unet_conv_in.hada_w1_a, "
                                     "lora_unet_conv_in.hada_w1_b), not a LoRA; sdjax loads LoRA/LoCon files"),
    (["--embedding", "nope.pt"], "--embedding: no such file: nope.pt"),
    (["--embedding", "loha.safetensors"], "loha.safetensors: not a textual-inversion embedding (tensors: "
                                          "lora_unet_conv_in.hada_w1_a, lora_unet_conv_in.hada_w1_b); sdjax loads"),
    (["--compilation-cache", "README.md"], "--compilation-cache README.md is a file; give a folder (or 'off')"),
    *[([f"{flag}={value}"], f"argument {flag}: must be a finite number, got '{value}'")
      for flag in ("--guidance", "--eta", "--strength", "--refiner-start", "--control-scale", "--control-start",
                   "--control-end") for value in ("nan", "inf", "-inf")],
    (["--controlnet", "."], "--controlnet and --control-image come in pairs: got 1 ControlNet(s) and 0 image(s)"),
    (["--control-image", "x.png"], "--controlnet and --control-image come in pairs: got 0 ControlNet(s) and 1 image"),
    (["--guess-mode", "--control-end", "0.5"], "--guess-mode, --control-end: for ControlNets; give --controlnet PATH"),
    (["--controlnet", "nope", "--control-image", "x.png"], "--controlnet: no such folder or file: nope"),
    (["--controlnet", ".", "--control-image", "x.png", "--control-scale", "1", "--control-scale", "2"],
     "--control-scale: one per --controlnet (1), got 2"),
    (["--controlnet", ".", "--control-image", "x.png", "--control-preprocess", "canny", "--control-preprocess",
      "none"], "--control-preprocess: one for all control images or one per --controlnet (1), got 2"),
    (["--control-preprocess", "sobel"], "argument --control-preprocess: invalid choice: 'sobel'"),
    (["--controlnet", ".", "--control-image", "x.png"], "--control-image: no such file: x.png"),
    (["--controlnet", ".", "--control-image", "README.md"], "--control-image: README.md is not an image Pillow can"),
]


def cli_message(main, argv, capsys):
    """(exit code, the one line main(argv) ends with): SystemExit's message, or argparse's error line."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if isinstance(e.value.code, str):
        assert "\n" not in e.value.code, e.value.code
        return 1, e.value.code
    lines = err.strip().splitlines()
    assert e.value.code == 2 and lines[-1].startswith(f"{main.__module__}.py: error: "), err
    return 2, lines[-1]


@pytest.mark.parametrize("argv,message", SAMPLE_BAD_INPUT, ids=[" ".join(a) for a, _ in SAMPLE_BAD_INPUT])
def test_sample_bad_input_table(argv, message, tmp_path, torch_folder, capsys):
    (tmp_path / "README.md").write_text("a file, not a folder")
    save_file({f"lora_unet_conv_in.hada_w1_{x}": np.ones((2, 2), np.float32) for x in "ab"},
              tmp_path / "loha.safetensors")
    code, line = cli_message(sample.main, ["--model", torch_folder[1], "--prompt", "a", *argv], capsys)
    assert message in line and line.startswith("sample.py: "), line
    assert not os.path.exists(tmp_path / "outputs")


def test_canny_without_opencv_is_one_line(torch_folder, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "cv2", None)  # as if OpenCV were not installed
    msg = sample_error(["--model", torch_folder[1], "--controlnet", ".", "--control-image", "x.png",
                        "--control-preprocess", "canny"], capsys)
    assert msg == "sample.py: --control-preprocess canny needs OpenCV: pip install 'sdjax[canny]'"


def test_library_refuses_what_the_cli_does(torch_folder):
    """The same checks guard StableDiffusion.generate, before anything is compiled."""
    sd = StableDiffusion.load(torch_folder[1])
    for name in ("guidance_scale", "guidance_rescale", "eta", "strength"):
        with pytest.raises(ValueError, match=f"{name} must be a finite number, got nan"):
            sd.generate("a", num_steps=2, progress=False, **{name: float("nan")})
    with pytest.raises(ValueError, match="num_images_per_prompt must be an integer >= 1, got 0"):
        sd.generate("a", num_steps=2, progress=False, num_images_per_prompt=0)
    with pytest.raises(ValueError, match=r"eta must be in \[0, 1\], got 1.5"):
        sd.generate("a", num_steps=2, progress=False, sampler="ddim", eta=1.5)
    for seeds in ([1], [1, 2, 3], [1, -2], [1, 2 ** 32]):  # a list: one seed in [0, 2^32) per image
        with pytest.raises(ValueError, match=r"seed: a list of seeds must hold 2 integers in \[0, 2\^32\)"):
            sd.generate(["a", "b"], num_steps=2, progress=False, seed=seeds)
    assert sd.compile_count == 0


def train_error(tmp_path, overrides, capsys, monkeypatch, more_flags=()):
    """train.py's exit message with the config's fields set as `--config.key=value` would set them (on
    configs/train/tiny.py, its LoRA variant when a `lora.` field is set, or the file of a "config" entry), and
    `more_flags` (for this call only)."""
    from absl import flags
    overrides = dict(overrides)
    variant = ":lora" if any(k.startswith("lora.") for k in overrides) else ""
    config = overrides.pop("config", f"tiny.py{variant}")
    argv = ["train.py", f"--config={ROOT}/configs/train/{config}", f"--workdir={tmp_path / 'run'}", *more_flags]
    monkeypatch.setattr(sys, "argv", argv)  # config_flags defines --config.x flags from sys.argv: none here,
    flags.FLAGS(argv)                       # so re-parsing (a fresh config each time) defines nothing twice
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = flags.FLAGS.config
        for name in parents:
            node = node[name]
        node[leaf] = value
    try:
        return _one_line_exit("train.py", train.main, ["train.py"], capsys)
    finally:
        flags.FLAGS.unparse_flags()  # the next call's flags start from their defaults


# Bad training configs (`--config.key=value` overrides of configs/train/tiny.py) and train.py's one line.
TRAIN_BAD_CONFIG = [
    ({"batch_size": 0}, "batch_size must be >= 1, got 0"),
    ({"total_steps": 0}, "total_steps must be >= 1, got 0"),
    ({"seed": -1}, "seed must be an integer in [0, 2^32), got -1"),
    ({"batch_size": 3, "optimizer.grad_accum_steps": 2}, "grad_accum_steps=2 must divide batch_size=3"),
    ({"optimizer.schedule": "nope"}, "optimizer.schedule must be one of ('cosine', 'constant'), got 'nope'"),
    ({"optimizer.learning_rate": -1.0}, "optimizer.learning_rate must be > 0, got -1.0"),
    ({"optimizer.warmup_steps": -1}, "optimizer.warmup_steps must be >= 0, got -1"),
    ({"optimizer.decay_steps": -5}, "optimizer.decay_steps must be >= 0, got -5"),
    ({"optimizer.weight_decay": -1.0}, "optimizer.weight_decay must be >= 0, got -1.0"),
    ({"optimizer.grad_clip_norm": -1.0}, "optimizer.grad_clip_norm must be >= 0, got -1.0"),
    ({"optimizer.b1": 1.5}, "optimizer.b1 must be in [0, 1), got 1.5"),
    ({"optimizer.eps": 0.0}, "optimizer.eps must be > 0, got 0.0"),
    ({"ema_decay": 1.0}, "ema_decay must be in [0, 1), got 1.0"),
    ({"precision.compute_dtype": "float16"}, "precision.compute_dtype must be one of ['bfloat16', 'float32']"),
    ({"precision.matmul": "nope"}, "precision.matmul must be one of ('', 'default', 'high', 'highest',"),
    ({"attention": "nope"}, "attention must be one of ('auto', 'flash', 'chunked', 'xla', 'cudnn'), got 'nope'"),
    ({"attention": "flash"}, "attention 'flash' is a GPU/TPU kernel and jax computes on the CPU here"),
    ({"max_bad_steps": 0}, "max_bad_steps must be >= 1, got 0"),
    ({"keep_checkpoints": 0}, "keep_checkpoints must be >= 1 (or None: keep all), got 0"),
    ({"log_every": 0}, "checkpoint_every and log_every must be >= 1"),
    ({"loss.prediction_type": "nope"}, "loss.prediction_type must be one of ('epsilon', 'v_prediction', 'sample')"),
    ({"loss.caption_dropout": 2.0}, "loss.caption_dropout must be in [0, 1], got 2.0"),
    ({"loss.latent": "nope"}, "loss.latent must be one of ('sample', 'mean'), got 'nope'"),
    ({"mesh.fsdp": 3}, "mesh: 3 does not divide the 1 devices"),
    ({"mesh.data": 5}, "mesh: data x fsdp = 5 x 1 != 1 devices"),
    ({"config": "controlnet.py", "data.conditioning_image": ""}, "data.conditioning_image is empty: the controlnet stage trains on (image, conditioning"),
    ({"config": "controlnet.py", "sample.every": 5},
     "sample.every: sampling during ControlNet training needs control images"),
    ({"config": "controlnet.py", "train_text_encoder": True},
     "train_text_encoder: the controlnet stage trains the ControlNet alone"),
    ({"eval.every": -1}, "eval.every must be >= 0 (0: never), got -1"),
    ({"eval.every": 5, "eval.num_steps": 0, "eval.clip": "{tmp}"}, "eval.num_steps must be >= 1, got 0"),
    ({"eval.every": 5}, "eval needs eval.fid_ref (FID) or eval.clip (CLIP score), or both"),
    ({"eval.every": 5, "eval.clip": "{tmp}"}, "eval.captions: give a captions file"),
    ({"eval.every": 5, "eval.clip": "{tmp}", "eval.captions": "{tmp}/c.tsv"},
     "eval.captions: no such file or folder: {tmp}/c.tsv"),
    ({"sample.every": -1}, "sample.every must be >= 0 (0: never), got -1"),
    ({"sample.every": 5, "sample.num_steps": 0}, "sample.num_steps must be >= 1, got 0"),
    ({"sample.every": 5, "sample.prompts": ()}, "sample.prompts must be a non-empty list of strings, got ()"),
    ({"sample.every": 5, "sample.guidance_scale": float("nan")}, "sample.guidance_scale must be a finite number"),
    ({"data.source": "nope"}, "data config: source must be one of ('shapes', 'folder', 'jsonl', 'csv',"),
    ({"data.source": "folder", "data.path": "{tmp}/missing"}, "needs a folder of images"),
    ({"data.source": "jsonl", "data.path": "{tmp}/x.jsonl"}, "{tmp}/x.jsonl"),
    ({"pretrained": "{tmp}/no_model"}, "{tmp}/no_model"),
    ({"tokenizer": "{tmp}/nope"}, "CLIP tokenizer: {tmp}/nope holds neither tokenizer.json nor vocab.json"),
    ({"textual_inversion.initializer": "toy"}, "textual_inversion.placeholder is empty: give the token the captions "
                                               "write for what is learned (e.g. '<cat-toy>')"),
    ({"textual_inversion.placeholder": "<x>"}, "textual_inversion.initializer is empty: give the token whose "),
    *[({"textual_inversion.placeholder": "<x>", "textual_inversion.initializer": "toy", **more}, message)
      for more, message in [
          ({"textual_inversion.placeholder": "a <x>"}, "textual_inversion.placeholder must be one word, got 'a <x>'"),
          ({"textual_inversion.vectors": 0}, "textual_inversion.vectors must be >= 1, got 0"),
          ({"textual_inversion.template": "a photo"}, "textual_inversion.template must hold {{}} once"),
          ({"train_text_encoder": True}, "textual_inversion trains the placeholder's embedding only: "
                                         "train_text_encoder must be False"),
          ({"data.source": "cache"}, "textual_inversion cannot train from the latent cache (data.source='cache')"),
          ({"textual_inversion.initializer": "a toy"}, "textual_inversion.initializer 'a toy' is 2 tokens for "
                                                       "text_encoder's tokenizer ['a</w>', 'toy</w>']; give one token"),
          ({"textual_inversion.placeholder": "a"}, "textual_inversion.placeholder: the token 'a' is in "
                                                   "text_encoder's vocabulary already; give another token")]],
    ({"dreambooth.instance_prompt": "a photo of sks dog"}, "dreambooth.instance_data_dir is empty: give the folder "),
    ({"dreambooth.instance_data_dir": "{tmp}/missing", "dreambooth.instance_prompt": "a photo of sks dog"},
     "dreambooth.instance_data_dir '{tmp}/missing' is no folder with images"),
    *[({"dreambooth.instance_data_dir": f"{ROOT}/docs", "dreambooth.instance_prompt": "a photo of sks dog",
        "dreambooth.with_prior_preservation": True, "dreambooth.class_prompt": "a photo of dog", **more}, message)
      for more, message in [
          ({"dreambooth.instance_prompt": ""}, "dreambooth.instance_prompt is empty: give the instance images' "),
          ({"dreambooth.class_prompt": ""}, "dreambooth.with_prior_preservation needs dreambooth.class_prompt"),
          ({"dreambooth.num_class_images": 0}, "dreambooth.num_class_images must be >= 1, got 0"),
          ({"dreambooth.prior_loss_weight": -1.0}, "dreambooth.prior_loss_weight must be >= 0, got -1.0"),
          ({"dreambooth.class_data_dir": "{tmp}/nope"}, "dreambooth.class_data_dir '{tmp}/nope' is no folder"),
          ({"batch_size": 6, "optimizer.grad_accum_steps": 2},
           "dreambooth with prior preservation: batch_size=6 must be twice a multiple of optimizer.grad_accum_steps=2"),
          ({"data.source": "cache"}, "dreambooth reads its own images: data.source must not be 'cache'")]],
    ({"lora.rank": 0}, "lora.rank must be an integer >= 1, got 0"),
    ({"lora.alpha": 0.0}, "lora.alpha must be a number > 0, got 0.0"),
    ({"lora.dropout": 1.0}, "lora.dropout must be in [0, 1), got 1.0"),
    ({"lora.targets": ()}, "lora.targets must be a non-empty list of layer-name patterns, got ()"),
    ({"lora.targets": ("to_q", "(")}, "lora.targets: '(' is no regular expression (missing ),"),
    ({"lora.components": ("unet", "vae")}, "lora.components must be a non-empty list of distinct names of ('unet', "
                                           "'text_encoder', 'text_encoder_2'), got ('unet', 'vae')"),
    ({"lora.components": ("text_encoder_2",)}, "lora.components: 'text_encoder_2' is not a component of this model "
                                               "(unet, text_encoder)"),
    ({"lora.targets": ("to_qq",)}, "lora.targets ('to_qq',) name no linear layer of the unet (convolutions: "
                                   "lora.conv is false)"),
    ({"lora.base_dtype": "float16"}, "lora.base_dtype must be one of ('float32', 'bfloat16'), got 'float16'"),
    ({"lora.rank": 4, "train_text_encoder": True}, "train_text_encoder trains the whole tower; with lora, add "
                                                   "text_encoder to lora.components instead"),
    ({"lora.components": ("unet", "text_encoder"), "data.source": "cache"},
     "data.source 'cache' holds the text conditioning: lora.components can only be ('unet',)"),
]


@pytest.mark.parametrize("overrides,message", TRAIN_BAD_CONFIG, ids=[str(o) for o, _ in TRAIN_BAD_CONFIG])
def test_train_bad_config_table(overrides, message, tmp_path, capsys, monkeypatch):
    overrides = {k: v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in overrides.items()}
    line = train_error(tmp_path, overrides, capsys, monkeypatch)
    assert message.format(tmp=tmp_path) in line, line
    assert not os.path.exists(tmp_path / "run")  # each failed before anything was set up


def test_train_bad_export_embedding(tmp_path, capsys, monkeypatch):
    """--export_embedding is checked before anything is set up: a run that trains an embedding, a .safetensors
    file that is no other file (an earlier export's header says so, or --overwrite)."""
    ti = {"textual_inversion.placeholder": "<x>", "textual_inversion.initializer": "toy"}
    (tmp_path / "mine.safetensors").write_bytes(b"not an export")
    cases = [({}, "x.safetensors", "--export_embedding {tmp}/x.safetensors: the run trains no embedding (set "
                                   "textual_inversion.placeholder)"),
             (ti, "x.pt", "--export_embedding {tmp}/x.pt: a .safetensors file is written; name one"),
             (ti, "mine.safetensors", "--export_embedding {tmp}/mine.safetensors: the file exists and is no earlier "
                                      "export (sdjax_export.json in its header): choose another, or replace it with "
                                      "--overwrite")]
    for overrides, name, message in cases:
        line = train_error(tmp_path, overrides, capsys, monkeypatch, [f"--export_embedding={tmp_path / name}"])
        assert line == "train.py: " + message.format(tmp=tmp_path), line
    assert not os.path.exists(tmp_path / "run")


def test_train_bad_lora_export(tmp_path, capsys, monkeypatch):
    """--export_lora is checked before anything is set up: a run without LoRA, a name, a folder, a foreign file."""
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": np.ones(2, np.float32)}, str(foreign))
    cases = [({}, "x.safetensors", "the run trains no LoRA (its config has no `lora` section); export the model with "
              "--export_dir"),
             ({"lora.rank": 2}, "x.pt", "a .safetensors file is written; name one"),
             ({"lora.rank": 2}, f"{tmp_path}/nope/x.safetensors", f"no folder {tmp_path}/nope"),
             ({"lora.rank": 2}, str(foreign), "the file exists and is no earlier export (sdjax_export.json in its "
              "header): choose another, or replace it with --overwrite")]
    for overrides, path, message in cases:
        line = train_error(tmp_path, overrides, capsys, monkeypatch, [f"--export_lora={path}"])
        assert f"train.py: LoRA export {path}: {message}" in line, line
    assert not os.path.exists(tmp_path / "run")


def test_train_batch_not_divisible_by_devices(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2")
    proc = subprocess.run([sys.executable, "train.py", "--config=configs/train/tiny.py", f"--workdir={tmp_path}",
                           "--config.batch_size=3"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "train.py: train config: batch_size=3 must be a multiple of the 2 devices" in proc.stderr

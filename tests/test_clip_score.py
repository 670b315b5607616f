"""CLIP score against torchmetrics' CLIPScore, transformers' CLIPModel and open_clip, on tiny random CLIPs built
and saved here (the folders a user would pass)."""
import dataclasses
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import _randomize
from eval_fakes import build_clip_folder
from sdjax.errors import WeightLoadError
from sdjax.eval import clip_score as cs
from sdjax.weights.clip_model import load_open_clip

# (H, W): landscape whose crop offset rounds differently in transformers and open_clip (35 - 32 = 3 -> 1 or 2),
# portrait, no resize, a downscale of both sides
SIZES = [(40, 44), (56, 40), (32, 32), (64, 48)]
CAPTIONS = ["a red square on a blue field", "two cats sleeping on a sofa", "a bowl of ramen",
            "an old map of the city at night"]
LONG = "a very long caption " + " ".join(f"word{i}" for i in range(90))  # > 77 tokens


TINTS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)]  # noise alone looks alike to a random tower


def _images(seed=0):
    rng = np.random.default_rng(seed)
    return [(0.3 * rng.integers(0, 256, (h, w, 3)) + 0.7 * np.array(tint)).astype(np.uint8)
            for (h, w), tint in zip(SIZES, TINTS)]


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory, tokenizer):
    """A tiny random transformers CLIPModel with its CLIPProcessor, in a folder whose path holds "openai"
    (torchmetrics 1.9 loads local folders only then)."""
    return build_clip_folder(str(tmp_path_factory.mktemp("openai_clip")), tokenizer)


@pytest.fixture(scope="module")
def clip(hf_folder):
    return cs.load_clip(hf_folder)


def _torchmetrics_score(folder, images, captions):
    """(CLIPScore, its per-pair 100 * cosines) of torchmetrics; with transformers 5.2x its CLIPModel's feature calls
    return an output object, not the tensor torchmetrics 1.9 expects (torchmetrics issue #3407): take its
    pooler_output (the projected features)."""
    from torchmetrics.functional.multimodal.clip_score import _clip_score_update
    from torchmetrics.multimodal.clip_score import CLIPScore
    metric = CLIPScore(model_name_or_path=folder)
    model = metric.model
    for name in ("get_image_features", "get_text_features"):
        method = getattr(type(model), name)
        setattr(model, name, lambda *a, _m=method, **k: _m(model, *a, **k).pooler_output)
    tensors = [torch.from_numpy(x).permute(2, 0, 1) for x in images]
    with torch.no_grad():
        per_pair, _ = _clip_score_update(tensors, captions, model, metric.processor)
        metric.update(tensors, captions)
        return float(metric.compute()), per_pair.numpy()


def test_clip_score_matches_torchmetrics(hf_folder, clip):
    images = _images()
    reference, per_pair = _torchmetrics_score(hf_folder, images, CAPTIONS)
    cosines = clip.cosines(images, CAPTIONS)
    np.testing.assert_allclose(100 * cosines, per_pair, atol=1e-3)
    assert reference > 1  # (not the clamp at 0 agreeing)
    assert abs(cs.clip_score(images, CAPTIONS, clip=clip) - reference) < 1e-3
    # the effect: the captions of other images score far off
    assert abs(cs.clip_score(images, CAPTIONS[1:] + CAPTIONS[:1], clip=clip) - reference) > 1


def test_score_clamps_the_mean():
    assert cs.score([-0.2, 0.1]) == 0.0
    assert cs.score([-0.2, 0.3]) == pytest.approx(5.0)  # clamping each pair first would give 15


def test_embeddings_match_transformers(hf_folder, clip):
    import transformers
    model = transformers.CLIPModel.from_pretrained(hf_folder)
    processor = transformers.CLIPProcessor.from_pretrained(hf_folder)
    images = _images(1)
    pixels = processor(images=[torch.from_numpy(x).permute(2, 0, 1) for x in images],
                       return_tensors="pt")["pixel_values"]
    captions = CAPTIONS[:3] + [LONG]
    text = processor(text=captions, return_tensors="pt", padding=True, truncation=True, max_length=77)
    with torch.no_grad():
        image_ref = model.get_image_features(pixels).pooler_output.numpy()
        text_ref = model.get_text_features(text["input_ids"], text["attention_mask"]).pooler_output.numpy()
    # the towers on the processor's pixels
    module, params = clip.module, clip.params
    ours = module.apply({"params": params}, pixels.permute(0, 2, 3, 1).numpy(), method=module.image_embeds)
    np.testing.assert_allclose(np.asarray(ours), image_ref, atol=1e-4)
    np.testing.assert_allclose(clip.text_embeds(captions), text_ref, atol=1e-4)  # the long one cut keeping EOT
    # the preprocessing (torchvision's resize of uint8, bit for bit), then the whole
    crops = clip.transform(images)
    np.testing.assert_allclose(clip.transform.normalize(crops), pixels.permute(0, 2, 3, 1).numpy(), atol=1e-6)
    np.testing.assert_allclose(clip.image_embeds(images), image_ref, atol=1e-4)
    # (Pillow's resize, open_clip's, is a level or more off in places: far above that tolerance)
    pillow = dataclasses.replace(clip.transform, library="open_clip")
    assert np.abs(pillow.normalize(pillow(images)) - pixels.permute(0, 2, 3, 1).numpy()).max() > 0.01


@pytest.fixture(scope="module")
def open_clip_file(tmp_path_factory):
    """A tiny random open_clip CLIP (exact GELU, its head width and MLP ratio not the defaults) saved as
    open_clip_pytorch_model.bin, with its config beside it as hub folders hold it; and the torch model."""
    import open_clip
    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16,
                                           "patch_size": 8, "mlp_ratio": 3.0},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2}}
    model = _randomize(open_clip.CLIP(**cfg), 4).eval()
    folder = tmp_path_factory.mktemp("open_clip")
    torch.save(model.state_dict(), folder / "open_clip_pytorch_model.bin")
    with open(folder / "open_clip_config.json", "w") as f:
        json.dump({"model_cfg": cfg, "preprocess_cfg": {}}, f)
    return str(folder), model


def test_open_clip_matches(open_clip_file):
    import open_clip
    folder, model = open_clip_file
    clip = cs.load_clip(folder)
    images, captions = _images(2), CAPTIONS[:3] + [LONG]
    preprocess = open_clip.image_transform(32, is_train=False)
    pixels = torch.stack([preprocess(Image.fromarray(x)) for x in images])
    with torch.no_grad():
        image_ref = model.encode_image(pixels).numpy()
        text_ref = model.encode_text(open_clip.tokenize(captions)).numpy()
    crops = clip.transform(images)  # Pillow's resize, torchvision's crop offsets
    np.testing.assert_allclose(clip.transform.normalize(crops), pixels.permute(0, 2, 3, 1).numpy(), atol=1e-6)
    np.testing.assert_allclose(clip.image_embeds(images), image_ref, atol=1e-4)
    np.testing.assert_allclose(clip.text_embeds(captions), text_ref, atol=1e-4)
    # the effect of the crop rounding (transformers' offset on the first image) is far above that tolerance
    floor = clip.transform.normalize(clip.transform.resize(images[0])[None, :, 1:33])
    assert np.abs(floor[0] - pixels[0].permute(1, 2, 0).numpy()).max() > 0.5


def test_open_clip_config_must_fit(open_clip_file):
    path = os.path.join(open_clip_file[0], "open_clip_pytorch_model.bin")
    vision = {"image_size": 32, "layers": 2, "width": 48, "head_width": 16, "patch_size": 8}
    config = {"embed_dim": 16, "vision_cfg": vision, "text_cfg": {"width": 32, "heads": 4, "layers": 2}}
    with pytest.raises(WeightLoadError, match=r"shape mismatch for .*: the model expects \(.*48\)"):
        load_open_clip(path, config=config)
    with pytest.raises(WeightLoadError, match="vision_cfg.pool_type = 'avg' is not implemented"):
        load_open_clip(path, config={**config, "vision_cfg": {"pool_type": "avg"}})


def test_cli(tmp_path, hf_folder, clip, capsys):
    images = _images(3)
    rows = []
    for i, (image, caption) in enumerate(zip(images, CAPTIONS)):
        Image.fromarray(image).save(tmp_path / f"{i}.png")
        rows.append(json.dumps({"file": f"{i}.png", "caption": caption}))
    (tmp_path / "captions.jsonl").write_text("\n".join(rows) + "\n")
    cs.main([str(tmp_path), "--captions", str(tmp_path / "captions.jsonl"), "--clip", hf_folder])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"CLIP score: {cs.clip_score(images, CAPTIONS, clip=clip)}"
    Image.fromarray(images[0]).save(tmp_path / "extra.png")
    with pytest.raises(SystemExit, match=r"1 images have no row \(e.g. \['extra.png'\]\)"):
        cs.main([str(tmp_path), "--captions", str(tmp_path / "captions.jsonl"), "--clip", hf_folder])


@pytest.mark.slow
def test_batches_split_over_devices(hf_folder, clip):
    """Two devices, batches of 4 (5 images: one padded): the cosines of one device's."""
    import subprocess
    import sys
    code = ("import json, sys, numpy as np; from sdjax.eval.clip_score import load_clip; "
            "rng = np.random.default_rng(0); images = rng.integers(0, 256, (5, 48, 40, 3), dtype=np.uint8); "
            "clip = load_clip(sys.argv[1], batch_size=2); assert clip.mesh.size == 2; "
            "print(json.dumps(clip.cosines(images, [f'caption {i}' for i in range(5)]).tolist()))")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    out = subprocess.run([sys.executable, "-c", code, hf_folder], env=env, capture_output=True, text=True, check=True)
    images = np.random.default_rng(0).integers(0, 256, (5, 48, 40, 3), dtype=np.uint8)
    expected = clip.cosines(images, [f"caption {i}" for i in range(5)])
    np.testing.assert_allclose(json.loads(out.stdout.splitlines()[-1]), expected, atol=1e-6)

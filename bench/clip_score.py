"""CLIP score throughput on this machine's CPU: sdjax's `CLIP.cosines` against torchmetrics' `CLIPScore.update` (the
transformers CLIPModel and CLIPProcessor), on a random CLIP of OpenAI's architecture saved as a transformers folder,
scoring uint8 images with their captions. Images per second of each, the ratio, and the image tower alone.
    python bench/clip_score.py [--arch B-32|L-14|H-14] [--images 64] [--size 512] [--batch 32]
"""
import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ARCHS = {  # (vision width, layers, heads, patch), (text width, layers, heads), projection: OpenAI's and MLPerf's
    "B-32": ((768, 12, 12, 32), (512, 12, 8), 512),
    "L-14": ((1024, 24, 16, 14), (768, 12, 12), 768),
    "H-14": ((1280, 32, 16, 14), (1024, 24, 16), 1024),
}


def save_random_clip(arch, folder):
    import transformers
    from sdjax.text.clip_vocab import write_clip_tokenizer
    (vw, vl, vh, patch), (tw, tl, th), proj = ARCHS[arch]
    config = transformers.CLIPConfig(
        text_config=dict(hidden_size=tw, intermediate_size=4 * tw, num_hidden_layers=tl, num_attention_heads=th),
        vision_config=dict(hidden_size=vw, intermediate_size=4 * vw, num_hidden_layers=vl, num_attention_heads=vh,
                           patch_size=patch, image_size=224), projection_dim=proj)
    transformers.CLIPModel(config).save_pretrained(folder)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(write_clip_tokenizer(os.path.join(folder, "_tok")))
    transformers.CLIPProcessor(image_processor=transformers.CLIPImageProcessor(), tokenizer=tokenizer
                               ).save_pretrained(folder)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--arch", default="B-32", choices=sorted(ARCHS))
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--size", type=int, default=512, help="side of the square uint8 input images")
    p.add_argument("--batch", type=int, default=32)
    a = p.parse_args()
    from tests.torchvision_ops import torchvision_without_ops
    torchvision_without_ops()  # before torchmetrics imports it
    import numpy as np
    import torch
    from torchmetrics.multimodal.clip_score import CLIPScore
    from sdjax.eval.clip_score import load_clip

    folder = tempfile.mkdtemp(prefix="openai_clip_")  # torchmetrics loads local folders named so only
    save_random_clip(a.arch, folder)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (a.images, a.size, a.size, 3), dtype=np.uint8)
    captions = [f"a photo of object number {i} on a wooden table" for i in range(a.images)]
    batches = [(images[i:i + a.batch], captions[i:i + a.batch]) for i in range(0, a.images, a.batch)]

    metric = CLIPScore(model_name_or_path=folder)
    model = metric.model  # transformers 5.2x returns output objects; torchmetrics 1.9 wants the tensor (#3407)
    for name in ("get_image_features", "get_text_features"):
        method = getattr(type(model), name)
        setattr(model, name, lambda *x, _m=method, **k: _m(model, *x, **k).pooler_output)
    tensors = [(torch.from_numpy(x).permute(0, 3, 1, 2), c) for x, c in batches]
    clip = load_clip(folder, batch_size=a.batch)

    def torch_update():
        with torch.no_grad():
            for x, c in tensors:
                metric.update(x, c)

    def torch_images():
        with torch.no_grad():
            for x, _ in tensors:
                pixels = metric.processor(images=list(x), return_tensors="pt")["pixel_values"]
                model.get_image_features(pixels)

    def sdjax_update():
        for x, c in batches:
            clip.cosines(x, c)

    def sdjax_images():
        for x, _ in batches:
            clip.image_embeds(x)

    t0 = time.perf_counter()
    sdjax_update()  # compiles
    print(f"sdjax first pass (compiles): {time.perf_counter() - t0:.1f} s", flush=True)
    torch_update()  # warm-up
    rows = []
    for label, ours, theirs in (("images + captions (CLIPScore.update)", sdjax_update, torch_update),
                                ("image tower + preprocessing", sdjax_images, torch_images)):
        times = {}
        for side, fn in (("sdjax", ours), ("torchmetrics", theirs)):
            runs = []
            for _ in range(2):
                t0 = time.perf_counter()
                fn()
                runs.append(time.perf_counter() - t0)
            times[side] = min(runs)
        rows.append((label, a.images / times["sdjax"], a.images / times["torchmetrics"]))
    print(f"CLIP ViT-{a.arch}, {a.images} images {a.size}² uint8, batch {a.batch}, torch threads "
          f"{torch.get_num_threads()}")
    print(f"{'':40s} {'sdjax img/s':>12s} {'torch img/s':>12s} {'ratio':>6s}")
    for label, ours, theirs in rows:
        print(f"{label:40s} {ours:12.2f} {theirs:12.2f} {ours / theirs:6.2f}")


if __name__ == "__main__":
    main()

"""Score a text-to-image model on captioned-shapes prompts with a deterministic pixel detector.

    python -m sdjax.eval.shapes [--model PATH] [--seeds 4] [--steps 25] [--guidance 5] [--grid grid.png]

For each single-shape prompt ("a red circle", "a blue square on the left", ...), seen and held-out
colour-shape combinations, the detector reads colour, shape and position off the generated pixels
(no learned model) and the script prints per-attribute accuracy.
"""
import argparse
import json

import numpy as np
from scipy import ndimage

from sdjax.data import synthetic_shapes as shapes

PALETTE = {name: np.array(rgb) >= 128 for name, rgb in shapes.COLORS.items()}
FOREGROUND = 127  # brightest channel above half: blurred edges cut at their middle


def detect(image):
    """uint8 [H, W, 3] -> {"color", "shape", "position", "size"} of the largest object, or None if blank."""
    fg = image.max(-1) > FOREGROUND
    labels, n = ndimage.label(fg)
    if n == 0:
        return None
    sizes = ndimage.sum(fg, labels, range(1, n + 1))
    ys, xs = np.nonzero(labels == 1 + int(np.argmax(sizes)))
    if len(ys) < 4:
        return None
    bits = image[ys, xs].mean(0) >= 128
    color = next((c for c, p in PALETTE.items() if (p == bits).all()), "other")
    h, w = np.ptp(ys) + 1, np.ptp(xs) + 1
    # How full the corners of the bounding box are: a square fills all four, an upward
    # triangle only the bottom two (its base ends), a circle none.
    box = np.zeros((h, w), bool)
    box[ys - ys.min(), xs - xs.min()] = True
    ch, cw = max(h // 5, 1), max(w // 5, 1)
    top = (box[:ch, :cw].mean() + box[:ch, -cw:].mean()) / 2
    bottom = (box[-ch:, :cw].mean() + box[-ch:, -cw:].mean()) / 2
    shape = "square" if top > 0.5 and bottom > 0.5 else "triangle" if bottom > top + 0.2 else "circle"
    scale = image.shape[1] / shapes.SIZE
    cx, cy = xs.mean() / scale, ys.mean() / scale
    if abs(cx - 32) < 8 and abs(cy - 32) < 8:
        position = "center"
    elif abs(cx - 32) >= abs(cy - 32):
        position = "left" if cx < 32 else "right"
    else:
        position = "top" if cy < 32 else "bottom"
    return {"color": color, "shape": shape, "position": position, "size": w / scale}


def prompts():
    """[(prompt, {"color", "shape", "position" (or None)}, held_out)] of the fixed evaluation set."""
    out = []
    for color in shapes.COLORS:
        for shape in shapes.SHAPES:
            for position in (None, "left", "right", "top", "bottom"):
                item = shapes.Item(shape, color, None, position)
                out.append((shapes.caption((item,)), {"color": color, "shape": shape, "position": position},
                            (color, shape) in shapes.HELD_OUT))
    return out


def score(images, targets):
    """Per-attribute accuracy of detected vs target attributes (position only where the prompt names it)."""
    hits = {"color": [], "shape": [], "position": []}
    for image, target in zip(images, targets):
        found = detect(image) or {}
        for key in hits:
            if target[key] is not None:
                hits[key].append(found.get(key) == target[key])
    return {k: float(np.mean(v)) if v else float("nan") for k, v in hits.items()}


def evaluate(sd, seeds=4, num_steps=25, guidance_scale=5.0, sampler="dpmpp_2m", batch=64):
    """{"seen": {attr: acc}, "held_out": {attr: acc}} plus the images per prompt set."""
    rows = [(p, t, h) for p, t, h in prompts() for _ in range(seeds)]
    images = []
    for i in range(0, len(rows), batch):
        chunk = [p for p, _, _ in rows[i:i + batch]]
        images.append(sd.generate(chunk, num_steps=num_steps, guidance_scale=guidance_scale,
                                  sampler=sampler, seed=i, progress=False))
    images = np.concatenate(images)
    result = {}
    for name, held in (("seen", False), ("held_out", True)):
        idx = [k for k, (_, _, h) in enumerate(rows) if h == held]
        result[name] = score(images[idx], [rows[k][1] for k in idx])
    return result, images, rows


def main(argv=None):
    from sdjax.demo import DEMO_MODEL
    from sdjax.images import make_grid, save_png
    from sdjax.pipeline import StableDiffusion
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEMO_MODEL)
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--sampler", default="dpmpp_2m")
    p.add_argument("--grid", default=None, help="write a grid of the first image of some prompts")
    a = p.parse_args(argv)
    sd = StableDiffusion.load(a.model)
    result, images, rows = evaluate(sd, a.seeds, a.steps, a.guidance, a.sampler)
    for name, acc in result.items():
        print(f"{name:9s} " + "  ".join(f"{k} {v:.1%}" for k, v in acc.items()))
    print(json.dumps(result))
    if a.grid:
        pick = [k for k in range(0, len(rows), a.seeds * 5)][:21]
        save_png(make_grid(images[pick], cols=7), a.grid, {"prompts": " | ".join(rows[k][0] for k in pick)})
    return result


if __name__ == "__main__":
    main()

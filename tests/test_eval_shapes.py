"""The shapes detector reads back what `shapes.render` drew, also through blur and noise."""
import numpy as np
import pytest
from scipy import ndimage

from sdjax.data import synthetic_shapes as shapes
from sdjax.eval.shapes import detect, prompts, score


def _degrade(image, rng):
    """What a generator's imperfect output looks like: soft edges and speckle."""
    soft = ndimage.gaussian_filter(image.astype(np.float32), sigma=(0.8, 0.8, 0))
    return np.clip(soft + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("size", [None, "small", "large"])
def test_detector_recovers_rendered_attributes(size):
    rng = np.random.default_rng(0)
    for color in shapes.COLORS:
        for shape in shapes.SHAPES:
            for position in ("left", "right", "top", "bottom", "center"):
                item = shapes.Item(shape, color, size, position)
                found = detect(_degrade(shapes.render((item,)), rng))
                assert (found["color"], found["shape"], found["position"]) == (color, shape, position), item


def test_blank_image_detects_nothing_and_scores_zero():
    blank = np.zeros((64, 64, 3), np.uint8)
    assert detect(blank) is None
    acc = score([blank], [{"color": "red", "shape": "circle", "position": "left"}])
    assert acc == {"color": 0.0, "shape": 0.0, "position": 0.0}


def test_prompt_set_covers_seen_and_held_out():
    rows = prompts()
    held = {(t["color"], t["shape"]) for _, t, h in rows if h}
    assert held == set(shapes.HELD_OUT) and len(rows) == 7 * 3 * 5
    perfect = [shapes.render((shapes.Item(t["shape"], t["color"], None, t["position"]),)) for _, t, _ in rows]
    assert score(perfect, [t for _, t, _ in rows]) == {"color": 1.0, "shape": 1.0, "position": 1.0}

"""Captioned shapes: captions re-derived from the stored pixels, held-out combinations, determinism."""
import re

import numpy as np
import pytest
from scipy import ndimage

from sdjax.data import synthetic_shapes as shapes

RGB = {(255, 0, 0): "red", (0, 255, 0): "green", (0, 0, 255): "blue", (255, 255, 0): "yellow",
       (255, 0, 255): "magenta", (0, 255, 255): "cyan", (255, 255, 255): "white"}
NOUN = r"a (?:(small|large) )?(\w+) (circle|square|triangle)"
ONE = re.compile(rf"^{NOUN}(?: (on the left|on the right|at the top|at the bottom|in the center))?$")
TWO = re.compile(rf"^{NOUN} (above|below|to the left of|to the right of) {NOUN}$")
PLACE = {"on the left": "left", "on the right": "right", "at the top": "top", "at the bottom": "bottom",
         "in the center": "center", None: "center"}


def detect(image):
    """Objects seen in the pixels: [(shape, colour, size word, place word, centre (x, y))]."""
    labels, n = ndimage.label(image.any(-1))
    found = []
    for k in range(1, n + 1):
        ys, xs = np.nonzero(labels == k)
        colours = np.unique(image[ys, xs], axis=0)
        assert len(colours) == 1, "one flat colour per shape"
        h, w = np.ptp(ys) + 1, np.ptp(xs) + 1
        fill = len(ys) / (h * w)
        top_row, bottom_row = (xs[ys == ys.min()].size, xs[ys == ys.max()].size)
        if fill > 0.95:
            shape = "square"
        elif 0.65 < fill < 0.9 and abs(top_row - bottom_row) <= 1:
            shape = "circle"
        else:
            assert fill < 0.65 and top_row < bottom_row / 3, (fill, top_row, bottom_row)
            shape = "triangle"
        size = "small" if w < 16 else "large" if w > 24 else None
        cx, cy = xs.mean(), (ys.min() + ys.max() + 1) / 2
        place = ("left" if cx < 24 else "right" if cx > 40 else
                 "top" if cy < 24 else "bottom" if cy > 40 else "center")
        found.append((shape, RGB[tuple(int(v) for v in colours[0])], size, place, (cx, cy)))
    return found


def parse(text):
    """Caption -> [(shape, colour, size, place)], second shape's place relative to the first."""
    if m := ONE.match(text):
        size, colour, shape, place = m.groups()
        return [(shape, colour, size, PLACE[place])]
    m = TWO.match(text)
    assert m, f"caption does not follow the grammar: {text!r}"
    s1, c1, h1, rel, s2, c2, h2 = m.groups()
    p1, p2 = {"above": ("top", "bottom"), "below": ("bottom", "top"),
              "to the left of": ("left", "right"), "to the right of": ("right", "left")}[rel]
    return [(h1, c1, s1, p1), (h2, c2, s2, p2)]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    b = shapes.CaptionedShapes(config=shapes.shapes_config(64, 32, 32, seed=3),
                               data_dir=str(tmp_path_factory.mktemp("tfds")), file_format="array_record")
    b.download_and_prepare()
    return b.as_data_source()


def examples(source):
    return [source[i] for i in range(len(source))]


def test_split_sizes(sources):
    assert {k: len(v) for k, v in sources.items()} == {"train": 64, "test": 32, "heldout": 32}


@pytest.mark.parametrize("split", shapes.SPLITS)
def test_captions_match_pixels(sources, split):
    seen = set()
    for ex in examples(sources[split]):
        text = ex["caption"].decode()
        want = sorted(parse(text), key=repr)
        got = sorted((d[:4] for d in detect(ex["image"])), key=repr)
        assert got == want, text
        seen.add(len(want))
        assert ex["image"].shape == (64, 64, 3) and ex["image"].dtype == np.uint8
        np.testing.assert_array_equal(ex["image"], shapes.render(shapes.spec_from_json(ex["spec"])))
        assert shapes.caption(shapes.spec_from_json(ex["spec"])) == text
    assert seen == {1, 2}


def test_two_shape_relation_geometry():
    spec = (shapes.Item("square", "red", "large", "bottom"), shapes.Item("circle", "cyan", None, "top"))
    assert shapes.caption(spec) == "a large red square below a cyan circle"
    (red,) = [d for d in detect(shapes.render(spec)) if d[1] == "red"]
    (cyan,) = [d for d in detect(shapes.render(spec)) if d[1] == "cyan"]
    assert red[4][1] > cyan[4][1] + 20  # below: larger y


def test_held_out_combinations(sources):
    def combos(ex):
        return {(c, s) for s, c, _, _ in parse(ex["caption"].decode())}
    for split in ("train", "test"):
        for ex in examples(sources[split]):
            assert not combos(ex) & shapes.HELD_OUT
    held = [combos(ex) & shapes.HELD_OUT for ex in examples(sources["heldout"])]
    assert all(held) and set().union(*held) == shapes.HELD_OUT


def test_deterministic_from_seed(tmp_path):
    def build(seed, sub):
        b = shapes.CaptionedShapes(config=shapes.shapes_config(16, 4, 4, seed=seed),
                                   data_dir=str(tmp_path / sub), file_format="array_record")
        b.download_and_prepare()
        return sorted(ex["spec"] for ex in examples(b.as_data_source("train")))
    assert build(0, "a") == build(0, "b")
    assert build(0, "a") != build(1, "c")


def test_bad_specs_rejected():
    with pytest.raises(ValueError):
        shapes.render((shapes.Item("hexagon", "red"),))
    with pytest.raises(ValueError):
        shapes.caption((shapes.Item("circle", "red", None, "left"), shapes.Item("square", "blue", None, "top")))

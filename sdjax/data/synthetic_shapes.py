"""Captioned shapes: a procedural 64x64 text-to-image data set (tfds builder, no download, no TF).

A scene is one shape, or two shapes side by side / one above the other, drawn with hard edges
on black. Some colour-shape combinations never appear in the train split (HELD_OUT); the
"heldout" split has at least one of them in every scene, to measure compositional
generalisation. `render` and `caption` are plain functions so an evaluator can use the same
geometry.
"""
import dataclasses
import json
import zlib

import numpy as np
import tensorflow_datasets as tfds

SIZE = 64
SHAPES = ("circle", "square", "triangle")
COLORS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0),
          "magenta": (255, 0, 255), "cyan": (0, 255, 255), "white": (255, 255, 255)}
# Half-extent in pixels; None (size not named in the caption) draws the medium size.
SIZES = {"small": 6, None: 10, "large": 14}
# Centre (x, y); None (position not named) draws in the centre.
POSITIONS = {"left": (16, 32), "right": (48, 32), "top": (32, 16), "bottom": (32, 48),
             "center": (32, 32), None: (32, 32)}
PLACE_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top",
                 "bottom": "at the bottom", "center": "in the center"}
# Positions of (first, second) shape for each relation word of a two-shape caption.
RELATIONS = {("left", "right"): "to the left of", ("right", "left"): "to the right of",
             ("top", "bottom"): "above", ("bottom", "top"): "below"}
HELD_OUT = frozenset({("magenta", "triangle"), ("cyan", "circle"), ("yellow", "square")})
SPLITS = ("train", "test", "heldout")


@dataclasses.dataclass(frozen=True)
class Item:
    """One shape of a scene; size / position None means not named (medium / centre)."""
    shape: str
    color: str
    size: str | None = None
    position: str | None = None


def validate(spec):
    """Raise ValueError unless spec is 1 Item, or 2 Items whose positions form a RELATIONS pair."""
    spec = tuple(spec)
    for it in spec:
        if it.shape not in SHAPES or it.color not in COLORS or it.size not in SIZES \
                or it.position not in POSITIONS:
            raise ValueError(f"shapes: unknown attribute in {it}")
    if len(spec) == 2 and (spec[0].position, spec[1].position) not in RELATIONS:
        raise ValueError(f"shapes: two shapes need opposite positions, got {spec}")
    if len(spec) not in (1, 2):
        raise ValueError(f"shapes: a scene has 1 or 2 shapes, got {len(spec)}")
    return spec


def shape_mask(item):
    """bool [SIZE, SIZE]: the pixels (by their centres) covered by one shape."""
    cx, cy = POSITIONS[item.position]
    r = SIZES[item.size]
    y, x = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    if item.shape == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= r * r
    if item.shape == "square":
        return (np.abs(x - cx) <= r) & (np.abs(y - cy) <= r)
    # Triangle pointing up: apex at the top centre, base 2r wide at the bottom.
    return (y >= cy - r) & (y <= cy + r) & (np.abs(x - cx) <= (y - (cy - r)) / 2)


def render(spec):
    """Scene -> uint8 [64, 64, 3]: flat-coloured shapes on black."""
    image = np.zeros((SIZE, SIZE, 3), np.uint8)
    for item in validate(spec):
        image[shape_mask(item)] = COLORS[item.color]
    return image


def _noun_phrase(item):
    return " ".join(w for w in ("a", item.size, item.color, item.shape) if w)


def caption(spec):
    """Scene -> English caption, e.g. 'a large blue square on the left', 'a red circle above a cyan square'."""
    spec = validate(spec)
    if len(spec) == 2:
        rel = RELATIONS[(spec[0].position, spec[1].position)]
        return f"{_noun_phrase(spec[0])} {rel} {_noun_phrase(spec[1])}"
    item = spec[0]
    return _noun_phrase(item) + (f" {PLACE_PHRASES[item.position]}" if item.position else "")


def spec_to_json(spec):
    """Scene -> JSON text (stored beside each example)."""
    return json.dumps([dataclasses.asdict(it) for it in validate(spec)])


def spec_from_json(text):
    """JSON text (str or bytes) from spec_to_json -> scene (tuple of Item)."""
    return validate(Item(**d) for d in json.loads(text))


def sample_spec(rng, split):
    """A random scene for `split` ("train"/"test": no HELD_OUT combo; "heldout": at least one)."""
    allowed = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in HELD_OUT]
    held = sorted(HELD_OUT)
    sizes = list(SIZES)

    def pick(combos):
        return combos[rng.integers(len(combos))]

    first = pick(held if split == "heldout" else allowed)
    if rng.random() < 0.5:
        positions = list(POSITIONS)
        return (Item(first[1], first[0], sizes[rng.integers(3)], positions[rng.integers(len(positions))]),)
    second = pick(allowed + held if split == "heldout" else allowed)
    if rng.random() < 0.5:
        first, second = second, first
    where = list(RELATIONS)[rng.integers(len(RELATIONS))]
    return tuple(Item(combo[1], combo[0], sizes[rng.integers(3)], pos)
                 for combo, pos in zip((first, second), where))


@dataclasses.dataclass(eq=False)
class ShapesConfig(tfds.core.BuilderConfig):
    """How many scenes per split, and the seed they are drawn from."""
    num_train: int = 20000
    num_test: int = 1000
    num_heldout: int = 1000
    seed: int = 0


def shapes_config(num_train=20000, num_test=1000, num_heldout=1000, seed=0):
    """A ShapesConfig named after its values, so different sizes / seeds get their own folder."""
    return ShapesConfig(name=f"n{num_train}_{num_test}_{num_heldout}_s{seed}", num_train=num_train,
                        num_test=num_test, num_heldout=num_heldout, seed=seed)


class CaptionedShapes(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """tfds builder: {"image": uint8 [64, 64, 3], "caption": text, "spec": JSON text}; pass config=shapes_config(...)."""
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(SIZE, SIZE, 3), dtype=np.uint8),
                "caption": tfds.features.Text(),
                "spec": tfds.features.Text(),
            }))

    def _split_generators(self, dl_manager):
        c = self.builder_config
        counts = {"train": c.num_train, "test": c.num_test, "heldout": c.num_heldout}
        return {split: self._generate_examples(split, n) for split, n in counts.items()}

    def _generate_examples(self, split, num):
        split_id = zlib.crc32(split.encode())
        for i in range(num):
            spec = sample_spec(np.random.default_rng([self.builder_config.seed, split_id, i]), split)
            yield i, {"image": render(spec), "caption": caption(spec), "spec": spec_to_json(spec)}

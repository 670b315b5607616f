"""Aspect-ratio buckets: the bucket list, each batch one bucket of exact resized crops, an epoch without
repeats, resume and another process count continuing the same global batches, one compile per bucket."""
import io
import json

import numpy as np
import pytest
from PIL import Image

from sdjax.data import buckets, input_pipeline
from sdjax.data.examples import decode_image
from test_data_pipeline import take, write_folder

SHAPES = [(24, 24)] * 8 + [(30, 50)] * 8 + [(50, 30)] * 8  # (h, w): buckets (16, 16), (12, 20), (20, 12) at 16, 4


def test_bucket_list_is_sdxls():
    got = buckets.bucket_list(1024, 64)
    assert {(1024, 1024), (512, 2048), (2048, 512), (832, 1216), (1216, 832), (768, 1344), (640, 1536)} <= set(got)
    for h, w in got:
        assert h % 64 == 0 and w % 64 == 0 and max(h / w, w / h) <= 4
        assert 1024 ** 2 - 64 * max(h, w) < h * w <= 1024 ** 2  # as wide as the step allows at that height
    assert set(got) == {(w, h) for h, w in got} and len(got) == 33
    assert buckets.assign([(100, 100), (300, 1000), (1000, 300), (0, 0)], got).tolist() == [
        got.index((1024, 1024)), got.index((576, 1792)), got.index((1792, 576)), -1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """24 noise images of SHAPES, then a truncated PNG (its header readable, its pixels not) and a non-image."""
    rng = np.random.default_rng(0)
    sources = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in SHAPES]
    png = io.BytesIO()
    Image.fromarray(sources[0][:, ::-1].copy()).save(png, format="PNG")
    images = [Image.fromarray(a) for a in sources] + [png.getvalue()[:100], b"no image"]
    return write_folder(tmp_path_factory.mktemp("mixed"), images, [f"picture {i}" for i in range(26)]), sources


def iterator(mixed, data_dir, tokenizer, batch, index=0, count=1, seed=0):
    cfg = dict(source="folder", path=mixed[0], data_dir=data_dir, image_size=16, bucket_step=4, num_threads=2,
               center_crop=False, random_flip=True)
    return input_pipeline.make_iterator(cfg, tokenizer, batch, seed, index, count)


def reference(source, size, top, left, flipped):
    """The resized crop by hand: the smallest scale covering `size`, crop at (top, left) of the flipped image."""
    (th, tw), (h, w) = size, source.shape[:2]
    scale = max(th / h, tw / w)
    resized = np.asarray(Image.fromarray(source).resize((max(tw, int(w * scale)), max(th, int(h * scale))),
                                                        Image.BILINEAR))
    resized = resized[:, ::-1] if flipped else resized
    return resized[top:top + th, left:left + tw]


def which(batch, sources):
    """Each batch row's source index, checked: its image is that source's resized crop at the recorded place."""
    out = []
    for image, (h, w), (top, left) in zip(batch["images"], batch["original_size"], batch["crop_top_left"]):
        got = np.rint((image + 1) * 127.5).astype(np.uint8)
        hits = [i for i, s in enumerate(sources) for flip in (False, True) if s.shape[:2] == (h, w)
                and np.array_equal(reference(s, got.shape[:2], top, left, flip), got)]
        assert len(hits) == 1, "no source (or several) gives this crop"
        out.append(hits[0])
    return out


def test_batches_are_one_bucket_of_exact_crops_and_an_epoch_repeats_nothing(mixed, data_dir, tokenizer):
    it = iterator(mixed, data_dir, tokenizer, 4)
    assert it.epochs.per_epoch == 6  # 8 per bucket: 2 batches each (the truncated PNG is a ninth square)
    seen, shapes = [], set()
    for batch in take(it, 6):
        shape = batch["images"].shape[1:3]
        shapes.add(shape)
        rows = which(batch, mixed[1])
        assert {buckets.assign([SHAPES[i]], buckets.bucket_list(16, 4))[0] for i in rows} == \
               {buckets.bucket_list(16, 4).index(shape)}
        seen += rows
    assert shapes == {(16, 16), (12, 20), (20, 12)}
    assert len(seen) == 24 and it.skipped in (0, 1)  # 8 of the 9 squares: maybe the truncated PNG (refilled)
    assert len(set(seen)) == 24 - it.skipped


def test_a_corrupt_image_is_counted_and_its_row_refilled(mixed, data_dir, tokenizer):
    it = iterator(mixed, data_dir, tokenizer, 4)
    bad = [i for i in range(len(it.source)) if decode_image(it.source[i]["image"]) is None]
    assert [buckets.image_size(it.source[i]["image"]) for i in bad] in ([(24, 24), (0, 0)], [(0, 0), (24, 24)])
    step = next(s for s in range(60) if set(bad) & set(it.epochs.batch(s)[0]))  # the truncated PNG's first batch
    it.set_state({**it.get_state(), "step": step})
    batch = next(it)
    assert it.skipped == 1 and batch["images"].shape == (4, 16, 16, 3)
    rows = which(batch, mixed[1])
    assert len(set(rows)) == 3  # the bad row holds another row's image


def test_resume_and_another_process_count_continue_the_global_batches(mixed, data_dir, tokenizer):
    one = iterator(mixed, data_dir, tokenizer, 4)
    take(one, 3)
    state = json.loads(json.dumps(one.get_state()))
    expected = take(one, 5)
    again = iterator(mixed, data_dir, tokenizer, 4)
    again.set_state(state)
    halves = [iterator(mixed, data_dir, tokenizer, 2, i, 2) for i in range(2)]
    for h in halves:
        h.continue_from([state])
    for want, got, a, b in zip(expected, take(again, 5), take(halves[0], 5), take(halves[1], 5)):
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
            np.testing.assert_array_equal(np.concatenate([a[key], b[key]]), want[key])
    with pytest.raises(ValueError, match="batches of"):
        iterator(mixed, data_dir, tokenizer, 2).set_state(state)


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="bucket_step needs a source with random access"):
        input_pipeline.resolve_config(dict(source="webdataset", path=str(tmp_path), bucket_step=64))
    with pytest.raises(ValueError, match="no bucket holds a global batch of 8"):
        buckets.Epochs(np.array([0, 0, 1, 2]), 3, 8, 0)


def test_training_compiles_the_step_once_per_bucket(mixed, data_dir, tokenizer, tmp_path):
    """The loop's jitted step on bucketed batches: 3 buckets, 3 compiles over 12 steps, and a loss for each."""
    import jax
    from configs.train import tiny as train_tiny
    from sdjax.train import loop
    from sdjax.train.sharding import global_batch
    from sdjax.weights.pretrained import Pretrained
    from train_fakes import toy_setup
    modules, params, _ = toy_setup()
    c = train_tiny.get_config()
    c.batch_size, c.mesh.data, c.loss.prediction_type = 4, 1, "epsilon"
    c.data.update(source="folder", path=mixed[0], data_dir=data_dir, image_size=16, bucket_step=4, num_threads=2)
    run = loop.setup(c, str(tmp_path / "run"), devices=jax.devices()[:1],
                     pretrained=Pretrained(modules, params, tokenizer, {"prediction_type": "epsilon"}, "toy"))
    shapes = set()
    for _ in range(12):
        batch = next(run.data)
        shapes.add(batch["images"].shape)
        run.state, metrics = run.step_fn(run.state, run.frozen, global_batch(batch, run.mesh))
        assert np.isfinite(float(metrics["loss"]))
    assert len(shapes) == 3 and run.step_fn._cache_size() == 3

"""Input pipeline: determinism, per-process sharding, exact resume, corrupt images, crops and flips."""
import io
import json

import grain
import numpy as np
import pytest
import transformers
from PIL import Image

from sdjax.data import input_pipeline
from sdjax.text.clip_vocab import write_clip_tokenizer

SHAPES = dict(source="shapes", image_size=32, num_threads=2, center_crop=False,
              shapes=dict(num_train=64, num_test=8, num_heldout=8, seed=1))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def colour_of(i):
    """A distinct flat colour for example i (< 85)."""
    return (3 * i, 255 - 3 * i, 7)


def write_folder(root, images, texts):
    """images: list of PIL images or raw bytes; writes img{i}.png + img{i}.txt."""
    root.mkdir(parents=True, exist_ok=True)
    for i, (im, text) in enumerate(zip(images, texts)):
        if isinstance(im, bytes):
            (root / f"img{i:03d}.png").write_bytes(im)
        else:
            im.save(root / f"img{i:03d}.png")
        (root / f"img{i:03d}.txt").write_text(text)
    return str(root)


@pytest.fixture(scope="module")
def numbered(tmp_path_factory):
    """64 flat 16x16 images whose colour tells their index."""
    return write_folder(tmp_path_factory.mktemp("numbered"),
                        [Image.new("RGB", (16, 16), colour_of(i)) for i in range(64)],
                        [f"picture {i}" for i in range(64)])


def indices(batch):
    """Example indices of a batch of the `numbered` images (from their colour)."""
    red = np.rint((batch["images"][:, 0, 0, 0] + 1) * 127.5).astype(int)
    return list(red // 3)


def take(it, n):
    return [next(it) for _ in range(n)]


def numbered_iterator(numbered, data_dir, tokenizer, batch, seed=0, index=0, count=1):
    cfg = dict(source="folder", path=numbered, data_dir=data_dir, image_size=16, num_threads=2)
    return input_pipeline.make_iterator(cfg, tokenizer, batch, seed, index, count)


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["images"], y["images"])
        np.testing.assert_array_equal(x["input_ids"], y["input_ids"])


def test_batch_format_and_tokens(numbered, data_dir, tokenizer):
    batch = next(numbered_iterator(numbered, data_dir, tokenizer, 8))
    assert batch["images"].dtype == np.float32 and batch["images"].shape == (8, 16, 16, 3)
    assert batch["input_ids"].dtype == np.int32 and batch["input_ids"].shape == (8, 77)
    for img, ids, i in zip(batch["images"], batch["input_ids"], indices(batch)):
        np.testing.assert_allclose(img, np.broadcast_to(np.array(colour_of(i)) / 127.5 - 1, img.shape), atol=1e-6)
        want = tokenizer(f"picture {i}", padding="max_length", max_length=77).input_ids
        np.testing.assert_array_equal(ids, want)


def test_deterministic_from_seed(data_dir, tokenizer):
    cfg = dict(SHAPES, data_dir=data_dir)
    a = take(input_pipeline.make_iterator(cfg, tokenizer, 8, seed=5), 10)
    assert_same(a, take(input_pipeline.make_iterator(cfg, tokenizer, 8, seed=5), 10))
    c = take(input_pipeline.make_iterator(cfg, tokenizer, 8, seed=6), 10)
    assert not all(np.array_equal(x["images"], y["images"]) for x, y in zip(a, c))


@pytest.mark.parametrize("count", [2, 3])
def test_processes_together_read_each_epoch_once(numbered, data_dir, tokenizer, count):
    """Global positions g of one order are dealt in turn (process g % count): every epoch of 64 is read once
    by the processes together, reshuffled from one epoch to the next."""
    reads = [sum((indices(b) for b in take(numbered_iterator(numbered, data_dir, tokenizer, 1, 0, i, count),
                                         len(range(i, 128, count)))), []) for i in range(count)]
    merged = [reads[g % count][g // count] for g in range(128)]
    assert sorted(merged[:64]) == sorted(merged[64:]) == list(range(64))
    assert merged[:64] != merged[64:]
    assert merged == sum((indices(b) for b in take(numbered_iterator(numbered, data_dir, tokenizer, 1), 128)), [])
    # with batches of b, process i reads rows [i * b, (i + 1) * b) of the global batch one process would read
    halves = [numbered_iterator(numbered, data_dir, tokenizer, 4, 0, i, 2) for i in range(2)]
    for whole, a, b in zip(take(numbered_iterator(numbered, data_dir, tokenizer, 8), 9), take(halves[0], 9),
                           take(halves[1], 9)):
        for key in whole:
            np.testing.assert_array_equal(np.concatenate([a[key], b[key]]), whole[key])


def test_resume_replays_the_same_batches(data_dir, tokenizer):
    cfg = dict(SHAPES, data_dir=data_dir)
    it = input_pipeline.make_iterator(cfg, tokenizer, 8, seed=2)
    take(it, 5)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
    rest = take(it, 7)  # crosses the epoch boundary (8 batches per epoch)
    again = input_pipeline.make_iterator(cfg, tokenizer, 8, seed=2)
    again.set_state(state)
    assert_same(take(again, 7), rest)


def test_resume_through_orbax(tmp_path, data_dir, tokenizer):
    ocp = pytest.importorskip("orbax.checkpoint")
    cfg = dict(SHAPES, data_dir=data_dir)
    it = input_pipeline.make_iterator(cfg, tokenizer, 8, seed=3)
    take(it, 3)
    with ocp.CheckpointManager(str(tmp_path / "ckpt")) as mngr:
        mngr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
    rest = take(it, 4)
    again = input_pipeline.make_iterator(cfg, tokenizer, 8, seed=3)
    with ocp.CheckpointManager(str(tmp_path / "ckpt")) as mngr:
        mngr.restore(mngr.latest_step(), args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(again)))
    assert_same(take(again, 4), rest)


def test_corrupt_images_skipped_and_counted(tmp_path, data_dir, tokenizer):
    good = [Image.new("RGB", (16, 16), colour_of(i)) for i in range(6)]
    jpeg = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(jpeg, format="JPEG")
    bad = [b"not an image at all", jpeg.getvalue()[:300], b""]
    path = write_folder(tmp_path / "mixed", good + bad, [f"picture {i}" for i in range(9)])
    cfg = dict(source="folder", path=path, data_dir=data_dir, image_size=16, num_threads=2)
    it = input_pipeline.make_iterator(cfg, tokenizer, 3, seed=0)
    seen = sum((indices(b) for b in take(it, 6)), [])  # 3 epochs of the 6 good images
    assert sorted(seen) == sorted(list(range(6)) * 3)
    assert 6 <= it.skipped <= 9  # 3 bad per epoch; the last epoch's may still be ahead
    state = it.get_state()
    again = input_pipeline.make_iterator(cfg, tokenizer, 3, seed=0)
    again.set_state(state)
    assert again.skipped == it.skipped


def test_all_corrupt_raises_instead_of_hanging(tmp_path, data_dir, tokenizer):
    path = write_folder(tmp_path / "broken", [b"junk", b"more junk"], ["a", "b"])
    cfg = dict(source="folder", path=path, data_dir=data_dir, image_size=16, num_threads=2)
    with pytest.raises(RuntimeError, match="no decodable image"):
        next(input_pipeline.make_iterator(cfg, tokenizer, 1, seed=0))


@pytest.fixture(scope="module")
def stripes(tmp_path_factory):
    """One 96x64 image: red | green | blue vertical stripes, 32 px each."""
    a = np.zeros((64, 96, 3), np.uint8)
    a[:, :32, 0] = a[:, 32:64, 1] = a[:, 64:, 2] = 255
    return a, write_folder(tmp_path_factory.mktemp("stripes"), [Image.fromarray(a)], ["stripes"])


def stripe_images(stripes, data_dir, tokenizer, n, **options):
    cfg = dict(source="folder", path=stripes[1], data_dir=data_dir, image_size=32, num_threads=2, **options)
    return [np.rint((b["images"][0] + 1) * 127.5).astype(np.uint8)
            for b in take(input_pipeline.make_iterator(cfg, tokenizer, 1, seed=0), n)]


def test_center_crop(stripes, data_dir, tokenizer):
    # Resized to 48x32 (stripes 16 px), centre crop keeps columns 8..40: 8 red, 16 green, 8 blue.
    (img,) = stripe_images(stripes, data_dir, tokenizer, 1, center_crop=True, random_flip=False)
    assert img.shape == (32, 32, 3)
    np.testing.assert_array_equal(img[:, :7], np.broadcast_to([255, 0, 0], (32, 7, 3)))
    np.testing.assert_array_equal(img[:, 9:23], np.broadcast_to([0, 255, 0], (32, 14, 3)))
    np.testing.assert_array_equal(img[:, 25:], np.broadcast_to([0, 0, 255], (32, 7, 3)))


def test_random_crop_and_flip_are_windows_of_the_resized_image(stripes, data_dir, tokenizer):
    resized = np.asarray(Image.fromarray(stripes[0]).resize((48, 32), Image.BILINEAR))
    windows = {resized[:, o:o + 32].tobytes(): o for o in range(17)}
    flipped = {resized[:, o:o + 32][:, ::-1].tobytes(): o for o in range(17)}
    offsets, flips = set(), set()
    for img in stripe_images(stripes, data_dir, tokenizer, 24, center_crop=False, random_flip=True):
        key = img.tobytes()
        assert key in windows or key in flipped
        offsets.add(windows.get(key, flipped.get(key)))
        flips.add(key in flipped)
    assert len(offsets) > 3 and flips == {True, False}


def test_config_errors(data_dir, tokenizer):
    with pytest.raises(ValueError, match="unknown keys"):
        input_pipeline.resolve_config(dict(SHAPES, imagesize=3))
    with pytest.raises(ValueError, match="source"):
        input_pipeline.resolve_config(dict(source="tfrecord"))
    with pytest.raises(ValueError, match="split"):
        input_pipeline.resolve_config(dict(source="folder", split="heldout"))
    with pytest.raises(ValueError, match="process_index"):
        input_pipeline.make_iterator(dict(SHAPES, data_dir=data_dir), tokenizer, 8, 0, process_index=2, process_count=2)


@pytest.mark.slow
def test_worker_processes_give_the_same_batches(data_dir, tokenizer):
    from absl import flags
    if not flags.FLAGS.is_parsed():  # grain's worker processes read --grain_* flags, as under absl.app.run
        flags.FLAGS.mark_as_parsed()
    cfg = dict(SHAPES, data_dir=data_dir)
    a = take(input_pipeline.make_iterator(cfg, tokenizer, 8, seed=4), 6)
    it = input_pipeline.make_iterator(dict(cfg, num_workers=2), tokenizer, 8, seed=4)
    assert_same(take(it, 6), a)
    it.close()


def test_sizes_and_crops_are_recorded_for_sdxl(tmp_path, data_dir, tokenizer):
    """original_size is the stored image's (H, W); crop_top_left is where the batch image begins in the resized
    image (mirrored when flipped, as diffusers' SDXL training records it); a second tokenizer gives input_ids_2."""
    rng = np.random.default_rng(0)
    sources = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in ((40, 24, 3), (24, 50, 3))]
    path = write_folder(tmp_path / "sizes", [Image.fromarray(a) for a in sources], ["a", "b"])
    cfg = dict(source="folder", path=path, data_dir=data_dir, image_size=16, num_threads=2, center_crop=False,
               random_flip=True)
    tokenizer_2 = transformers.CLIPTokenizer.from_pretrained(write_clip_tokenizer(str(tmp_path / "tok2"), "!"))
    it = input_pipeline.make_iterator(cfg, {"input_ids": tokenizer, "input_ids_2": tokenizer_2}, 2, seed=0)
    crops, flips = set(), 0
    for batch in take(it, 8):
        assert batch["input_ids_2"][0, -1] != batch["input_ids"][0, -1]  # padded with "!" / <|endoftext|>
        for image, (h, w), (top, left) in zip(batch["images"], batch["original_size"], batch["crop_top_left"]):
            src = next(a for a in sources if a.shape[:2] == (h, w))
            scale = 16 / min(h, w)
            resized = np.asarray(Image.fromarray(src).resize((max(16, int(w * scale)), max(16, int(h * scale))),
                                                             Image.BILINEAR))
            got = np.rint((image + 1) * 127.5).astype(np.uint8)
            plain, mirrored = (r[top:top + 16, left:left + 16] for r in (resized, resized[:, ::-1]))
            assert np.array_equal(got, plain) or np.array_equal(got, mirrored)
            flips += not np.array_equal(got, plain)
            crops.add((h, w, top, left))
    assert len(crops) > 3 and 0 < flips < 16  # random crops and flips were drawn

"""Streamed sources (webdataset tars, parquet tables) and the data order: corrupt members skipped and counted,
exact resume inside a shard, and another process count continuing where the last run stopped."""
import io
import json
import random
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from sdjax.data import input_pipeline, order, shards
from test_data_pipeline import assert_same, colour_of, indices, take

SIZES = (4, 3, 5, 2)  # members per shard
BAD = {5: b"not a jpeg", 9: None}  # example 5's image is corrupt, example 9 has none


def encoded(i, fmt):
    out = io.BytesIO()
    Image.new("RGB", (20, 16), colour_of(i)).save(out, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    return out.getvalue()


def write_webdataset(folder, sizes=SIZES, bad=BAD):
    """Shards folder/shard-{j}.tar of examples 0, 1, ... (sizes[j] in shard j): a 20x16 flat image of
    colour_of(i) (PNG or lossless WebP) and its caption "picture {i}", as .txt or in a .json; `bad`: {i: image
    bytes, or None for no image}. Returns the folder and the good examples' indices."""
    folder.mkdir(parents=True, exist_ok=True)
    i = 0
    for j, n in enumerate(sizes):
        with tarfile.open(folder / f"shard-{j:03d}.tar", "w") as tar:
            for _ in range(n):
                files = {"json": json.dumps({"caption": f"picture {i}", "width": 20}).encode()} if i % 2 else \
                    {"txt": f"picture {i}".encode()}
                image = bad.get(i, encoded(i, "PNG" if i % 3 else "WEBP"))
                if image is not None:
                    files["jpg" if i in bad else "png" if i % 3 else "webp"] = image
                for ext, data in files.items():
                    info = tarfile.TarInfo(f"sub/{i:06d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                i += 1
    return str(folder), [k for k in range(i) if k not in bad]


@pytest.fixture(scope="module")
def webdataset(tmp_path_factory):
    return write_webdataset(tmp_path_factory.mktemp("wds"))


def stream(path, tokenizer, batch, index=0, count=1, source="webdataset", seed=0):
    cfg = dict(source=source, path=path, image_size=16, num_threads=2, random_flip=False)
    return input_pipeline.make_iterator(cfg, tokenizer, batch, seed, index, count)


def test_webdataset_epoch_skips_and_counts_corrupt_members(webdataset, tokenizer):
    path, good = webdataset
    it = stream(path, tokenizer, 1)
    batches = take(it, 2 * len(good))
    seen = sum((indices(b) for b in batches), [])
    assert sorted(seen[:len(good)]) == sorted(seen[len(good):]) == good  # each epoch: every good example once
    assert it.skipped == 2 * len(BAD)
    for b, i in zip(batches, seen):  # the image (its centre crop) and its caption
        np.testing.assert_allclose(b["images"][0], np.broadcast_to(np.array(colour_of(i)) / 127.5 - 1, (16, 16, 3)),
                                   atol=1e-6)
        assert b["original_size"].tolist() == [[16, 20]] and b["crop_top_left"].tolist() == [[0, 2]]
        np.testing.assert_array_equal(b["input_ids"][0], tokenizer(f"picture {i}", padding="max_length").input_ids)


def test_webdataset_resumes_inside_a_shard(webdataset, tokenizer):
    path, _ = webdataset
    it = stream(path, tokenizer, 2)
    take(it, 3)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
    assert state["offset"] not in (0, order.position(state["plan"], state["k"])[1])  # (inside a shard)
    rest = take(it, 6)
    again = stream(path, tokenizer, 2)
    again.set_state(state)
    assert_same(take(again, 6), rest)
    assert again.skipped == it.skipped


def test_unreadable_shard_tail_is_skipped(tmp_path):
    write_webdataset(tmp_path / "wds", sizes=(3,), bad={})
    data = (tmp_path / "wds" / "shard-000.tar").read_bytes()
    (tmp_path / "wds" / "shard-000.tar").write_bytes(data[:1024 * 2 + 612])  # cut inside example 1's caption
    out = list(shards.read_tar(str(tmp_path / "wds" / "shard-000.tar")))
    assert [m for m, _ in out] == [0, 1] and out[0][1]["caption"] == b"picture 0" and out[1][1]["image"] == b""


def test_parquet_bytes_and_paths(tmp_path, tokenizer):
    (tmp_path / "img").mkdir()
    for i in range(3):
        Image.open(io.BytesIO(encoded(i, "PNG"))).save(tmp_path / "img" / f"{i}.png")
    pq.write_table(pa.table({"file_name": ["img/missing.png", "img/0.png", "img/1.png", "img/2.png"],
                             "TEXT": [f"picture {i}" for i in (3, 0, 1, 2)]}), tmp_path / "a.parquet")
    images = pa.array([{"bytes": encoded(i, "PNG"), "path": None} for i in range(4, 9)])
    pq.write_table(pa.table({"image": images, "caption": [f"picture {i}" for i in range(4, 9)]}),
                   tmp_path / "b.parquet", row_group_size=2)
    it = stream(str(tmp_path / "*.parquet"), tokenizer, 1, source="parquet")
    batches = take(it, 8)
    seen = sum((indices(b) for b in batches), [])
    assert sorted(seen) == [0, 1, 2, 4, 5, 6, 7, 8] and it.skipped == 1
    for b, i in zip(batches, seen):
        np.testing.assert_array_equal(b["input_ids"][0], tokenizer(f"picture {i}", padding="max_length").input_ids)
    # from row 3 of b.parquet on: its first row group is not read
    assert [r for r, _ in shards.read_parquet(str(tmp_path / "b.parquet"), 3)] == [3, 4]
    with pytest.raises(ValueError, match="caption column"):
        pq.write_table(pa.table({"image": images}), tmp_path / "c.parquet")
        list(shards.read_parquet(str(tmp_path / "c.parquet")))


def test_shard_lists(tmp_path):
    for j in range(3):
        (tmp_path / f"s-{j:02d}.tar").write_bytes(b"")
    want = [str(tmp_path / f"s-{j:02d}.tar") for j in range(3)]
    assert shards.list_shards(str(tmp_path), "webdataset") == want
    assert shards.list_shards(str(tmp_path / "s-{00..02}.tar"), "webdataset") == want
    assert shards.list_shards(str(tmp_path / "s-0[12].tar"), "webdataset") == want[1:]
    with pytest.raises(FileNotFoundError, match="no parquet shards"):
        shards.list_shards(str(tmp_path), "parquet")


def simulate(states, sizes, reads, rng, log):
    """Each process reads rng-many members (<= reads) of its plan; log: (global position, member) read."""
    for s in states:
        for _ in range(rng.randint(0, reads)):
            g, _ = order.position(s["plan"], s["k"])
            while s["offset"] >= sizes[g % len(sizes)]:  # the position's members are all read: the next one
                s["k"] += 1
                g, s["offset"] = order.position(s["plan"], s["k"])
            log.append((g, s["offset"]))
            s["offset"] += 1


@pytest.mark.parametrize("sizes,blocks", [((1,) * 7, (3, 2, 1, 4, 2, 2)), ((3, 1, 4, 1, 5, 9, 2), (1,) * 6)])
def test_resplit_reads_every_member_once(sizes, blocks):
    """Runs of 2, 1, 3, 2, 5, 5 processes (blocks of `blocks`), each stopping at random places (mid-shard too),
    then re-split: every member of the positions read up to the frontier is read exactly once."""
    rng, log = random.Random(0), []
    states = [{"plan": order.plan(len(sizes), i, 2, blocks[0]), **order.start(order.plan(len(sizes), i, 2,
                                                                                          blocks[0]))}
              for i in range(2)]
    for count, block in zip((1, 3, 2, 5, 5), blocks[1:]):
        simulate(states, sizes, 12, rng, log)
        states = order.resplit(json.loads(json.dumps(states)), count, block)
    simulate(states, sizes, 40, rng, log)
    assert len(log) == len(set(log))
    frontier = min(order.position(s["plan"], s["k"])[0] for s in states)
    assert frontier > 2 * len(sizes)  # (several epochs went by)
    assert {(g, m) for g, m in log if g < frontier} == {(g, m) for g in range(frontier)
                                                        for m in range(sizes[g % len(sizes)])}


def test_resplit_at_a_batch_end_reads_what_one_process_would():
    """Processes that stopped together after whole batches: the new ones (other count, other block) read
    the positions one process would have read, in its order."""
    for old, new in ((2, 1), (1, 3), (4, 2)):
        states = [{"plan": order.plan(50, i, old, 12 // old), "k": 3 * 12 // old, "offset": 0} for i in range(old)]
        again = order.resplit(states, new, 12 // new)
        reads = [[order.position(s["plan"], k)[0] for k in range(2 * 12 // new)] for s in again]
        merged = [g for r in range(2) for q in range(new) for g in reads[q][r * 12 // new:(r + 1) * 12 // new]]
        assert merged == list(range(36, 60))


def test_another_process_count_continues_the_epoch(webdataset, tokenizer):
    """2 processes read some batches; 1 process continues from their states: it reads first exactly the
    examples they did not, then a new epoch."""
    path, good = webdataset
    its = [stream(path, tokenizer, 2, i, 2) for i in range(2)]
    read = sum((indices(b) for it in its for b in take(it, 2)), [])
    one = stream(path, tokenizer, 1)
    one.continue_from([json.loads(json.dumps(it.get_state())) for it in its])
    rest = sum((indices(b) for b in take(one, len(good) - len(read) + 3)), [])
    assert sorted(read + rest[:len(good) - len(read)]) == good
    assert one.skipped >= len(BAD)  # (the old processes' count carried over, and the rest of the epoch's)
    with pytest.raises(ValueError, match="units"):
        stream(path, tokenizer, 1).continue_from([{**its[0].get_state(), "plan": order.plan(9, 0, 1)}])


def test_shards_with_no_example_raise_instead_of_spinning(tmp_path, tokenizer):
    write_webdataset(tmp_path / "wds", sizes=(0, 0), bad={})
    with pytest.raises(RuntimeError, match="no example in a whole pass over the 2 shards"):
        next(stream(str(tmp_path / "wds"), tokenizer, 1))

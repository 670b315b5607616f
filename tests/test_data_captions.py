"""User caption data sets: folder, JSONL and CSV listings give the same stored examples."""
import csv
import io
import json

import numpy as np
import pytest
from PIL import Image

from sdjax.data import captions


def png_bytes(colour, size=(8, 6)):
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def folder(tmp_path):
    """5 captioned PNGs (one in a sub-folder), 1 image without caption, 1 stray text file."""
    root = tmp_path / "imgs"
    (root / "sub").mkdir(parents=True)
    for i in range(5):
        stem = root / ("sub" if i == 4 else "") / f"img{i}"
        stem.with_suffix(".png").write_bytes(png_bytes((10 * i, 0, 0)))
        stem.with_suffix(".txt").write_text(f"  caption number {i}\n")
    (root / "nocaption.png").write_bytes(png_bytes((0, 0, 9)))
    (root / "notes.txt").write_text("not an image")
    return root


def build(tmp_path, path, source):
    b = captions.ImageCaptions(config=captions.captions_config(str(path), source),
                               data_dir=str(tmp_path / "tfds"), file_format="array_record")
    b.download_and_prepare()
    src = b.as_data_source("train")
    return sorted((src[i]["image"], src[i]["caption"].decode()) for i in range(len(src)))


def expected(folder):
    return sorted((p.read_bytes(), p.with_suffix(".txt").read_text().strip())
                  for p in folder.rglob("img*.png"))


def test_folder(tmp_path, folder):
    got = build(tmp_path, folder, "folder")
    assert got == expected(folder) and len(got) == 5


def test_jsonl_and_csv(tmp_path, folder):
    rows = [{"file_name" if i % 2 else "image": str(p.relative_to(folder)),
             "text" if i % 2 else "caption": p.with_suffix(".txt").read_text()}
            for i, p in enumerate(sorted(folder.rglob("img*.png")))]
    listing = folder / "meta.jsonl"
    listing.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert build(tmp_path, listing, "jsonl") == expected(folder)
    table = folder / "meta.csv"
    with open(table, "w", newline="") as f:
        w = csv.DictWriter(f, ["path", "caption"])
        w.writeheader()
        w.writerows({"path": next(v for k, v in r.items() if k in ("image", "file_name")),
                     "caption": next(v for k, v in r.items() if k in ("caption", "text"))} for r in rows)
    assert build(tmp_path, table, "csv") == expected(folder)


def test_missing_listed_file_skipped(tmp_path, folder):
    listing = folder / "meta.jsonl"
    listing.write_text(json.dumps({"image": "img0.png", "caption": "ok"}) + "\n"
                       + json.dumps({"image": "gone.png", "caption": "missing"}) + "\n")
    got = build(tmp_path, listing, "jsonl")
    assert [c for _, c in got] == ["ok"]


def test_errors_at_the_edge(tmp_path, folder):
    with pytest.raises(FileNotFoundError):
        captions.captions_config(str(tmp_path / "nope"), "folder")
    with pytest.raises(FileNotFoundError):
        captions.captions_config(str(folder), "jsonl")
    with pytest.raises(ValueError):
        captions.captions_config(str(folder), "parquet")
    bad = folder / "bad.jsonl"
    bad.write_text(json.dumps({"img": "img0.png", "caption": "x"}) + "\n")
    with pytest.raises(ValueError, match="row 1"):
        captions.listing_examples(str(bad), "jsonl")


def test_fingerprint_follows_the_data(folder):
    before = captions.captions_config(str(folder), "folder").name
    assert captions.captions_config(str(folder), "folder").name == before
    (folder / "img9.png").write_bytes(png_bytes((1, 2, 3)))
    assert captions.captions_config(str(folder), "folder").name != before


def test_stored_bytes_decode(tmp_path, folder):
    image, _ = build(tmp_path, folder, "folder")[0]
    assert np.asarray(Image.open(io.BytesIO(image))).shape == (6, 8, 3)

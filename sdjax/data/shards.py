"""Streamed sources: webdataset tar shards and parquet tables, read shard by shard with no build step.

webdataset: a tar's members `{key}.jpg|.jpeg|.png|.webp` and `{key}.txt` (or `{key}.json` with a "caption"
or "text" field), grouped by key (the member's path up to the first dot of its file name), as
img2dataset writes them. parquet: one row per example, a caption column ("caption" / "text", any case) and
either image bytes ("image", "jpg", "png", "webp": binary, or a {"bytes", "path"} struct as Hugging Face
datasets store images) or a path column ("file_name" / "path") relative to the table's folder.
An example with no image, or one that cannot be read, comes out with empty image bytes (the input pipeline
skips and counts it); a shard unreadable from some example on ends with that one as such an example.
With conditioning images (ControlNet training: `conditioning` names the column): webdataset's `{key}.cond.png`
(or another image extension) members, parquet's column of that name (bytes, struct or path as the image's); an
example without one carries None (the input pipeline stops with an error naming it).
"""
import glob
import json
import logging
import os
import re
import tarfile

SOURCES = {"webdataset": (".tar", ".tar.gz", ".tgz"), "parquet": (".parquet",)}
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CAPTION_COLUMNS = ("caption", "text")
IMAGE_COLUMNS = ("image", "jpg", "png", "webp")
PATH_COLUMNS = ("file_name", "path")
log = logging.getLogger("sdjax")


def _expand_braces(pattern):
    """'a/{000..002}.tar' -> ['a/000.tar', 'a/001.tar', 'a/002.tar'] (webdataset's shard lists); 'x{a,b}' too."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    inner, head, tail = m.group(1), pattern[:m.start()], pattern[m.end():]
    r = re.fullmatch(r"(\d+)\.\.(\d+)", inner)
    items = [str(i).zfill(len(r.group(1))) for i in range(int(r.group(1)), int(r.group(2)) + 1)] if r \
        else inner.split(",")
    return [p for item in items for p in _expand_braces(head + item + tail)]


def list_shards(path, source):
    """The shard files of `path` (a folder, searched recursively; a glob; or a {000..099} brace pattern), sorted."""
    suffixes = SOURCES[source]
    if os.path.isdir(path):
        files = [os.path.join(root, f) for root, _, names in os.walk(path) for f in names if f.endswith(suffixes)]
    else:
        files = [f for p in _expand_braces(path) for f in (glob.glob(p) if glob.has_magic(p) else [p])
                 if os.path.isfile(f)]
    if not files:
        raise FileNotFoundError(f"data: no {source} shards ({'/'.join(suffixes)}) at {path!r}")
    return sorted(set(files))


def _example(image, caption, name, conditioning=False, cond=None):
    out = {"image": image or b"", "caption": caption.encode("utf-8"), "name": name.encode("utf-8")}
    return {**out, "conditioning_image": cond} if conditioning else out


def _caption_of(files):
    if "txt" in files:
        return files["txt"].decode("utf-8").strip()
    if "json" in files:
        meta = json.loads(files["json"])
        return str(next((meta[k] for k in CAPTION_COLUMNS if k in meta), "")).strip()
    return ""


def read_tar(path, first=0, conditioning=""):
    """(member, example) of a webdataset shard from its member `first` on (the earlier ones' data is not read)."""
    index, key, files = -1, None, {}
    conds = tuple("cond." + e for e in IMAGE_EXTENSIONS) if conditioning else ()

    def done():
        image, cond = (next((files[e] for e in exts if e in files), None) for exts in (IMAGE_EXTENSIONS, conds))
        return index, _example(image, _caption_of(files), f"{path}:{key}", bool(conditioning), cond)

    try:
        with tarfile.open(path) as tar:
            for info in tar:
                if not info.isfile():
                    continue
                folder, base = os.path.split(info.name)
                stem, _, ext = base.partition(".")
                if os.path.join(folder, stem) != key:
                    if index >= first:
                        yield done()
                    index, key, files = index + 1, os.path.join(folder, stem), {}
                if index >= first and ext.lower() in IMAGE_EXTENSIONS + conds + ("txt", "json"):
                    files[ext.lower()] = tar.extractfile(info).read()
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        index = max(index, 0)  # the example being read: counted as bad, with what follows
        log.warning("data: %s unreadable from example %d on (%s); the rest of it is skipped", path, index, e)
        if index >= first:
            yield index, _example(b"", "", f"{path}: unreadable from example {index} on")
        return
    if index >= first:
        yield done()


def _pick(names, wanted):
    lower = {n.lower(): n for n in names}
    return next((lower[w] for w in wanted if w in lower), None)


def read_parquet(path, first=0, conditioning="", rows_per_read=256):
    """(row, example) of a parquet table from row `first` on (earlier row groups are not read)."""
    import pyarrow.parquet as pq
    table = pq.ParquetFile(path)
    names = table.schema_arrow.names
    caption, image = _pick(names, CAPTION_COLUMNS), _pick(names, IMAGE_COLUMNS)
    file_column = None if image else _pick(names, PATH_COLUMNS)
    if caption is None or (image or file_column) is None:
        raise ValueError(f"data: {path} needs a caption column {CAPTION_COLUMNS} and an image column "
                         f"{IMAGE_COLUMNS} or a path column {PATH_COLUMNS}; it has {names}")
    if conditioning and conditioning not in names:
        raise ValueError(f"data: {path} has no conditioning-image column {conditioning!r} (data.conditioning_image); "
                         f"it has {names}")
    folder = os.path.dirname(os.path.abspath(path))
    columns = [caption, image or file_column] + ([conditioning] if conditioning else [])
    row, groups = 0, []
    for g in range(table.num_row_groups):
        n = table.metadata.row_group(g).num_rows
        if row + n > first:
            groups.append(g)
        else:
            row += n
    for batch in table.iter_batches(rows_per_read, row_groups=groups, columns=columns):
        for r in batch.to_pylist():
            if row >= first:
                (value, name), (cond, _) = (_image_value(r.get(c), folder, f"{path}:{row}")
                                            for c in (image or file_column, conditioning))
                yield row, _example(value, str(r[caption] or "").strip(), name, bool(conditioning), cond)
            row += 1


def _image_value(value, folder, name):
    """(bytes or None, name) of a table's image cell: bytes, a datasets Image {"bytes", "path"}, or a path relative
    to the table's folder (b"" when unreadable; the name: the path)."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, str):
        name = value = os.path.join(folder, value)
        try:
            with open(value, "rb") as f:
                value = f.read()
        except OSError:
            value = b""
    return value, name


READERS = {"webdataset": read_tar, "parquet": read_parquet}

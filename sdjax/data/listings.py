"""Listing files: one record per line of a JSONL file, or per row of a CSV / TSV file with a header."""
import csv
import json
import os

CAPTION_KEYS = ("caption", "text")  # the caption's column, as named in listings
FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".tsv": "tsv", ".csv": "csv"}


def read_records(path, source=None):
    """[{column: value}] of `path`; source "jsonl", "csv" or "tsv" (None: by the file's extension, else csv)."""
    source = source or FORMATS.get(os.path.splitext(path)[1].lower(), "csv")
    with open(path, encoding="utf-8", newline="") as f:
        if source == "jsonl":
            return [json.loads(line) for line in f if line.strip()]
        return list(csv.DictReader(f, delimiter="\t" if source == "tsv" else ","))


def pick(record, keys, where):
    """The value of the first of `keys` in `record`; ValueError naming `where` (e.g. "FILE row 3") if none is."""
    for key in keys:
        if key in record:
            return record[key]
    raise ValueError(f"{where} has none of the columns {keys}; found {sorted(record)}")

"""Reading tensors from checkpoint files (safetensors; PyTorch pickles when torch is installed).

A .safetensors file is memory-mapped: its tensors are read-only views, read from disk when used, in the file's
dtype (bfloat16 as ml_dtypes'); `release(tensor)` gives the memory of one that was read back, so a loader that
converts tensor by tensor holds the model once, not the file and the model.
"""
import json
import mmap
import os
import pickle
import re
import struct

import ml_dtypes
import numpy as np
from numpy.lib.array_utils import byte_bounds
from safetensors import SafetensorError, safe_open

from sdjax.errors import WeightLoadError


_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "I64": np.int64,
           "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def _read_safetensors(path):
    with safe_open(path, framework="numpy") as f:  # checks the header (the errors of a corrupt file)
        names = list(f.keys())
    with open(path, "rb") as fh:
        (size,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(size))
        mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if names else None
    out = {}
    for name in names:
        info = header[name]
        if info["dtype"] not in _DTYPES:
            raise WeightLoadError(f"{path}: tensor {name} has dtype {info['dtype']}, which sdjax does not read")
        dtype = np.dtype(_DTYPES[info["dtype"]])
        start, end = info["data_offsets"]
        out[name] = np.frombuffer(mapped, dtype, count=(end - start) // dtype.itemsize,
                                  offset=8 + size + start).reshape(info["shape"])
    return out


def release(array):
    """Drop the pages of a memory-mapped file under `array` (a view of one) from this process's memory: the
    file stays mapped, and is read again if the view is used again. Other arrays: nothing to do."""
    base = array
    while isinstance(base, np.ndarray):
        base = base.base
    if not (isinstance(base, memoryview) and isinstance(base.obj, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED")):
        return
    low, high = byte_bounds(array)
    origin = np.frombuffer(base, np.uint8).ctypes.data
    first = (low - origin) // mmap.PAGESIZE * mmap.PAGESIZE
    if high > low:
        base.obj.madvise(mmap.MADV_DONTNEED, first, high - origin - first)


def _read_pickle(path):
    """Tensors of a PyTorch pickle (nested `state_dict` unwrapped; a top-level `global_step` kept; the tensors of a
    dict in it named `dict.key`, as A1111's embeddings' `string_to_param.*`)."""
    try:
        import torch
    except ImportError:
        raise WeightLoadError(
            f"{path}: reading a PyTorch pickle (.bin/.ckpt/.pt) needs torch installed; prefer the "
            ".safetensors release of the checkpoint, which does not") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if found is None:
            raise
        raise WeightLoadError(
            f"{path}: holds Python objects besides tensors ({found.group(1)}; training state?), "
            "which would run code to unpickle and so are not loaded; use the .safetensors or "
            "pruned release of the checkpoint") from None
    step = obj.get("global_step") if isinstance(obj, dict) else None
    while isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise WeightLoadError(f"{path}: holds a {type(obj).__name__}, not a dict of named tensors")
    obj = {**obj, **{f"{k}.{k2}": v2 for k, v in obj.items() if isinstance(v, dict) for k2, v2 in v.items()}}
    out = {k: (v.float() if v.is_floating_point() else v).numpy()
           for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if isinstance(step, int):
        out["global_step"] = np.asarray(step)
    return out


def read_tensors(path):
    """{name: np.ndarray} from a .safetensors file or (with torch) a .bin/.ckpt/.pt pickle."""
    if not os.path.isfile(path):
        raise WeightLoadError(f"weights file not found: {path}")
    if path.endswith(".safetensors"):
        read = _read_safetensors
    elif path.endswith((".bin", ".ckpt", ".pt", ".pth")):
        read = _read_pickle
    else:
        raise WeightLoadError(f"{path}: unknown weights format (expected .safetensors, .bin, .ckpt or .pt)")
    try:
        return read(path)
    except WeightLoadError:
        raise
    # What safetensors and torch raise for truncated or corrupt files (torch: zip, EOF, pickle errors).
    except (SafetensorError, OSError, RuntimeError, EOFError, KeyError, ValueError,
            pickle.UnpicklingError) as e:
        why = re.split(r"\.\s|\n", str(e))[0][:200] or type(e).__name__
        raise WeightLoadError(f"{path}: cannot be read, truncated or corrupt? ({why}); "
                              "download it again") from None

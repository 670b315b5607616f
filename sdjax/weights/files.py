"""Reading tensors from checkpoint files (safetensors; PyTorch pickles when torch is installed)."""
import os
import pickle
import re

import jax
import numpy as np
from safetensors import SafetensorError, safe_open

from sdjax.errors import WeightLoadError


def _read_safetensors(path):
    out = {}
    with safe_open(path, framework="numpy") as f:
        names = list(f.keys())
        bf16 = [n for n in names if f.get_slice(n).get_dtype() == "BF16"]
        out = {n: f.get_tensor(n) for n in names if n not in bf16}
    if bf16:  # numpy has no bfloat16: read those through JAX, on the host.
        with jax.default_device(jax.devices("cpu")[0]), safe_open(path, framework="flax") as f:
            out.update({n: np.asarray(f.get_tensor(n)) for n in bf16})
    return out


def _read_pickle(path):
    """Tensors of a PyTorch pickle (nested `state_dict` unwrapped; a top-level `global_step` kept)."""
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

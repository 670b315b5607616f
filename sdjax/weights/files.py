"""Reading tensors from checkpoint files (safetensors; PyTorch pickles when torch is installed)."""
import os
import pickle

import jax
import numpy as np
from safetensors import SafetensorError, safe_open

from sdjax.weights.errors import WeightLoadError


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
    except pickle.UnpicklingError:  # torch's message is a page long: say it in one line
        raise WeightLoadError(
            f"{path}: holds Python objects besides tensors (training state?), which are not unpickled "
            "for safety, or is corrupt; use a pruned or .safetensors checkpoint") from None
    except (RuntimeError, EOFError, OSError, KeyError) as e:  # what torch.load raises on a cut or garbled file
        raise WeightLoadError(f"{path}: not a readable PyTorch checkpoint, truncated or corrupt "
                              f"({_why(e)})") from None
    step = obj.get("global_step") if isinstance(obj, dict) else None
    while isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    out = {k: (v.float() if v.is_floating_point() else v).numpy()
           for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if isinstance(step, int):
        out["global_step"] = np.asarray(step)
    return out


def _why(e):
    """`Type: first sentence` of an exception: torch's messages run to a paragraph."""
    first = (str(e).splitlines() or [""])[0].split(". ")[0]
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def read_tensors(path):
    """{name: np.ndarray} from a .safetensors file or (with torch) a .bin/.ckpt/.pt pickle."""
    if not os.path.isfile(path):
        raise WeightLoadError(f"weights file not found: {path}")
    if path.endswith(".safetensors"):
        try:
            return _read_safetensors(path)
        except SafetensorError as e:
            raise WeightLoadError(f"{path}: not a readable .safetensors file, truncated or corrupt ({e})") from None
    if path.endswith((".bin", ".ckpt", ".pt", ".pth")):
        return _read_pickle(path)
    raise WeightLoadError(f"{path}: unknown weights format (expected .safetensors, .bin, .ckpt or .pt)")

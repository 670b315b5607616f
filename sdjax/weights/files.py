"""Reading tensors from checkpoint files (safetensors; PyTorch pickles when torch is installed)."""
import os

import jax
import numpy as np
from safetensors import safe_open

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


def _read_torch(path):
    try:
        import torch
    except ImportError:
        raise WeightLoadError(
            f"{path}: reading a PyTorch pickle (.bin/.ckpt/.pt) needs torch installed; "
            "convert it to .safetensors or `pip install torch`") from None
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    return {k: v.float().numpy() if v.is_floating_point() else v.numpy()
            for k, v in state.items() if isinstance(v, torch.Tensor)}


def read_tensors(path):
    """{name: np.ndarray} from a .safetensors file or (with torch) a .bin/.ckpt/.pt pickle."""
    if not os.path.isfile(path):
        raise WeightLoadError(f"weights file not found: {path}")
    if path.endswith(".safetensors"):
        return _read_safetensors(path)
    if path.endswith((".bin", ".ckpt", ".pt", ".pth")):
        return _read_torch(path)
    raise WeightLoadError(f"{path}: unknown weights format (expected .safetensors, .bin, .ckpt or .pt)")

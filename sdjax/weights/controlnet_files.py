"""ControlNet weights: diffusers ControlNet folders (and, below, the original single files) -> (module, params)."""
import os

import numpy as np

from sdjax.errors import WeightLoadError
from sdjax.weights import diffusers


def load_controlnet(path, dtype=np.float32, variant=None):
    """(ControlNetModel, params in `dtype`) of a diffusers ControlNet folder (config.json + weights; variants,
    .bin, sharded)."""
    if os.path.isdir(path):
        return diffusers.load_model_folder(path, "controlnet", dtype, variant)
    raise WeightLoadError(f"{path}: not a ControlNet folder (config.json + diffusion_pytorch_model.safetensors)")

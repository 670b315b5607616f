"""torchvision importable beside the CPU torch (for the test references and the benchmarks; no other side effects)."""
import ctypes
import importlib.util
import os

import torch


def torchvision_without_ops():
    """The registry's torchvision (pytorch-fid's, open_clip's) is built for CUDA torch: with the CPU torch of these
    machines its C++ ops do not load, and its import then fails registering fakes of two of them. Declaring those
    two lets it import; the references used here (models, transforms) never call its C++ ops."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None:
        return
    try:
        ctypes.CDLL(os.path.join(os.path.dirname(spec.origin), "_C.so"))
    except OSError:
        lib = torch.library.Library("torchvision", "DEF")
        for op in ("nms", "qnms"):
            lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        torchvision_without_ops.lib = lib  # kept alive: the definitions go with it

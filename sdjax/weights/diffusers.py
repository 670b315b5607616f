"""Diffusers-format model folders: import into Flax params and export back (safetensors)."""
import json
import os
import shutil

import numpy as np
from safetensors.numpy import save_file

from sdjax.models import registry
from sdjax.weights.convert import to_params, to_state_dict
from sdjax.weights.errors import WeightLoadError
from sdjax.weights.files import read_tensors

KINDS = ("unet", "vae", "text_encoder")
_STEM = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}
_CLASS = {"unet": ("diffusers", "UNet2DConditionModel"), "vae": ("diffusers", "AutoencoderKL"),
          "text_encoder": ("transformers", "CLIPTextModel")}


def read_json(path):
    """Parsed JSON file, or a WeightLoadError naming the missing/broken file."""
    if not os.path.isfile(path):
        raise WeightLoadError(f"missing file: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except ValueError as e:  # JSONDecodeError, or UnicodeDecodeError of a binary file
        raise WeightLoadError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise WeightLoadError(f"{path}: expected a JSON object {{...}}, found a {type(obj).__name__}")
    return obj


def _weight_file(folder, stem, variant):
    """Path of the weights (or of a shard index) in a component folder."""
    stem = f"{stem}.{variant}" if variant else stem
    for ext in (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json"):
        if os.path.isfile(os.path.join(folder, stem + ext)):
            return os.path.join(folder, stem + ext)
    found = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    raise WeightLoadError(
        f"no weights in {folder}: expected {stem}.safetensors (or .bin, or a sharded index); found {found}")


def read_component_tensors(folder, kind, variant=None):
    """{torch name: np.ndarray} of one component folder (sharded or not)."""
    path = _weight_file(folder, _STEM[kind], variant)
    if not path.endswith(".index.json"):
        return read_tensors(path)
    tensors = {}
    for shard in sorted(set(read_json(path)["weight_map"].values())):
        tensors.update(read_tensors(os.path.join(folder, shard)))
    return tensors


def _with_prefix(kind, tensors):
    """transformers >= 5 saves CLIPTextModel without the `text_model.` prefix; older files have it."""
    if kind != "text_encoder" or any(k.startswith("text_model.") for k in tensors):
        return tensors
    return {f"text_model.{k}": v for k, v in tensors.items()}


def load_component(root, kind, dtype=np.float32, variant=None):
    """(module, params) of `kind` from `root/kind/{config.json, weights}`."""
    folder = os.path.join(root, kind)
    if not os.path.isdir(folder):
        raise WeightLoadError(f"{root}: no {kind}/ folder (a diffusers folder holds "
                              f"{', '.join(k + '/' for k in KINDS)}); found {sorted(os.listdir(root))}")
    config = read_json(os.path.join(folder, "config.json"))
    module = registry.build(kind, config)
    params = to_params(kind, _with_prefix(kind, read_component_tensors(folder, kind, variant)),
                       registry.param_shapes(kind, module), dtype=dtype)
    return module, params


def save_component(root, kind, module, params):
    """Write `root/kind/config.json` and the weights as safetensors, readable by diffusers."""
    folder = os.path.join(root, kind)
    os.makedirs(folder, exist_ok=True)
    lib, cls = _CLASS[kind]
    config = registry.config_of(module)
    if lib == "diffusers":
        config = {"_class_name": cls, **config}
    else:
        config = {"architectures": [cls], "model_type": "clip_text_model", **config}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in to_state_dict(params).items()}
    save_file(tensors, os.path.join(folder, _STEM[kind] + ".safetensors"))


def save_folder(root, modules, params, scheduler, tokenizer_dir=None):
    """Export a full pipeline as a diffusers folder (model_index.json + components)."""
    os.makedirs(root, exist_ok=True)
    for kind in KINDS:
        save_component(root, kind, modules[kind], params[kind])
    os.makedirs(os.path.join(root, "scheduler"), exist_ok=True)
    scheduler = {"_class_name": scheduler.get("_class_name", "DDIMScheduler"), **scheduler}
    with open(os.path.join(root, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(scheduler, f, indent=2)
    index = {"_class_name": "StableDiffusionPipeline", "requires_safety_checker": False,
             "safety_checker": [None, None], "feature_extractor": [None, None],
             "scheduler": ["diffusers", scheduler["_class_name"]],
             **{kind: list(_CLASS[kind]) for kind in KINDS}}
    if tokenizer_dir:
        shutil.copytree(tokenizer_dir, os.path.join(root, "tokenizer"), dirs_exist_ok=True)
        index["tokenizer"] = ["transformers", "CLIPTokenizer"]
    with open(os.path.join(root, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2)

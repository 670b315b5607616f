"""Diffusers-format model folders: import into Flax params and export back (safetensors)."""
import json
import logging
import os
import re
import shutil

import numpy as np
from flax import traverse_util
from safetensors.numpy import save_file

from sdjax.models import registry
from sdjax.weights.convert import to_params, to_state_dict
from sdjax.errors import UnsupportedConfig, WeightLoadError
from sdjax.weights.files import read_tensors

log = logging.getLogger("sdjax")

KINDS = ("unet", "vae", "text_encoder", "text_encoder_2")  # SDXL adds the second; its refiner has only that one
TOKENIZERS = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}
# Weight file names in the order diffusers / transformers look for them: (safetensors, pickle).
_FILES = {"diffusers": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
          "transformers": ("model.safetensors", "pytorch_model.bin")}
# diffusers < 0.15 named the VAE mid-block attention's layers query/key/value/proj_attn.
_OLD_VAE_ATTENTION = re.compile(r"^((?:encoder|decoder)\.mid_block\.attentions\.0)\.(query|key|value|proj_attn)\.")
_NEW_VAE_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
# Stable Diffusion's training noise schedule, as diffusers' single-file loading configures it.
SD_SCHEDULER = {"_class_name": "PNDMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
                "beta_end": 0.012, "beta_schedule": "scaled_linear", "trained_betas": None,
                "prediction_type": "epsilon", "steps_offset": 1, "set_alpha_to_one": False,
                "clip_sample": False, "skip_prk_steps": True, "timestep_spacing": "leading"}
_CLASS = {"unet": ("diffusers", "UNet2DConditionModel"), "vae": ("diffusers", "AutoencoderKL"),
          "text_encoder": ("transformers", "CLIPTextModel"),
          "text_encoder_2": ("transformers", "CLIPTextModelWithProjection"),
          "controlnet": ("diffusers", "ControlNetModel")}
# model_index.json keys that are pipeline settings (SDXL: zero embeddings for an empty negative prompt; the
# refiner's aesthetic-score conditioning), kept as Pretrained.options
PIPELINE_OPTIONS = ("force_zeros_for_empty_prompt", "requires_aesthetics_score")


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


def with_variant(name, variant):
    """'model.safetensors', 'fp16' -> 'model.fp16.safetensors'; index files: '....index.fp16.json' (as diffusers)."""
    if not variant:
        return name
    head, ext = name.rsplit(".", 1)
    return f"{head}.{variant}.{ext}"


def model_index(root):
    """The folder's parsed model_index.json, or None without one."""
    path = os.path.join(root, "model_index.json")
    return read_json(path) if os.path.isfile(path) else None


def components(root):
    """The model components of a diffusers folder, in KINDS order: those model_index.json lists with a class
    (the SDXL refiner lists text_encoder as [null, null]), else the component folders present."""
    listed = model_index(root)
    if listed is not None:
        kinds = [k for k in KINDS if isinstance(listed.get(k), list) and None not in listed[k]]
    else:
        kinds = [k for k in KINDS if os.path.isdir(os.path.join(root, k))]
    need = [k for k in ("unet", "vae") if k not in kinds]
    if need or not any(k.startswith("text_encoder") for k in kinds):
        raise WeightLoadError(f"{root}: a diffusers Stable Diffusion folder holds unet/, vae/ and text_encoder/ "
                              f"(SDXL: and/or text_encoder_2/); found {sorted(os.listdir(root))}")
    return tuple(kinds)


def pipeline_options(root):
    """The PIPELINE_OPTIONS that model_index.json sets."""
    listed = model_index(root) or {}
    return {k: listed[k] for k in PIPELINE_OPTIONS if k in listed}


def _weight_file(folder, library, variant):
    """Path of the weights (or of a shard index) in a `library` ("diffusers" / "transformers") model folder;
    falls back from a missing variant."""
    names = _FILES[library]
    candidates = [n for name in names for n in (name, name + ".index.json")]
    for v in ([variant, None] if variant else [None]):
        for name in candidates:
            if os.path.isfile(os.path.join(folder, with_variant(name, v))):
                if v != variant:
                    log.warning("%s: no %r variant, loading %s", folder, variant, name)
                return os.path.join(folder, with_variant(name, v))
    found = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    raise WeightLoadError(f"no weights in {folder}: expected {' or '.join(with_variant(n, variant) for n in names)}"
                          f" (or a sharded *.index.json); found {found}")


def read_folder_tensors(folder, library, variant=None):
    """{torch name: np.ndarray} of a `library` ("diffusers" / "transformers") model folder, sharded or not."""
    path = _weight_file(folder, library, variant)
    if not path.endswith(".json"):
        return read_tensors(path)
    tensors = {}
    for shard in sorted(set(read_json(path)["weight_map"].values())):
        tensors.update(read_tensors(os.path.join(folder, shard)))
    return tensors


def read_component_tensors(folder, kind, variant=None):
    """{torch name: np.ndarray} of one component folder (sharded or not), under today's names."""
    return current_names(kind, read_folder_tensors(folder, _CLASS[kind][0], variant))


def current_names(kind, tensors):
    """Tensor names of older writers renamed to today's (diffusers renames them on load too).

    transformers >= 5 saves the CLIP towers without the `text_model.` prefix (the projection of SDXL's second
    tower stays `text_projection`); older files have it.
    diffusers < 0.15 named the VAE's mid-block attention layers query/key/value/proj_attn.
    """
    if kind.startswith("text_encoder") and not any(k.startswith("text_model.") for k in tensors):
        return {k if k.startswith("text_projection.") else f"text_model.{k}": v for k, v in tensors.items()}
    if kind != "vae":
        return tensors
    rename = lambda m: f"{m.group(1)}.{_NEW_VAE_ATTENTION[m.group(2)]}."  # noqa: E731
    return {_OLD_VAE_ATTENTION.sub(rename, k): v for k, v in tensors.items()}


def load_component(root, kind, dtype=np.float32, variant=None):
    """(module, params) of `kind` from `root/kind/{config.json, weights}`."""
    folder = os.path.join(root, kind)
    if not os.path.isdir(folder):
        raise WeightLoadError(f"{root}: no {kind}/ folder (a diffusers folder holds unet/, vae/, "
                              f"text_encoder/); found {sorted(os.listdir(root))}")
    return load_model_folder(folder, kind, dtype, variant)


def load_model_folder(folder, kind, dtype=np.float32, variant=None):
    """(module, params) of a model folder of `kind` ({config.json, weights}: a pipeline's component, or a
    model saved alone, as ControlNets are)."""
    config = read_json(os.path.join(folder, "config.json"))
    try:
        module = registry.build(kind, config)
    except UnsupportedConfig as e:
        raise WeightLoadError(f"{os.path.join(folder, 'config.json')}: {e}") from None
    params = to_params(kind, read_component_tensors(folder, kind, variant),
                       registry.param_shapes(kind, module), dtype=dtype)
    return module, params


def read_scheduler(root):
    """The folder's scheduler config, `_class_name` as model_index.json names it (the class diffusers builds);
    without scheduler_config.json, SD's training schedule (with a warning)."""
    path = os.path.join(root, "scheduler", "scheduler_config.json")
    if not os.path.isfile(path):
        log.warning("%s has no scheduler/scheduler_config.json: assuming Stable Diffusion's schedule "
                    "(scaled_linear betas 0.00085..0.012 over 1000 steps, epsilon prediction)", root)
        return dict(SD_SCHEDULER)
    config = read_json(path)
    listed = (model_index(root) or {}).get("scheduler")
    if isinstance(listed, list) and len(listed) == 2 and listed[1]:
        config["_class_name"] = listed[1]
    return config


def note_ignored_components(root):
    """Log, in one line, the model_index.json components sdjax does not use (safety checker, ...)."""
    listed = model_index(root) or {}
    used = {*KINDS, *TOKENIZERS.values(), "scheduler"}
    ignored = [f"{k} ({v[1]})" for k, v in listed.items()
               if not k.startswith("_") and k not in used and isinstance(v, list) and None not in v]
    if ignored:
        log.info("%s: not used by sdjax: %s", root, ", ".join(ignored))


def save_component(root, kind, module, params, max_shard_size=10**10):
    """Write `root/kind/` (save_model_folder)."""
    save_model_folder(os.path.join(root, kind), kind, module, params, max_shard_size)


def save_model_folder(folder, kind, module, params, max_shard_size=10**10):
    """Write `folder/config.json` and the weights as float32 safetensors, readable by diffusers (load_model_folder's
    inverse): past max_shard_size bytes in shards with an index, as diffusers' and transformers' save_pretrained
    (10 GB by default: the SDXL U-Net); converted shard by shard, so that a shard's copies are in memory at once."""
    os.makedirs(folder, exist_ok=True)
    lib, cls = _CLASS[kind]
    config = registry.config_of(module)
    if lib == "diffusers":
        config = {"_class_name": cls, **config}
    else:
        config = {"architectures": [cls], "model_type": "clip_text_model", **config}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    flat = traverse_util.flatten_dict(params)
    shards, size = [[]], 0
    for path, leaf in flat.items():
        if shards[-1] and size + leaf.size * 4 > max_shard_size:
            shards, size = shards + [[]], 0
        shards[-1].append(path)
        size += leaf.size * 4
    name = _FILES[lib][0]
    stem, n = name.removesuffix(".safetensors"), len(shards)
    files = [name] if n == 1 else [f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for stale in {name, name + ".index.json"} - {files[0] if n == 1 else name + ".index.json"}:
        if os.path.isfile(os.path.join(folder, stale)):  # a single file would be read before an index
            os.remove(os.path.join(folder, stale))
    weight_map = {}
    for file, paths in zip(files, shards):
        shard = to_state_dict(traverse_util.unflatten_dict({p: flat[p] for p in paths}))
        save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in shard.items()}, os.path.join(folder, file))
        weight_map.update(dict.fromkeys(shard, file))
        del shard
    if n > 1:
        with open(os.path.join(folder, name + ".index.json"), "w") as f:
            json.dump({"metadata": {"total_size": 4 * sum(x.size for x in flat.values())}, "weight_map": weight_map},
                      f, indent=2)


def save_folder(root, modules, params, scheduler, tokenizer_dirs=(), options=(), max_shard_size=10**10):
    """Export a full pipeline as a diffusers folder (model_index.json + components): an SDXL one when the
    modules have text_encoder_2. tokenizer_dirs: {tokenizer folder name: folder to copy}; options: the
    model_index.json PIPELINE_OPTIONS; max_shard_size: save_component's."""
    os.makedirs(root, exist_ok=True)
    kinds = [k for k in KINDS if k in modules]
    for kind in kinds:
        save_component(root, kind, modules[kind], params[kind], max_shard_size)
    os.makedirs(os.path.join(root, "scheduler"), exist_ok=True)
    scheduler = {"_class_name": scheduler.get("_class_name", "DDIMScheduler"), **scheduler}
    with open(os.path.join(root, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(scheduler, f, indent=2)
    if "text_encoder_2" in modules:
        index = {"_class_name": "StableDiffusionXLPipeline" if "text_encoder" in modules
                 else "StableDiffusionXLImg2ImgPipeline", "text_encoder": [None, None], "tokenizer": [None, None]}
    else:
        index = {"_class_name": "StableDiffusionPipeline", "requires_safety_checker": False,
                 "safety_checker": [None, None], "feature_extractor": [None, None]}
    index.update({"scheduler": ["diffusers", scheduler["_class_name"]], **dict(options),
                  **{kind: list(_CLASS[kind]) for kind in kinds}})
    for name, folder in dict(tokenizer_dirs).items():
        shutil.copytree(folder, os.path.join(root, name), dirs_exist_ok=True)
        index[name] = ["transformers", "CLIPTokenizer"]
    with open(os.path.join(root, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2)

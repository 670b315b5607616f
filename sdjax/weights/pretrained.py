"""One entry point for pretrained Stable Diffusion weights: a diffusers folder or a single file."""
import dataclasses
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from sdjax.clip_vocab import write_clip_tokenizer
from sdjax.models import registry
from sdjax.tokenizer import load_tokenizer
from sdjax.weights import diffusers, single_file
from sdjax.weights.convert import to_params
from sdjax.weights.errors import WeightLoadError

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass
class Pretrained:
    """Modules, params and tokenizer of a Stable Diffusion checkpoint.

    modules/params: {"unet" | "vae" | "text_encoder": flax module / params pytree};
    scheduler: the diffusers scheduler config dict; source: the path it came from.
    """
    modules: dict
    params: dict
    tokenizer: object
    scheduler: dict
    source: str


def _dtype(name):
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def _with_dtype(modules, params, dtype):
    """Compute in `dtype`; params stored in `dtype` too (halves memory for bf16 inference)."""
    modules = {k: m.clone(dtype=dtype, param_dtype=dtype) for k, m in modules.items()}
    params = {k: _cast(p, dtype) for k, p in params.items()}
    return modules, params


def _cast(tree, dtype):
    return jax.tree.map(lambda x: jnp.asarray(x, dtype), tree)


def load_folder(path, variant=None):
    """(modules, params, tokenizer, scheduler config) of a diffusers folder."""
    modules, params = {}, {}
    for kind in diffusers.KINDS:
        modules[kind], params[kind] = diffusers.load_component(path, kind, variant=variant)
    tokenizer = load_tokenizer(os.path.join(path, "tokenizer"))
    sched_file = os.path.join(path, "scheduler", "scheduler_config.json")
    scheduler = diffusers.read_json(sched_file) if os.path.isfile(sched_file) else {}
    return modules, params, tokenizer, scheduler


def load_single_file(path, config_name=None, use_ema=None):
    """(modules, params, tokenizer, scheduler config) of an original CompVis/Stability checkpoint."""
    tensors = single_file.read_checkpoint(path)
    configs = single_file.infer_configs(tensors, config_name)
    parts = single_file.split_original(tensors, use_ema)
    modules, params = {}, {}
    for kind in diffusers.KINDS:
        modules[kind] = registry.build(kind, configs[kind])
        params[kind] = to_params(kind, parts[kind], registry.param_shapes(kind, modules[kind]))
    sd2 = configs["text_encoder"]["hidden_act"] == "gelu"
    folder = write_clip_tokenizer(tempfile.mkdtemp(prefix="sdjax_tok_"), pad_token="!" if sd2 else "<|endoftext|>")
    return modules, params, load_tokenizer(folder), configs["scheduler"]


def load_pretrained(path, dtype="float32", config_name=None, variant=None, use_ema=None):
    """Load a diffusers folder or a single-file checkpoint (.safetensors, .ckpt) into a Pretrained.

    config_name picks the architecture of a single file where shapes cannot tell (e.g. "sd21"
    for v-prediction); variant picks e.g. "fp16" weight files in a diffusers folder; use_ema
    (single files) None takes a training checkpoint's EMA UNet when it has one, False the raw one.
    """
    dtype = _dtype(dtype)
    if os.path.isdir(path) and use_ema is not None:
        raise ValueError("use_ema applies to single-file checkpoints; a diffusers folder has one UNet")
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "model_index.json")) and not os.path.isdir(os.path.join(path, "unet")):
            raise WeightLoadError(f"{path} is not a diffusers folder: no model_index.json and no unet/ inside")
        modules, params, tokenizer, scheduler = load_folder(path, variant)
    elif os.path.isfile(path):
        modules, params, tokenizer, scheduler = load_single_file(path, config_name, use_ema)
    else:
        raise WeightLoadError(f"model not found: {path} (expected a diffusers folder or a .safetensors/.ckpt file)")
    modules, params = _with_dtype(modules, params, dtype)
    return Pretrained(modules, params, tokenizer, scheduler, os.path.abspath(path))


def save_pretrained(pretrained, path):
    """Export as a diffusers folder; `load_pretrained` of it gives back the same params."""
    with tempfile.TemporaryDirectory() as tmp:
        pretrained.tokenizer.save_pretrained(tmp)
        params = {k: _cast(p, np.float32) for k, p in pretrained.params.items()}
        diffusers.save_folder(path, pretrained.modules, params, pretrained.scheduler, tokenizer_dir=tmp)

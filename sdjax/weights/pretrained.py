"""One entry point for pretrained Stable Diffusion weights: a diffusers folder or a single file."""
import dataclasses
import logging
import os
import tempfile

import jax.numpy as jnp
import numpy as np

from sdjax.text.clip_vocab import write_clip_tokenizer
from sdjax.models import registry
from sdjax.text.tokenizer import load_tokenizer
from sdjax.weights import diffusers, single_file
from sdjax.weights.convert import to_params
from sdjax.errors import WeightLoadError

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# AutoencoderKL config keys that change the computation, not only the tensor shapes.
_VAE_ARCHITECTURE = ("in_channels", "out_channels", "block_out_channels", "layers_per_block",
                     "latent_channels", "norm_num_groups", "act_fn", "mid_block_add_attention",
                     "use_quant_conv", "use_post_quant_conv")
# the keys that define the diffusion model's latent space (autoencoder.latent_affine): the model's are kept
_LATENT_SPACE = ("scaling_factor", "shift_factor", "latents_mean", "latents_std")
log = logging.getLogger("sdjax")


@dataclasses.dataclass
class Pretrained:
    """Modules, params and tokenizers of a Stable Diffusion checkpoint.

    modules/params: {"unet" | "vae" | "text_encoder" | "text_encoder_2" (SDXL): flax module / params pytree};
    tokenizer / tokenizer_2: those of text_encoder / text_encoder_2 (None without it); scheduler: the diffusers
    scheduler config dict; source: the path it came from; options: diffusers.PIPELINE_OPTIONS it sets.
    """
    modules: dict
    params: dict
    tokenizer: object
    scheduler: dict
    source: str
    tokenizer_2: object = None
    options: dict = dataclasses.field(default_factory=dict)


def _dtype(name):
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def _with_dtype(modules, dtype):
    """Modules computing in `dtype`, their params stored in `dtype` too (halves memory for bf16 inference)."""
    return {k: m.clone(dtype=dtype, param_dtype=dtype) for k, m in modules.items()}


def load_folder(path, variant=None, dtype=np.float32):
    """(modules, params in `dtype`, {tokenizer folder name: tokenizer}, scheduler config) of a diffusers folder."""
    modules, params, tokenizers = {}, {}, {}
    for kind in diffusers.components(path):
        modules[kind], params[kind] = diffusers.load_component(path, kind, dtype=dtype, variant=variant)
        if kind in diffusers.TOKENIZERS:
            name = diffusers.TOKENIZERS[kind]
            tokenizers[name] = load_tokenizer(os.path.join(path, name))
    diffusers.note_ignored_components(path)
    return modules, params, tokenizers, diffusers.read_scheduler(path)


def load_single_file(path, config_name=None, use_ema=None, dtype=np.float32):
    """(modules, params in `dtype`, {tokenizer name: tokenizer}, scheduler config, pipeline options) of an
    original CompVis / Stability checkpoint (SD 1.x, 2.x, XL)."""
    tensors = single_file.read_checkpoint(path)
    configs = single_file.infer_configs(tensors, config_name)
    parts = single_file.split_original(tensors, use_ema)
    modules, params = {}, {}
    for kind in [k for k in diffusers.KINDS if k in parts]:
        modules[kind] = registry.build(kind, configs[kind])
        params[kind] = to_params(kind, parts[kind], registry.param_shapes(kind, modules[kind]), dtype=dtype)
    # the bundled CLIP vocabulary: SD 1.x and CLIP ViT-L pad with <|endoftext|>, OpenCLIP towers with "!"
    pads = {"tokenizer": "!" if configs.get("text_encoder", {}).get("hidden_act") == "gelu" else "<|endoftext|>",
            "tokenizer_2": "!"}
    tokenizers = {name: load_tokenizer(write_clip_tokenizer(tempfile.mkdtemp(prefix="sdjax_tok_"), pad_token=pads[name]))
                  for kind, name in diffusers.TOKENIZERS.items() if kind in modules}
    return modules, params, tokenizers, configs["scheduler"], single_file.pipeline_options(configs)


def load_vae(path, module, dtype=np.float32):
    """Params for the VAE `module` from a diffusers VAE folder or a single file (diffusers or ldm names).

    The model's VAE config (its latent space: scaling_factor, latents_mean, ...) is kept; a folder's
    config.json must agree on the architecture, and a file's tensors on the shapes.
    """
    if os.path.isdir(path):
        folder = os.path.join(path, "vae") if os.path.isdir(os.path.join(path, "vae")) else path
        config = diffusers.read_json(os.path.join(folder, "config.json"))
        config, mine = registry.config_of(registry.build("vae", config)), registry.config_of(module)
        wrong = [f"{k} = {config[k]!r} (the model's: {mine[k]!r})"
                 for k in _VAE_ARCHITECTURE if config[k] != mine[k]]
        if wrong:
            raise WeightLoadError(f"VAE {folder} does not fit the model's VAE: {'; '.join(wrong)}")
        for key in _LATENT_SPACE:
            if config[key] != mine[key]:
                log.warning("VAE %s: %s %s, keeping the model's %s", folder, key, config[key], mine[key])
        tensors = diffusers.read_component_tensors(folder, "vae")
    else:
        tensors = single_file.split_vae(single_file.read_checkpoint(path))
    return to_params(f"VAE {path}", tensors, registry.param_shapes("vae", module), dtype=dtype)


def load_pretrained(path, dtype="float32", config_name=None, variant=None, use_ema=None, vae=None):
    """Load a diffusers folder or a single-file checkpoint (.safetensors, .ckpt) into a Pretrained.

    config_name picks the architecture of a single file where shapes cannot tell (e.g. "sd21"
    for v-prediction); variant picks e.g. "fp16" weight files in a diffusers folder; use_ema
    (single files) None takes a training checkpoint's EMA UNet when it has one, False the raw one;
    vae replaces the VAE weights (see load_vae).
    """
    dtype = _dtype(dtype)
    host = np.dtype(dtype)  # the params: numpy arrays, converted tensor by tensor from the files
    if os.path.isdir(path) and use_ema is not None:
        raise ValueError("use_ema applies to single-file checkpoints; a diffusers folder has one UNet")
    if os.path.isdir(path) and config_name is not None:
        raise ValueError(f"config_name applies to single-file checkpoints; the diffusers folder {path} "
                         "names its architecture in its config.json files")
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "model_index.json")) and not os.path.isdir(os.path.join(path, "unet")):
            raise WeightLoadError(f"{path} is not a diffusers folder: no model_index.json and no unet/ inside")
        modules, params, tokenizers, scheduler = load_folder(path, variant, host)
        options = diffusers.pipeline_options(path)
    elif os.path.isfile(path):
        modules, params, tokenizers, scheduler, options = load_single_file(path, config_name, use_ema, host)
    else:
        raise WeightLoadError(f"model not found: {path} (expected a diffusers folder or a .safetensors/.ckpt file)")
    if vae is not None:
        params["vae"] = load_vae(vae, modules["vae"], host)
    modules = _with_dtype(modules, dtype)
    return Pretrained(modules, params, tokenizers.get("tokenizer"), scheduler, os.path.abspath(path),
                      tokenizers.get("tokenizer_2"), options)


def save_pretrained(pretrained, path, max_shard_size=10**10):
    """Export as a diffusers folder (float32 weights, sharded past max_shard_size bytes as diffusers'
    save_pretrained does); `load_pretrained` of it gives back the same params."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizers = {}
        for name in diffusers.TOKENIZERS.values():  # Pretrained's fields of the same names
            if getattr(pretrained, name) is not None:
                tokenizers[name] = os.path.join(tmp, name)
                getattr(pretrained, name).save_pretrained(tokenizers[name])
        diffusers.save_folder(path, pretrained.modules, pretrained.params, pretrained.scheduler, tokenizers,
                              pretrained.options, max_shard_size)

"""CLIP models (the scorer of CLIP score) from the user's files: a transformers CLIPModel folder, or an open_clip
checkpoint (MLPerf's `open_clip_pytorch_model.bin`, ViT-H-14) renamed to transformers' names.

open_clip's configs are not in its checkpoints: one comes from `config` (a dict, a JSON file, or a model name of
OPEN_CLIP_CONFIGS), else from `open_clip_config.json` beside the file (as Hugging Face hub folders hold), else
ViT-H-14's; a checkpoint of another shape then fails to load, naming the tensors that differ.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np

from sdjax.errors import UnsupportedConfig, WeightLoadError
from sdjax.models.clip_vision import CLIPModel
from sdjax.weights.convert import to_params
from sdjax.weights.diffusers import read_folder_tensors, read_json
from sdjax.weights.files import read_tensors
from sdjax.weights.ldm_names import open_clip_names

# open_clip's model configs of the common OpenAI/LAION CLIPs (data from open_clip's model_configs/*.json)
_TEXT_L = {"context_length": 77, "vocab_size": 49408, "width": 768, "heads": 12, "layers": 12}
_TEXT_B = {**_TEXT_L, "width": 512, "heads": 8}
OPEN_CLIP_CONFIGS = {
    "ViT-H-14": {"embed_dim": 1024, "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80,
                                                   "patch_size": 14},
                 "text_cfg": {**_TEXT_L, "width": 1024, "heads": 16, "layers": 24}},
    "ViT-bigG-14": {"embed_dim": 1280, "vision_cfg": {"image_size": 224, "layers": 48, "width": 1664,
                                                      "head_width": 104, "mlp_ratio": 4.9231, "patch_size": 14},
                    "text_cfg": {**_TEXT_L, "width": 1280, "heads": 20, "layers": 32}},
    "ViT-L-14": {"embed_dim": 768, "vision_cfg": {"image_size": 224, "layers": 24, "width": 1024, "patch_size": 14},
                 "text_cfg": _TEXT_L},
    "ViT-B-16": {"embed_dim": 512, "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 16},
                 "text_cfg": _TEXT_B},
    "ViT-B-32": {"embed_dim": 512, "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 32},
                 "text_cfg": _TEXT_B},
}
DEFAULT_OPEN_CLIP = "ViT-H-14"  # MLPerf's
# open_clip config keys read here; others must hold their default (falsy, or the value named), which this implements
_USED = {"vision_cfg": {"image_size", "layers", "width", "head_width", "mlp_ratio", "patch_size"},
         "text_cfg": {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio"}}
_DEFAULTS = {"vision_cfg": {"pool_type": "tok", "pos_embed_type": "learnable", "block_type": "default"},
             "text_cfg": {"pool_type": "argmax", "proj_type": "linear", "block_type": "default"}}
_INERT = {"patch_dropout", "output_tokens", "pad_id", "eos_id", "timm_pool", "timm_proj", "timm_drop",
          "hf_proj_type", "hf_pooler_type", "hf_model_pretrained", "timm_model_pretrained", "attn_pooler_queries",
          "attn_pooler_heads", "timm_proj_bias"}  # unused by the towers built here (or training only)
_VISUAL_TOP = {"conv1.weight": "embeddings.patch_embedding.weight", "class_embedding": "embeddings.class_embedding",
               "positional_embedding": "embeddings.position_embedding.weight", "ln_pre.weight": "pre_layrnorm.weight",
               "ln_pre.bias": "pre_layrnorm.bias", "ln_post.weight": "post_layernorm.weight",
               "ln_post.bias": "post_layernorm.bias"}


def open_clip_config(config, checkpoint):
    """(model config, preprocess config) of open_clip `checkpoint`, from `config` (dict, JSON path or
    OPEN_CLIP_CONFIGS name; a hub folder's open_clip_config.json holds "model_cfg" and "preprocess_cfg"), else the
    file beside it, else ViT-H-14's (with open_clip's default preprocessing: {})."""
    beside = os.path.join(os.path.dirname(checkpoint), "open_clip_config.json")
    if config is None:
        config = beside if os.path.isfile(beside) else DEFAULT_OPEN_CLIP
    if isinstance(config, str) and config in OPEN_CLIP_CONFIGS:
        return OPEN_CLIP_CONFIGS[config], {}
    if isinstance(config, str):
        if not os.path.isfile(config):
            raise WeightLoadError(f"open_clip config {config!r}: neither a JSON file nor one of "
                                  f"{sorted(OPEN_CLIP_CONFIGS)}")
        config = read_json(config)
    return config.get("model_cfg", config), config.get("preprocess_cfg", {})


def _check_open_clip(name, cfg, tower):
    for key, value in cfg.items():
        if key not in _USED[tower] and key not in _INERT and value and value != _DEFAULTS[tower].get(key):
            raise UnsupportedConfig(f"open_clip config {name}: {tower}.{key} = {value!r} is not implemented")


def transformers_config(cfg, name="(dict)"):
    """The transformers CLIPConfig dict of an open_clip model config (towers of open_clip's CLIP class: exact GELU
    unless quick_gelu, argmax pooling of the text, the class token of the image)."""
    for key in ("custom_text", "init_logit_bias"):
        if cfg.get(key):
            raise UnsupportedConfig(f"open_clip config {name}: {key} = {cfg[key]!r} is not implemented")
    vision, text = dict(cfg.get("vision_cfg", {})), dict(cfg.get("text_cfg", {}))
    _check_open_clip(name, vision, "vision_cfg")
    _check_open_clip(name, text, "text_cfg")
    if not isinstance(vision.get("layers", 12), int):
        raise UnsupportedConfig(f"open_clip config {name}: vision_cfg.layers = {vision['layers']!r} (a ResNet) is "
                                "not implemented; expected a ViT's layer count")
    act = "quick_gelu" if cfg.get("quick_gelu") else "gelu"
    vw, tw = vision.get("width", 768), text.get("width", 512)
    if vw % vision.get("head_width", 64):
        raise UnsupportedConfig(f"open_clip config {name}: vision_cfg.width = {vw} is not a multiple of head_width = "
                                f"{vision.get('head_width', 64)}")
    return {"projection_dim": cfg["embed_dim"],
            "vision_config": {"hidden_size": vw, "intermediate_size": int(vw * vision.get("mlp_ratio", 4.0)),
                              "num_hidden_layers": vision.get("layers", 12),
                              "num_attention_heads": vw // vision.get("head_width", 64),
                              "image_size": vision.get("image_size", 224), "patch_size": vision.get("patch_size", 16),
                              "hidden_act": act, "layer_norm_eps": 1e-5},
            # eos_token_id 2: pooled at the largest id, open_clip's argmax (the end of text; padding is id 0)
            "text_config": {"hidden_size": tw, "intermediate_size": int(tw * text.get("mlp_ratio", 4.0)),
                            "num_hidden_layers": text.get("layers", 12), "num_attention_heads": text.get("heads", 8),
                            "max_position_embeddings": text.get("context_length", 77),
                            "vocab_size": text.get("vocab_size", 49408), "hidden_act": act,
                            "layer_norm_eps": 1e-5, "eos_token_id": 2}}


def open_clip_tensors(state, path):
    """An open_clip CLIP state dict under transformers CLIPModel names (fused attention projections split, the
    [width, embed] projections transposed); logit_scale dropped."""
    out, unknown = {}, []
    for name, array in state.items():
        if name in ("logit_scale", "attn_mask"):  # a buffer some old checkpoints carry
            continue
        sub = name.removeprefix("visual.")
        if sub in _VISUAL_TOP and name != sub:
            out["vision_model." + _VISUAL_TOP[sub]] = array
        elif name == "visual.proj":
            out["visual_projection.weight"] = np.ascontiguousarray(array.T)
        elif name != sub and sub.startswith("transformer.") and open_clip_names(sub, array):
            out.update((n.replace("text_model.", "vision_model.", 1), a) for n, a in open_clip_names(sub, array))
        elif name == sub and open_clip_names(name, array):
            out.update(open_clip_names(name, array))
        else:
            unknown.append(name)
    if unknown:
        raise WeightLoadError(f"{path}: not an open_clip CLIP (ViT) checkpoint; unknown tensors: "
                              f"{', '.join(sorted(unknown)[:10])}")
    return out


def clip_params(module, tensors, source, dtype=np.float32):
    """Flax params of CLIPModel `module` from transformers-named tensors (checked: every name, every shape)."""
    tensors = {k: v for k, v in tensors.items() if k != "logit_scale"}
    cls = "vision_model.embeddings.class_embedding"
    if cls in tensors:  # a [D] parameter in PyTorch, an Embed of one row here
        tensors[cls + ".weight"] = np.asarray(tensors.pop(cls))[None]
    size = module.vision_model.image_size
    image = jnp.zeros((1, size, size, module.vision_model.num_channels))
    shapes = jax.eval_shape(module.init, jax.random.key(0), image, jnp.zeros((1, 1), jnp.int32))["params"]
    return to_params(source, tensors, shapes, dtype=dtype)


def load_transformers_clip(folder, dtype=jnp.float32):
    """(CLIPModel module, params) of a transformers CLIPModel folder (config.json, model.safetensors or
    pytorch_model.bin, sharded or not)."""
    config_path = os.path.join(folder, "config.json")
    try:
        module = CLIPModel.from_config(read_json(config_path), dtype=dtype)
    except UnsupportedConfig as e:
        raise WeightLoadError(f"{config_path}: {e}") from None
    return module, clip_params(module, read_folder_tensors(folder, "transformers"), folder)


def load_open_clip(path, config=None, dtype=jnp.float32):
    """(CLIPModel module, params, open_clip preprocess config) of an open_clip checkpoint file (.bin / .pt /
    .safetensors); config: see the module docstring."""
    cfg, preprocess = open_clip_config(config, path)
    try:
        module = CLIPModel.from_config(transformers_config(cfg, config if isinstance(config, str) else "(dict)"),
                                       dtype=dtype)
    except UnsupportedConfig as e:
        raise WeightLoadError(f"{path}: {e}") from None
    return module, clip_params(module, open_clip_tensors(read_tensors(path), path), path), preprocess

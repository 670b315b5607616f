"""ControlNet weights -> (module, params): diffusers ControlNet folders, and the single files as they circulate:
lllyasviel's ControlNet 1.1 files (`control_model.*`, ldm names), the 1.0 files holding a whole Stable Diffusion
model beside it, conversions without the prefix (fp16 safetensors) or in diffusers names. Other control models,
and files that are no ControlNet, are refused naming what they are. `save_controlnet` writes a diffusers folder."""
import logging
import os
import re

import numpy as np

from sdjax.errors import UnsupportedConfig, WeightLoadError
from sdjax.models import registry
from sdjax.weights import diffusers
from sdjax.weights import ldm_names as names
from sdjax.weights.convert import check_names, to_params
from sdjax.weights.files import read_tensors

log = logging.getLogger("sdjax")
PREFIX = "control_model."  # the ControlNet's tensors in lllyasviel's files
# What a file is when one of its (control_model.-stripped) keys matches, in the order checked: the control models
# beside ControlNet first (Control-LoRA and Union files hold ControlNet-named tensors too).
OTHER_KINDS = (
    (r"(^|\.)lora_controlnet$", "a Control-LoRA (Stability's control-lora: LoRA pairs over the base U-Net)"),
    (r"^(adapter\.)?body\.\d+\.|^adapter\.|^style_embedding$", "a T2I-Adapter"),
    (r"^(task_embedding$|spatial_ch_projs\.|control_add_embedding\.|transformer_layes\.)",
     "a ControlNet-Union (xinsir's: task embedding and control type)"),
    (r"^lllite_", "a ControlNet-LLLite (kohya's)"),
    (r"^ctrl_|\.(base_to_ctrl|ctrl_to_base)\.", "a ControlNet-XS"),
    (r"^(controlnet_x_embedder|controlnet_blocks\.|controlnet_single_blocks\.|pos_embed_input\.)",
     "a ControlNet of a transformer model (SD3, Flux, HunyuanDiT, ...)"),
    (r"motion_modules\.", "an AnimateDiff SparseControlNet"),
    (r"^(image_proj|ip_adapter)\.", "an IP-Adapter"),
    (r"(^lora_(unet|te\d?)_|\.lora_(down|up|A|B)\.|\.lora\.(down|up)\.)", "a LoRA"),
    (r"^(model\.diffusion_model|model_ema|cond_stage_model|conditioner)\.", "a Stable Diffusion checkpoint"),
    (r"^(first_stage_model\.)?(en|de)coder\.", "a VAE"),
    (r"^(up_blocks|output_blocks)\.", "a U-Net"),
)
_TO_K = "transformer_blocks.0.attn2.to_k.weight"  # a cross-attention's key projection: [width, text width]
_SHUFFLE_POOLING = re.compile(r"global_average_pooling:\s*true", re.IGNORECASE)


def load_controlnet(path, dtype=np.float32, variant=None):
    """(ControlNetModel, params in `dtype`) of a diffusers ControlNet folder (config.json + weights; variants,
    .bin, sharded) or of a single ControlNet file (.safetensors, .pth/.ckpt/.bin), its architecture read from its
    tensors."""
    if os.path.isdir(path):
        return diffusers.load_model_folder(path, "controlnet", dtype, variant)
    if not os.path.isfile(path):
        raise WeightLoadError(f"{path}: no such ControlNet folder or file")
    tensors = controlnet_tensors(read_tensors(path), path)
    try:
        module = registry.build("controlnet", infer_config(tensors, global_pool=_global_pool(path)))
    except (KeyError, UnsupportedConfig) as e:
        raise WeightLoadError(f"{path}: unsupported ControlNet ({e})") from None
    return module, to_params(f"{path}: ControlNet", tensors, registry.param_shapes("controlnet", module), dtype)


def controlnet_tensors(tensors, path="ControlNet file"):
    """diffusers-named ControlNetModel tensors of a single file's (ldm names, control_model.-prefixed or not, or
    diffusers names); a WeightLoadError naming `path` and what it holds if it is not a ControlNet."""
    if any(k.startswith(PREFIX) for k in tensors):
        others = len(tensors) - len(tensors := {k[len(PREFIX):]: v for k, v in tensors.items() if k.startswith(PREFIX)})
        if others:  # ControlNet 1.0: the Stable Diffusion model it was trained on, beside it
            log.info("%s: loading the ControlNet (%s*), not the %d other tensors", path, PREFIX, others)
    for pattern, what in OTHER_KINDS:
        key = next((k for k in tensors if re.search(pattern, k)), None)
        if key is not None:
            raise WeightLoadError(f"{path}: {what} (found {key}), not a ControlNet; sdjax loads ControlNets only "
                                  "(diffusers ControlNetModel folders, lllyasviel's control_*.pth / .safetensors)")
    if "controlnet_cond_embedding.conv_in.weight" in tensors:
        return tensors
    if "input_hint_block.0.weight" not in tensors:
        raise WeightLoadError(f"{path}: not a ControlNet: no {PREFIX}*, input_hint_block.* or "
                              f"controlnet_cond_embedding.* tensors among its {len(tensors)} keys")
    unused = []
    text_time = "label_emb.0.0.weight" in tensors
    table = names.controlnet_table(*names.controlnet_layout_original(set(tensors)), text_time=text_time)
    out = names.rename_all(tensors, table, "", unused)
    check_names(f"{path}: ControlNet", set(), set(unused))
    return out


def to_original(tensors):
    """{control_model. + ldm name: array} of diffusers-named ControlNetModel tensors (the inverse of
    controlnet_tensors: the layout of lllyasviel's files)."""
    table = names.invert(names.controlnet_table(*names.controlnet_layout_diffusers(set(tensors)),
                                                text_time="add_embedding.linear_1.weight" in tensors))
    unused = []
    out = {PREFIX + k: v for k, v in names.rename_all(tensors, table, "", unused).items()}
    check_names("ControlNet export", set(), set(unused))
    return out


def infer_config(tensors, global_pool=False):
    """config.json dict of diffusers-named ControlNet tensors. Shapes give the architecture; attention heads follow
    the families: 8 heads with convolution projections (SD 1.x), 64-channel heads with linear ones (SD 2.x, SDXL);
    SDXL's text_time embedding takes 256-wide time ids. global_pool: global_pool_conditions (shuffle), which
    shapes cannot tell."""
    levels, layers, down, depth, hint_convs = names.controlnet_layout_diffusers(set(tensors))
    widths = [int(tensors[f"down_blocks.{i}.resnets.0.conv2.weight"].shape[0]) for i in range(levels)]
    attention = next((k[:-len(_TO_K)] for k in sorted(tensors) if k.endswith(_TO_K)), None)
    if attention is None:
        raise UnsupportedConfig(f"no cross-attention (*.{_TO_K})")
    linear = tensors[attention + "proj_in.weight"].ndim == 2
    if linear and any(w % 64 for w in widths):
        raise UnsupportedConfig(f"block widths {widths} with linear projections, not multiples of 64-channel heads")
    embedding = "controlnet_cond_embedding.conv_in.weight"
    config = {
        "_class_name": "ControlNetModel",
        "in_channels": int(tensors["conv_in.weight"].shape[1]),
        "conditioning_channels": int(tensors[embedding].shape[1]),
        "conditioning_embedding_out_channels": [int(tensors[embedding].shape[0])] + [
            int(tensors[f"controlnet_cond_embedding.blocks.{2 * i + 1}.weight"].shape[0])
            for i in range((hint_convs - 2) // 2)],
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in down],
        "block_out_channels": widths,
        "layers_per_block": layers,
        "cross_attention_dim": int(tensors[attention + _TO_K].shape[1]),
        "attention_head_dim": [w // 64 for w in widths] if linear else 8,
        "use_linear_projection": linear,
        "global_pool_conditions": bool(global_pool),
    }
    # transformer layers per level (1 without attention); diffusers' mid block takes the last level's
    depths = [names.attention_depth(tensors, f"down_blocks.{i}.attentions.0.") or 1 for i in range(levels)]
    depths[-1] = names.attention_depth(tensors, "mid_block.attentions.0.") or depth
    config["transformer_layers_per_block"] = depths[0] if len(set(depths)) == 1 else depths
    if "add_embedding.linear_1.weight" in tensors:
        config.update(addition_embed_type="text_time", addition_time_embed_dim=256,
                      projection_class_embeddings_input_dim=int(tensors["add_embedding.linear_1.weight"].shape[1]))
    return config


def _global_pool(path):
    """Whether a single file's ControlNet pools its residuals (global_pool_conditions): its ldm config beside it
    (same name, .yaml) says `global_average_pooling`; without one, the shuffle ControlNets do."""
    config = os.path.splitext(path)[0] + ".yaml"
    if os.path.isfile(config):
        with open(config, encoding="utf-8") as f:
            return bool(_SHUFFLE_POOLING.search(f.read()))
    return "shuffle" in os.path.basename(path).lower()


def save_controlnet(folder, module, params, max_shard_size=10**10):
    """Write a diffusers ControlNet folder (config.json, float32 safetensors) that ControlNetModel.from_pretrained
    and load_controlnet read."""
    diffusers.save_model_folder(folder, "controlnet", module, params, max_shard_size)

"""Original single-file Stable Diffusion checkpoints (CompVis SD1.x, Stability SD2.x).

`split_original` renames the tensors into the diffusers / transformers names of the three
components (then `convert.to_params` applies), `infer_configs` gives their config.json dicts
from tensor shapes, and `to_original` is the inverse of `split_original`. `split_vae` reads a
standalone VAE file (diffusers or ldm names).
"""
import logging
import re

import numpy as np

from sdjax.weights import diffusers
from sdjax.weights import ldm_names as names
from sdjax.errors import WeightLoadError
from sdjax.weights.convert import check_names
from sdjax.weights.files import read_tensors

# Prefixes of models other than SD1/SD2, and what they mean.
UNSUPPORTED = {
    "conditioner.": "SDXL (text encoders under conditioner.embedders)",
    names.UNET_PREFIX + "label_emb.": "a class-conditioned UNet (label_emb: SDXL, x4 upscaler, unCLIP)",
    "control_model.": "ControlNet",
    "depth_model.": "depth-to-image (depth_model)",
    names.UNET_PREFIX + "joint_blocks.": "SD3",
    names.UNET_PREFIX + "double_blocks.": "Flux",
}
# OpenCLIP text tensors that SD's conditioning never uses (the visual tower, the CLIP heads).
_OPEN_CLIP_UNUSED = re.compile(r"(text_projection|logit_scale|attn_mask|visual\..*)$")

# name: (text family, prediction_type, image size, upcast_attention, inpainting)
VARIANTS = {
    "sd15": ("sd1", "epsilon", 512, False, False),
    "sd15-inpainting": ("sd1", "epsilon", 512, False, True),
    "sd21": ("sd2", "v_prediction", 768, True, False),
    "sd21-base": ("sd2", "epsilon", 512, False, False),
    "sd2-inpainting": ("sd2", "epsilon", 512, False, True),
}
SD2_BASE_GLOBAL_STEP = 875000  # diffusers' tell for SD 2.0-base (epsilon, 512) among SD2 files
EMA_PREFIX = "model_ema.diffusion_model"  # LitEma's UNet copy: the name without 'model.' and dots
log = logging.getLogger("sdjax")


def read_checkpoint(path):
    """{name: np.ndarray} of a .safetensors file or (needs torch) a .ckpt/.pt pickle; floats as float32.

    A top-level `global_step` of a pickle is kept as a 0-d array (infer_configs reads it).
    """
    tensors = read_tensors(path)
    floats = lambda a: a.dtype.kind == "f" or a.dtype.name == "bfloat16"  # noqa: E731
    return {k: a.astype(np.float32, copy=False) if floats(a) else a for k, a in tensors.items()}


def _check_supported(state_dict):
    for key in state_dict:
        for prefix, what in UNSUPPORTED.items():
            if key.startswith(prefix):
                raise WeightLoadError(f"unsupported checkpoint: {what} (found {key}); "
                                      "only Stable Diffusion 1.x / 2.x single files are supported")


def _sub(state_dict, prefix):
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def _components(state_dict):
    """(unet, vae, text) sub-dicts (unprefixed; text keeps its prefix), validated present."""
    _check_supported(state_dict)
    unet, vae = _sub(state_dict, names.UNET_PREFIX), _sub(state_dict, names.VAE_PREFIX)
    text = {k: v for k, v in state_dict.items() if k.startswith("cond_stage_model.")}
    for part, found, prefix in (("UNet", unet, names.UNET_PREFIX), ("VAE", vae, names.VAE_PREFIX),
                                ("text encoder", text, "cond_stage_model.")):
        if not found:
            raise WeightLoadError(f"not a Stable Diffusion 1.x/2.x single file: no {part} tensors "
                                  f"({prefix}*) among its {len(state_dict)} keys")
    if "input_blocks.0.0.weight" not in unet:
        raise WeightLoadError(f"unsupported UNet: {names.UNET_PREFIX}input_blocks.0.0.weight missing "
                              "(not the SD1/SD2 UNetModel layout)")
    return unet, vae, text


def _rename_all(tensors, table, prefix, unused):
    out = {}
    for name, array in tensors.items():
        hit = names.rename(name, table)
        if hit is None:
            unused.append(prefix + name)
        else:
            out[hit[0]] = array
    return out


def _unet_weights(state_dict, unet, use_ema):
    """The UNet tensors to load: LitEma's copy (`model_ema.*`) or the raw `model.diffusion_model.*`.

    use_ema None takes the EMA copy when the file has one (the original configs' use_ema=True).
    """
    has_ema = any(k.startswith(EMA_PREFIX) for k in state_dict)
    if use_ema and not has_ema:
        raise WeightLoadError("use_ema=True but the checkpoint has no EMA weights (model_ema.*); "
                              "'ema-only' files already hold them under model.diffusion_model.*")
    if not has_ema or use_ema is False:
        why = "use_ema=False; the EMA copy model_ema.* is ignored" if has_ema else "no EMA copy in the file"
        log.info("UNet: %s* as stored (%s)", names.UNET_PREFIX, why)
        return unet
    log.info("UNet: EMA weights model_ema.* (use_ema=False takes the raw %s*)", names.UNET_PREFIX)
    keys = {n: "model_ema." + ("diffusion_model." + n).replace(".", "") for n in unet}
    check_names("UNet EMA weights", {k for k in keys.values() if k not in state_dict}, set())
    return {n: state_dict[k] for n, k in keys.items()}


def _text_tensors(text, unused):
    """transformers-named CLIPTextModel tensors of the SD1 (CLIP) or SD2 (OpenCLIP) text tower."""
    clip, open_clip = _sub(text, names.CLIP_PREFIX), _sub(text, names.OPEN_CLIP_PREFIX)
    unused += [k for k in text if not k.startswith((names.CLIP_PREFIX, names.OPEN_CLIP_PREFIX))]
    if clip and open_clip:
        raise WeightLoadError(f"unsupported checkpoint: two text encoders ({names.CLIP_PREFIX}* and "
                              f"{names.OPEN_CLIP_PREFIX}*)")
    out = {}
    for name, array in clip.items():
        if name.endswith("position_ids"):  # a buffer, not a parameter
            continue
        new = names.clip_name(name)
        if new is None:
            unused.append(names.CLIP_PREFIX + name)
        else:
            out[new] = array
    # SD2 conditions on the penultimate layer: drop the last block, as diffusers' 23-layer folders do.
    blocks = [names.resblock_index(n) for n in open_clip]
    last = max((b for b in blocks if b is not None), default=-1)
    for (name, array), block in zip(open_clip.items(), blocks):
        if _OPEN_CLIP_UNUSED.match(name) or block == last:
            continue
        hits = names.open_clip_names(name, array)
        if hits is None:
            unused.append(names.OPEN_CLIP_PREFIX + name)
        else:
            out.update(hits)
    return out


def split_original(state_dict, use_ema=None):
    """{"unet" | "vae" | "text_encoder": {diffusers/transformers name: np.ndarray}} of an original file.

    use_ema: None takes the UNet from the `model_ema.*` copy when there is one, True requires
    it, False takes the raw weights. Keys outside the model prefixes (noise-schedule buffers,
    EMA bookkeeping, global_step) are ignored; tensors under them that no rule maps raise a
    WeightLoadError listing them.
    """
    unet, vae, text = _components(state_dict)
    return _rename_parts(_unet_weights(state_dict, unet, use_ema), vae, text)


def _rename_parts(unet, vae, text):
    unused = []
    parts = {
        "unet": _rename_all(unet, names.unet_table(*names.unet_layout_original(set(unet))),
                            names.UNET_PREFIX, unused),
        "vae": _vae_tensors(vae, names.VAE_PREFIX, unused),
        "text_encoder": _text_tensors(text, unused),
    }
    check_names("original checkpoint", set(), set(unused))
    return parts


def _vae_tensors(vae, prefix, unused):
    """diffusers-named AutoencoderKL tensors of ldm's (unprefixed) Encoder/Decoder names."""
    out = _rename_all(vae, names.vae_table(*names.vae_layout_original(set(vae))), prefix, unused)
    for name, array in out.items():  # 1x1 conv -> Linear in the mid-block attention
        if ".mid_block.attentions.0.to_" in name and array.ndim == 4:
            out[name] = array[:, :, 0, 0]
    return out


def split_vae(tensors):
    """diffusers-named AutoencoderKL tensors of a standalone VAE file, diffusers- or ldm-named.

    ldm files (e.g. vae-ft-mse-840000-ema-pruned) hold encoder.*, decoder.*, quant_conv.*,
    post_quant_conv.* (`first_stage_model.` prefixed or not); their other keys (loss.*,
    model_ema.*) are ignored.
    """
    if any(k.startswith(names.VAE_PREFIX) for k in tensors):
        tensors = _sub(tensors, names.VAE_PREFIX)
    if any(k.startswith("encoder.down_blocks.") for k in tensors):
        return diffusers.current_names("vae", tensors)
    vae = {k: v for k, v in tensors.items() if k.startswith(names.VAE_MODULES)}
    if not vae:
        raise WeightLoadError(f"not a VAE: no encoder.*/decoder.* tensors among its {len(tensors)} keys")
    unused = []
    out = _vae_tensors(vae, "", unused)
    check_names("original VAE", set(), set(unused))
    return out


def to_original(parts, text_format="clip"):
    """Original-format state dict of {"unet", "vae", "text_encoder": diffusers-named tensors}.

    The inverse of split_original. text_format "clip" writes SD1's layout; "open_clip" SD2's,
    plus one zero-filled last resblock: SD2 conditions on the penultimate layer, so it is unused.
    """
    if text_format not in ("clip", "open_clip"):
        raise ValueError(f"text_format must be 'clip' or 'open_clip', got {text_format!r}")
    unused, out = [], {}
    unet, vae = parts["unet"], parts["vae"]
    table = names.invert(names.unet_table(*names.unet_layout_diffusers(set(unet))))
    out.update({names.UNET_PREFIX + k: v for k, v in _rename_all(unet, table, "unet: ", unused).items()})
    table = names.invert(names.vae_table(*names.vae_layout_diffusers(set(vae))))
    for k, v in _rename_all(vae, table, "vae: ", unused).items():
        out[names.VAE_PREFIX + k] = v[:, :, None, None] if ".mid.attn_1." in k and v.ndim == 2 else v
    text = parts["text_encoder"]
    unused += [f"text_encoder: {k}" for k in text if names.clip_name(k) != k]
    if text_format == "clip":
        out.update({names.CLIP_PREFIX + k: v for k, v in text.items()})
    else:
        out.update({names.OPEN_CLIP_PREFIX + k: v for k, v in names.open_clip_export(text).items()})
    check_names("export", set(), set(unused))
    return out


def _unet_config(unet, sd2):
    levels, layers, down, up, depth = names.unet_layout_diffusers(set(unet))
    widths = [int(unet[f"down_blocks.{i}.resnets.0.conv2.weight"].shape[0]) for i in range(levels)]
    to_k = "transformer_blocks.0.attn2.to_k.weight"
    attn = next((k[:-len(to_k)] for k in sorted(unet) if k.endswith(to_k)), None)
    if attn is None:
        raise WeightLoadError(f"unsupported UNet: no cross-attention ({names.UNET_PREFIX}*.{to_k})")
    if sd2:  # SD2 fixes 64 channels per head; diffusers stores the head counts as attention_head_dim
        if any(w % 64 for w in widths):
            raise WeightLoadError(
                f"SD2 UNet: block widths {widths} are not multiples of the 64-channel heads")
        heads = [w // 64 for w in widths]
    else:
        heads = 8
    return {
        "_class_name": "UNet2DConditionModel",
        "in_channels": int(unet["conv_in.weight"].shape[1]),
        "out_channels": int(unet["conv_out.weight"].shape[0]),
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in down],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in up],
        "block_out_channels": widths,
        "layers_per_block": layers,
        "transformer_layers_per_block": depth,
        "attention_head_dim": heads,
        "cross_attention_dim": int(unet[attn + to_k].shape[1]),
        "use_linear_projection": unet[attn + "proj_in.weight"].ndim == 2,
        "only_cross_attention": False,
        "center_input_sample": False, "flip_sin_to_cos": True, "freq_shift": 0,
        "downsample_padding": 1, "mid_block_scale_factor": 1, "act_fn": "silu",
        "norm_num_groups": 32, "norm_eps": 1e-5, "resnet_time_scale_shift": "default",
    }


def _vae_config(vae, image_size):
    levels, layers = names.vae_layout_diffusers(set(vae))
    widths = [int(vae[f"encoder.down_blocks.{i}.resnets.0.conv2.weight"].shape[0]) for i in range(levels)]
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": int(vae["encoder.conv_in.weight"].shape[1]),
        "out_channels": int(vae["decoder.conv_out.weight"].shape[0]),
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": widths,
        "layers_per_block": layers,
        "act_fn": "silu",
        "latent_channels": int(vae["decoder.conv_in.weight"].shape[1]),
        "norm_num_groups": 32,
        "sample_size": image_size,
        "scaling_factor": 0.18215,
    }


def _text_config(text, sd2):
    hidden, vocab = text["text_model.embeddings.token_embedding.weight"].shape[::-1]
    layers = 1 + max(int(k.split(".")[3]) for k in text if k.startswith("text_model.encoder.layers."))
    if hidden % 64:
        raise WeightLoadError(
            f"text encoder: hidden size {hidden} is not a multiple of CLIP's 64-channel heads")
    return {
        "architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
        "vocab_size": int(vocab), "hidden_size": int(hidden),
        "intermediate_size": int(text["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0]),
        "projection_dim": 512 if sd2 else 768,  # unused by the text model; diffusers' values
        "num_hidden_layers": layers, "num_attention_heads": int(hidden) // 64,
        "max_position_embeddings": int(text["text_model.embeddings.position_embedding.weight"].shape[0]),
        "hidden_act": "gelu" if sd2 else "quick_gelu", "layer_norm_eps": 1e-5,
        "attention_dropout": 0.0, "initializer_range": 0.02, "initializer_factor": 1.0,
        # CLIP's BPE vocabulary ends with <|startoftext|>, <|endoftext|>.
        "bos_token_id": int(vocab) - 2, "eos_token_id": int(vocab) - 1, "pad_token_id": 1,
    }


def _variant(name, sd2, inpainting, global_step):
    """(prediction_type, image size, upcast_attention) from `name` or, without it, diffusers' heuristic."""
    family = "sd2" if sd2 else "sd1"
    if name is not None:
        if name not in VARIANTS:
            raise WeightLoadError(f"unknown checkpoint name {name!r}; expected one of {sorted(VARIANTS)}")
        want, prediction, size, upcast, want_inpainting = VARIANTS[name]
        if (want, want_inpainting) != (family, inpainting):
            raise WeightLoadError(
                f"name {name!r} is a {want}{' inpainting' if want_inpainting else ''} model, but the "
                f"checkpoint is {family}{' inpainting (9 input channels)' if inpainting else ''}")
        return prediction, size, upcast
    if not sd2 or inpainting or global_step == SD2_BASE_GLOBAL_STEP:
        return "epsilon", 512, False
    return "v_prediction", 768, True


def infer_configs(state_dict, name=None):
    """{"unet", "vae", "text_encoder", "scheduler": config.json dict} of an original SD1/SD2 file.

    Shapes give the architecture; SD2 (OpenCLIP text tower) implies 64-channel heads, linear
    projections and the penultimate text layer; SD1 implies 8 heads and CLIP ViT-L. Shapes
    cannot tell epsilon from v-prediction: `name` (one of VARIANTS) says it; without a name,
    SD1 and inpainting models are epsilon/512, and other SD2 files v-prediction/768 unless
    `global_step` is 875000 (SD 2.0-base), as diffusers guesses. So pass name="sd21-base"
    for SD2.x-base files.
    """
    parts = _rename_parts(*_components(state_dict))  # shapes only: raw or EMA UNet alike
    sd2 = any(k.startswith(names.OPEN_CLIP_PREFIX) for k in state_dict)
    step = state_dict.get("global_step")
    step = int(step) if step is not None and np.ndim(step) == 0 else None
    try:
        unet_cfg, text_cfg = _unet_config(parts["unet"], sd2), _text_config(parts["text_encoder"], sd2)
        prediction, size, upcast = _variant(name, sd2, unet_cfg["in_channels"] == 9, step)
        vae_cfg = _vae_config(parts["vae"], size)
    except KeyError as e:
        raise WeightLoadError(f"incomplete checkpoint: no tensor for {e.args[0]} (diffusers name)") from None
    if unet_cfg["cross_attention_dim"] != text_cfg["hidden_size"]:
        raise WeightLoadError(f"UNet cross_attention_dim {unet_cfg['cross_attention_dim']} does not match "
                              f"the text encoder width {text_cfg['hidden_size']}")
    unet_cfg.update(sample_size=size // 2 ** (len(vae_cfg["block_out_channels"]) - 1),
                    upcast_attention=upcast)
    scheduler = {**diffusers.SD_SCHEDULER, "prediction_type": prediction}
    return {"unet": unet_cfg, "vae": vae_cfg, "text_encoder": text_cfg, "scheduler": scheduler}

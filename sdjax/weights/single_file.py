"""Original single-file Stable Diffusion checkpoints (CompVis SD1.x, Stability SD2.x and SDXL base / refiner).

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

# Prefixes of models other than SD1/SD2/SDXL, and what they mean (label_emb: only SDXL's, with its conditioner).
UNSUPPORTED = {
    names.UNET_PREFIX + "label_emb.": "a class-conditioned UNet (label_emb without SDXL's conditioner: x4 "
                                      "upscaler, unCLIP)",
    "control_model.": "ControlNet",
    "depth_model.": "depth-to-image (depth_model)",
    names.UNET_PREFIX + "joint_blocks.": "SD3",
    names.UNET_PREFIX + "double_blocks.": "Flux",
}
# OpenCLIP text tensors that SD's conditioning never uses (the visual tower, the CLIP heads; SDXL uses
# text_projection for its pooled text).
_OPEN_CLIP_UNUSED = re.compile(r"(text_projection|logit_scale|attn_mask|visual\..*)$")
_SDXL_UNUSED = re.compile(r"(logit_scale|attn_mask|visual\..*)$")

# name: (text family, prediction_type, image size, upcast_attention, inpainting)
VARIANTS = {
    "sd15": ("sd1", "epsilon", 512, False, False),
    "sd15-inpainting": ("sd1", "epsilon", 512, False, True),
    "sd21": ("sd2", "v_prediction", 768, True, False),
    "sd21-base": ("sd2", "epsilon", 512, False, False),
    "sd2-inpainting": ("sd2", "epsilon", 512, False, True),
    "sdxl": ("sdxl", "epsilon", 1024, False, False),           # base or refiner (the towers tell)
    "sdxl-v": ("sdxl", "v_prediction", 1024, False, False),    # v-prediction fine-tunes
    "sdxl-inpainting": ("sdxl", "epsilon", 1024, False, True),
}
# diffusers' scheduler of SDXL folders (scheduler_config.json of stable-diffusion-xl-base-1.0)
SDXL_SCHEDULER = {"_class_name": "EulerDiscreteScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
                  "beta_end": 0.012, "beta_schedule": "scaled_linear", "trained_betas": None,
                  "prediction_type": "epsilon", "steps_offset": 1, "timestep_spacing": "leading",
                  "interpolation_type": "linear", "use_karras_sigmas": False, "sample_max_value": 1.0}
SD2_BASE_GLOBAL_STEP = 875000  # diffusers' tell for SD 2.0-base (epsilon, 512) among SD2 files
EMA_PREFIX = "model_ema.diffusion_model"  # LitEma's UNet copy: the name without 'model.' and dots
log = logging.getLogger("sdjax")


def read_checkpoint(path):
    """{name: np.ndarray} of a .safetensors file (views of the mapped file, in its dtypes) or (needs torch) a
    .ckpt/.pt pickle (floats as float32). A top-level `global_step` of a pickle is kept as a 0-d array
    (infer_configs reads it)."""
    return read_tensors(path)


def is_sdxl(state_dict):
    return any(k.startswith(names.SDXL_PREFIX) for k in state_dict)


def _check_supported(state_dict):
    sdxl = is_sdxl(state_dict)
    for key in state_dict:
        for prefix, what in UNSUPPORTED.items():
            if key.startswith(prefix) and not (sdxl and prefix.endswith("label_emb.")):
                raise WeightLoadError(f"unsupported checkpoint: {what} (found {key}); "
                                      "only Stable Diffusion 1.x / 2.x / XL single files are supported")


def _sub(state_dict, prefix):
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def _components(state_dict):
    """(unet, vae, text) sub-dicts (unprefixed; text keeps its prefix), validated present."""
    _check_supported(state_dict)
    unet, vae = _sub(state_dict, names.UNET_PREFIX), _sub(state_dict, names.VAE_PREFIX)
    text_prefix = names.SDXL_PREFIX if is_sdxl(state_dict) else "cond_stage_model."
    text = {k: v for k, v in state_dict.items() if k.startswith(text_prefix)}
    for part, found, prefix in (("UNet", unet, names.UNET_PREFIX), ("VAE", vae, names.VAE_PREFIX),
                                ("text encoder", text, text_prefix)):
        if not found:
            raise WeightLoadError(f"not a Stable Diffusion 1.x/2.x/XL single file: no {part} tensors "
                                  f"({prefix}*) among its {len(state_dict)} keys")
    if "input_blocks.0.0.weight" not in unet:
        raise WeightLoadError(f"unsupported UNet: {names.UNET_PREFIX}input_blocks.0.0.weight missing "
                              "(not the SD1/SD2 UNetModel layout)")
    return unet, vae, text


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


def _clip_tensors(clip, prefix, unused):
    """transformers-named CLIPTextModel tensors of HF CLIP sub-names (`text_model.` level optional)."""
    out = {}
    for name, array in clip.items():
        if name.endswith("position_ids"):  # a buffer, not a parameter
            continue
        new = names.clip_name(name)
        if new is None:
            unused.append(prefix + name)
        else:
            out[new] = array
    return out


def _open_clip_tensors(open_clip, prefix, unused, penultimate):
    """transformers-named tensors of OpenCLIP text sub-names. penultimate (SD2, which conditions on the
    penultimate layer): the last block and text_projection are dropped, as diffusers' 23-layer folders do;
    else (SDXL) every layer and text_projection (the pooled text's) are kept."""
    blocks = [names.resblock_index(n) for n in open_clip]
    last = max((b for b in blocks if b is not None), default=-1) if penultimate else -1
    unwanted = _OPEN_CLIP_UNUSED if penultimate else _SDXL_UNUSED
    out = {}
    for (name, array), block in zip(open_clip.items(), blocks):
        if unwanted.match(name) or block == last:
            continue
        hits = names.open_clip_names(name, array)
        if hits is None:
            unused.append(prefix + name)
        else:
            out.update(hits)
    return out


def _text_tensors(text, unused):
    """{"text_encoder": transformers-named tensors} of the SD1 (CLIP) or SD2 (OpenCLIP) text tower."""
    clip, open_clip = _sub(text, names.CLIP_PREFIX), _sub(text, names.OPEN_CLIP_PREFIX)
    unused += [k for k in text if not k.startswith((names.CLIP_PREFIX, names.OPEN_CLIP_PREFIX))]
    if clip and open_clip:
        raise WeightLoadError(f"unsupported checkpoint: two text encoders ({names.CLIP_PREFIX}* and "
                              f"{names.OPEN_CLIP_PREFIX}*)")
    return {"text_encoder": {**_clip_tensors(clip, names.CLIP_PREFIX, unused),
                             **_open_clip_tensors(open_clip, names.OPEN_CLIP_PREFIX, unused, penultimate=True)}}


def _sdxl_text_tensors(text, unused):
    """{"text_encoder": CLIP ViT-L (embedders.N.transformer.*), "text_encoder_2": OpenCLIP bigG with its
    projection (embedders.N.model.*)}: the base has both, the refiner the second only."""
    towers = {}
    for i in sorted({int(k[len(names.SDXL_PREFIX):].split(".")[0]) for k in text}):
        prefix = f"{names.SDXL_PREFIX}{i}."
        sub = _sub(text, prefix)
        clip, open_clip = _sub(sub, "transformer."), _sub(sub, "model.")
        unused += [prefix + k for k in sub if not k.startswith(("transformer.", "model."))]
        kind = "text_encoder" if clip else "text_encoder_2"
        if (clip and open_clip) or kind in towers:
            raise WeightLoadError(f"unsupported SDXL conditioner: embedder {i} is not one CLIP (transformer.*) "
                                  "or one OpenCLIP (model.*) text tower after the other")
        towers[kind] = (_clip_tensors(clip, prefix + "transformer.", unused) if clip else
                        _open_clip_tensors(open_clip, prefix + "model.", unused, penultimate=False))
    if "text_encoder_2" not in towers:
        raise WeightLoadError(f"unsupported SDXL conditioner: no OpenCLIP text tower ({names.SDXL_PREFIX}N.model.*)")
    return towers


def split_original(state_dict, use_ema=None):
    """{"unet" | "vae" | "text_encoder" | "text_encoder_2" (SDXL): {diffusers/transformers name: np.ndarray}} of an
    original file.

    use_ema: None takes the UNet from the `model_ema.*` copy when there is one, True requires
    it, False takes the raw weights. Keys outside the model prefixes (noise-schedule buffers,
    EMA bookkeeping, global_step) are ignored; tensors under them that no rule maps raise a
    WeightLoadError listing them.
    """
    unet, vae, text = _components(state_dict)
    return _rename_parts(_unet_weights(state_dict, unet, use_ema), vae, text)


def _rename_parts(unet, vae, text):
    unused = []
    sdxl = is_sdxl(text)
    table = names.unet_table(*names.unet_layout_original(set(unet)), text_time=sdxl)
    parts = {
        "unet": names.rename_all(unet, table, names.UNET_PREFIX, unused),
        "vae": _vae_tensors(vae, names.VAE_PREFIX, unused),
        **(_sdxl_text_tensors(text, unused) if sdxl else _text_tensors(text, unused)),
    }
    check_names("original checkpoint", set(), set(unused))
    return parts


def _vae_tensors(vae, prefix, unused):
    """diffusers-named AutoencoderKL tensors of ldm's (unprefixed) Encoder/Decoder names."""
    out = names.rename_all(vae, names.vae_table(*names.vae_layout_original(set(vae))), prefix, unused)
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
    SDXL parts (with "text_encoder_2") are written in SDXL's layout whatever text_format says: the towers
    as conditioner.embedders.0.transformer.* (CLIP, the base only) and the next embedder's model.*
    (OpenCLIP, every layer and text_projection), the added embedding as label_emb.
    """
    if text_format not in ("clip", "open_clip"):
        raise ValueError(f"text_format must be 'clip' or 'open_clip', got {text_format!r}")
    unused, out = [], {}
    unet, vae = parts["unet"], parts["vae"]
    table = names.unet_export_table(unet)
    out.update({names.UNET_PREFIX + k: v for k, v in names.rename_all(unet, table, "unet: ", unused).items()})
    table = names.invert(names.vae_table(*names.vae_layout_diffusers(set(vae))))
    for k, v in names.rename_all(vae, table, "vae: ", unused).items():
        out[names.VAE_PREFIX + k] = v[:, :, None, None] if ".mid.attn_1." in k and v.ndim == 2 else v
    if "text_encoder_2" in parts:
        out.update(_sdxl_towers_original(parts, unused))
        check_names("export", set(), set(unused))
        return out
    text = parts["text_encoder"]
    unused += [f"text_encoder: {k}" for k in text if names.clip_name(k) != k]
    if text_format == "clip":
        out.update({names.CLIP_PREFIX + k: v for k, v in text.items()})
    else:
        out.update({names.OPEN_CLIP_PREFIX + k: v for k, v in names.open_clip_export(text).items()})
    check_names("export", set(), set(unused))
    return out


def _sdxl_towers_original(parts, unused):
    out, index = {}, 0
    if "text_encoder" in parts:
        text = parts["text_encoder"]
        unused += [f"text_encoder: {k}" for k in text if names.clip_name(k) != k]
        out.update({f"{names.SDXL_PREFIX}0.transformer.{k}": v for k, v in text.items()})
        index = 1
    text = parts["text_encoder_2"]
    unused += [f"text_encoder_2: {k}" for k in text if names.clip_name(k) != k and k != "text_projection.weight"]
    prefix = f"{names.SDXL_PREFIX}{index}.model."
    out.update({prefix + k: v for k, v in names.open_clip_export(text, pad_layer=False).items()})
    return out


def _unet_config(unet, sd2, sdxl=False):
    levels, layers, down, up, depth = names.unet_layout_diffusers(set(unet))
    widths = [int(unet[f"down_blocks.{i}.resnets.0.conv2.weight"].shape[0]) for i in range(levels)]
    to_k = "transformer_blocks.0.attn2.to_k.weight"
    attn = next((k[:-len(to_k)] for k in sorted(unet) if k.endswith(to_k)), None)
    if attn is None:
        raise WeightLoadError(f"unsupported UNet: no cross-attention ({names.UNET_PREFIX}*.{to_k})")
    if sd2 or sdxl:  # SD2, SDXL: 64 channels per head; diffusers stores the head counts as attention_head_dim
        if any(w % 64 for w in widths):
            raise WeightLoadError(
                f"{'SDXL' if sdxl else 'SD2'} UNet: block widths {widths} are not multiples of the 64-channel heads")
        heads = [w // 64 for w in widths]
    else:
        heads = 8
    extra = {}
    if sdxl:  # transformer layers per level (1 where there is no attention) and the text_time embedding
        depth = [max(1, names.attention_depth(unet, f"down_blocks.{i}.attentions.0.")) for i in range(levels)]
        extra = dict(addition_embed_type="text_time",
                     projection_class_embeddings_input_dim=int(unet["add_embedding.linear_1.weight"].shape[1]))
    return {**extra,
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


def _variant(name, family, inpainting, global_step, v_pred=False):
    """(prediction_type, image size, upcast_attention) from `name` or, without it, diffusers' heuristic
    (SDXL: epsilon at 1024, or v-prediction for files with diffusers' `v_pred` marker key)."""
    if name is not None:
        if name not in VARIANTS:
            raise WeightLoadError(f"unknown checkpoint name {name!r}; expected one of {sorted(VARIANTS)}")
        want, prediction, size, upcast, want_inpainting = VARIANTS[name]
        if (want, want_inpainting) != (family, inpainting):
            raise WeightLoadError(
                f"name {name!r} is a {want}{' inpainting' if want_inpainting else ''} model, but the "
                f"checkpoint is {family}{' inpainting (9 input channels)' if inpainting else ''}")
        return prediction, size, upcast
    if family == "sdxl":
        return ("v_prediction" if v_pred else "epsilon"), 1024, False
    if family == "sd1" or inpainting or global_step == SD2_BASE_GLOBAL_STEP:
        return "epsilon", 512, False
    return "v_prediction", 768, True


def infer_configs(state_dict, name=None):
    """{"unet", "vae", "text_encoder", "scheduler": config.json dict} of an original SD1/SD2 file; an SDXL
    file's have "text_encoder_2" too (the refiner's: no "text_encoder"). SDXL: 64-channel heads, per-level
    transformer depth, the text_time embedding, epsilon at 1024 unless named (VARIANTS) or marked `v_pred`.

    Shapes give the architecture; SD2 (OpenCLIP text tower) implies 64-channel heads, linear
    projections and the penultimate text layer; SD1 implies 8 heads and CLIP ViT-L. Shapes
    cannot tell epsilon from v-prediction: `name` (one of VARIANTS) says it; without a name,
    SD1 and inpainting models are epsilon/512, and other SD2 files v-prediction/768 unless
    `global_step` is 875000 (SD 2.0-base), as diffusers guesses. So pass name="sd21-base"
    for SD2.x-base files.
    """
    parts = _rename_parts(*_components(state_dict))  # shapes only: raw or EMA UNet alike
    sdxl = is_sdxl(state_dict)
    sd2 = any(k.startswith(names.OPEN_CLIP_PREFIX) for k in state_dict)
    step = state_dict.get("global_step")
    step = int(step) if step is not None and np.ndim(step) == 0 else None
    texts = [k for k in ("text_encoder", "text_encoder_2") if k in parts]
    try:
        unet_cfg = _unet_config(parts["unet"], sd2, sdxl)
        text_cfgs = {k: _text_config(parts[k], sd2 or k == "text_encoder_2") for k in texts}
        prediction, size, upcast = _variant(name, "sdxl" if sdxl else "sd2" if sd2 else "sd1",
                                            unet_cfg["in_channels"] == 9, step, "v_pred" in state_dict)
        vae_cfg = _vae_config(parts["vae"], size)
        if sdxl:
            projection = int(parts["text_encoder_2"]["text_projection.weight"].shape[0])
    except KeyError as e:
        raise WeightLoadError(f"incomplete checkpoint: no tensor for {e.args[0]} (diffusers name)") from None
    width = sum(c["hidden_size"] for c in text_cfgs.values())
    if unet_cfg["cross_attention_dim"] != width:
        raise WeightLoadError(f"UNet cross_attention_dim {unet_cfg['cross_attention_dim']} does not match "
                              f"the text encoder width {width}")
    unet_cfg.update(sample_size=size // 2 ** (len(vae_cfg["block_out_channels"]) - 1),
                    upcast_attention=upcast)
    scheduler = {**(SDXL_SCHEDULER if sdxl else diffusers.SD_SCHEDULER), "prediction_type": prediction}
    if sdxl:
        # time ids: 6 (sizes, crop, target size) for the base, 5 (an aesthetic score last) for the refiner
        count = 6 if "text_encoder" in parts else 5
        dim, rest = divmod(unet_cfg["projection_class_embeddings_input_dim"] - projection, count)
        if rest or dim <= 0:
            raise WeightLoadError(f"SDXL UNet: its added embedding takes {unet_cfg['projection_class_embeddings_input_dim']}"
                                  f" inputs, not the pooled text ({projection}) plus {count} time ids")
        unet_cfg["addition_time_embed_dim"] = dim
        text_cfgs["text_encoder_2"].update(architectures=["CLIPTextModelWithProjection"], projection_dim=projection)
        vae_cfg.update(scaling_factor=0.13025, force_upcast=True)
    return {"unet": unet_cfg, "vae": vae_cfg, **text_cfgs, "scheduler": scheduler}


def pipeline_options(configs):
    """The model_index.json options (diffusers.PIPELINE_OPTIONS) of a single file, from its configs: those of
    stabilityai's SDXL base and refiner folders (none for SD 1.x/2.x)."""
    if "text_encoder_2" not in configs:
        return {}
    if "text_encoder" in configs:
        return {"force_zeros_for_empty_prompt": True}
    return {"force_zeros_for_empty_prompt": False, "requires_aesthetics_score": True}

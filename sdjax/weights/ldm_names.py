"""Tensor names of original (CompVis / Stability) Stable Diffusion checkpoints vs diffusers ones.

A table maps an original module prefix to (diffusers prefix, renames), where `renames` maps the
sub-module names allowed below that prefix (original -> diffusers). Only `weight`/`bias`
leaves exist below a sub-module, so a table both renames and validates. The same table,
inverted, exports back. Text encoder names: `clip_name`, `open_clip_names`, `open_clip_export`.
"""
import re

import numpy as np

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
VAE_MODULES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")  # below VAE_PREFIX
CLIP_PREFIX = "cond_stage_model.transformer."
OPEN_CLIP_PREFIX = "cond_stage_model.model."
SDXL_PREFIX = "conditioner.embedders."  # SDXL's towers: N.transformer.* (CLIP, HF names) or N.model.* (OpenCLIP)

LEAF = {"": ""}  # one layer: only weight/bias directly below the prefix
UNET_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
               "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
              "nin_shortcut": "conv_shortcut"}
# ldm's AttnBlock uses 1x1 convs for q/k/v/proj_out; diffusers' Attention uses Linear layers.
VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_TRANSFORMER_BLOCK = ("norm1", "norm2", "norm3", "attn1.to_q", "attn1.to_k", "attn1.to_v",
                      "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
                      "ff.net.0.proj", "ff.net.2")


def _transformer(depth):
    """Renames inside a SpatialTransformer (same names as diffusers' Transformer2DModel)."""
    subs = ["norm", "proj_in", "proj_out"]
    subs += [f"transformer_blocks.{t}.{m}" for t in range(depth) for m in _TRANSFORMER_BLOCK]
    return {s: s for s in subs}


def _count(keys, pattern):
    """Number of distinct integers captured by `pattern` (one group) over `keys`."""
    pattern = re.compile(pattern)
    return len({m.group(1) for m in map(pattern.match, keys) if m})


def attention_depth(keys, prefix):
    """Transformer layers below `prefix` (a diffusers attention module) among the tensor names `keys`."""
    return len({k[len(prefix):].split(".")[1] for k in keys if k.startswith(prefix + "transformer_blocks.")})


def unet_layout_original(keys):
    """(levels, layers_per_block, down_attn, up_attn, depth) of an original UNet (or of a ControlNet, its first
    half: no up_attn); keys unprefixed."""
    levels = 1 + _count(keys, r"input_blocks\.(\d+)\.0\.op\.weight$")
    per_level = _count(keys, r"input_blocks\.(\d+)\.") // levels  # layers_per_block + 1 (a downsampler or conv_in)
    down = [any(f"input_blocks.{1 + i * per_level + j}.1.norm.weight" in keys
                for j in range(per_level - 1)) for i in range(levels)]
    up = [any(f"output_blocks.{i * per_level + j}.1.norm.weight" in keys
              for j in range(per_level)) for i in range(levels)]
    depth = _count(keys, r".*\.transformer_blocks\.(\d+)\.")
    return levels, per_level - 1, down, up, depth


def unet_layout_diffusers(keys):
    """(levels, layers_per_block, down_attn, up_attn, depth) of a diffusers UNet state dict."""
    levels = _count(keys, r"down_blocks\.(\d+)\.")
    down = [any(k.startswith(f"down_blocks.{i}.attentions.") for k in keys) for i in range(levels)]
    up = [any(k.startswith(f"up_blocks.{i}.attentions.") for k in keys) for i in range(levels)]
    depth = _count(keys, r".*\.transformer_blocks\.(\d+)\.")
    return levels, _count(keys, r"down_blocks\.0\.resnets\.(\d+)\."), down, up, depth


def unet_table(levels, layers_per_block, down_attn, up_attn, depth, text_time=False):
    """{original prefix: (diffusers prefix, renames)} for ldm's UNetModel (SD1/SD2 layout; SDXL's with
    text_time: its `label_emb` MLP is diffusers' add_embedding). depth: the most transformer layers of a level."""
    tr = _transformer(depth)
    table = {"label_emb.0.0": ("add_embedding.linear_1", LEAF), "label_emb.0.2": ("add_embedding.linear_2", LEAF)}
    table = {**(table if text_time else {}),
             "time_embed.0": ("time_embedding.linear_1", LEAF),
             "time_embed.2": ("time_embedding.linear_2", LEAF),
             "input_blocks.0.0": ("conv_in", LEAF),
             "middle_block.0": ("mid_block.resnets.0", UNET_RESNET),
             "middle_block.1": ("mid_block.attentions.0", tr),
             "middle_block.2": ("mid_block.resnets.1", UNET_RESNET),
             "out.0": ("conv_norm_out", LEAF), "out.2": ("conv_out", LEAF)}
    k = 1
    for i in range(levels):
        for j in range(layers_per_block):
            table[f"input_blocks.{k}.0"] = (f"down_blocks.{i}.resnets.{j}", UNET_RESNET)
            if down_attn[i]:
                table[f"input_blocks.{k}.1"] = (f"down_blocks.{i}.attentions.{j}", tr)
            k += 1
        if i < levels - 1:
            table[f"input_blocks.{k}.0.op"] = (f"down_blocks.{i}.downsamplers.0.conv", LEAF)
            k += 1
    for i in range(levels):
        for j in range(layers_per_block + 1):
            k = i * (layers_per_block + 1) + j
            table[f"output_blocks.{k}.0"] = (f"up_blocks.{i}.resnets.{j}", UNET_RESNET)
            if up_attn[i]:
                table[f"output_blocks.{k}.1"] = (f"up_blocks.{i}.attentions.{j}", tr)
        if i < levels - 1:  # the upsampler follows the last resnet (and its attention, if any)
            table[f"output_blocks.{k}.{2 if up_attn[i] else 1}.conv"] = (
                f"up_blocks.{i}.upsamplers.0.conv", LEAF)
    return table


def vae_layout_original(keys):
    """(levels, layers_per_block) of an original VAE; keys unprefixed."""
    return _count(keys, r"encoder\.down\.(\d+)\."), _count(keys, r"encoder\.down\.0\.block\.(\d+)\.")


def vae_layout_diffusers(keys):
    """(levels, layers_per_block) of a diffusers AutoencoderKL state dict."""
    return (_count(keys, r"encoder\.down_blocks\.(\d+)\."),
            _count(keys, r"encoder\.down_blocks\.0\.resnets\.(\d+)\."))


def vae_table(levels, layers_per_block):
    """{original prefix: (diffusers prefix, renames)} for ldm's Encoder/Decoder pair."""
    table = {"quant_conv": ("quant_conv", LEAF), "post_quant_conv": ("post_quant_conv", LEAF)}
    for part in ("encoder", "decoder"):
        table.update({
            f"{part}.conv_in": (f"{part}.conv_in", LEAF),
            f"{part}.conv_out": (f"{part}.conv_out", LEAF),
            f"{part}.norm_out": (f"{part}.conv_norm_out", LEAF),
            f"{part}.mid.block_1": (f"{part}.mid_block.resnets.0", VAE_RESNET),
            f"{part}.mid.attn_1": (f"{part}.mid_block.attentions.0", VAE_ATTENTION),
            f"{part}.mid.block_2": (f"{part}.mid_block.resnets.1", VAE_RESNET)})
    for i in range(levels):
        for j in range(layers_per_block):
            table[f"encoder.down.{i}.block.{j}"] = (f"encoder.down_blocks.{i}.resnets.{j}", VAE_RESNET)
        if i < levels - 1:
            table[f"encoder.down.{i}.downsample.conv"] = (
                f"encoder.down_blocks.{i}.downsamplers.0.conv", LEAF)
        level = levels - 1 - i  # ldm indexes decoder blocks by resolution, diffusers by order of use
        for j in range(layers_per_block + 1):
            table[f"decoder.up.{level}.block.{j}"] = (f"decoder.up_blocks.{i}.resnets.{j}", VAE_RESNET)
        if level > 0:
            table[f"decoder.up.{level}.upsample.conv"] = (f"decoder.up_blocks.{i}.upsamplers.0.conv", LEAF)
    return table


def controlnet_table(levels, layers_per_block, down_attn, depth, hint_convs, text_time=False):
    """{original prefix: (diffusers prefix, renames)} for ldm's ControlNet: the U-Net table's first half, plus
    the hint block (hint_convs convolutions, SiLUs between them: ldm indexes them 0, 2, 4, ...), a zero conv
    per skip and one after the middle block."""
    table = {old: new for old, new in unet_table(levels, layers_per_block, down_attn, [False] * levels, depth,
                                                 text_time).items()
             if not new[0].startswith(("up_blocks.", "conv_norm_out", "conv_out"))}
    hint = ["conv_in", *(f"blocks.{i}" for i in range(hint_convs - 2)), "conv_out"]
    table.update({f"input_hint_block.{2 * i}": (f"controlnet_cond_embedding.{name}", LEAF)
                  for i, name in enumerate(hint)})
    table.update({f"zero_convs.{i}.0": (f"controlnet_down_blocks.{i}", LEAF)
                  for i in range(1 + levels * layers_per_block + levels - 1)})
    table["middle_block_out.0"] = ("controlnet_mid_block", LEAF)
    return table


def controlnet_layout_original(keys):
    """controlnet_table's arguments but text_time, of an original ControlNet's (unprefixed) keys."""
    levels, layers, down, _, depth = unet_layout_original(keys)
    return levels, layers, down, depth, _count(keys, r"input_hint_block\.(\d+)\.")


def controlnet_layout_diffusers(keys):
    """controlnet_table's arguments but text_time, of a diffusers ControlNetModel state dict."""
    levels, layers, down, _, depth = unet_layout_diffusers(keys)
    return levels, layers, down, depth, 2 + _count(keys, r"controlnet_cond_embedding\.blocks\.(\d+)\.")


def unet_export_table(names):
    """{diffusers prefix: (original prefix, renames)} of a diffusers U-Net with tensor `names` (an SDXL one's
    text_time embedding included)."""
    text_time = "add_embedding.linear_1.weight" in names
    return invert(unet_table(*unet_layout_diffusers(set(names)), text_time=text_time))


def invert(table):
    """The table for the other direction: {diffusers prefix: (original prefix, renames reversed)}."""
    return {new: (old, {v: k for k, v in renames.items()}) for old, (new, renames) in table.items()}


def rename(name, table):
    """(new name, renames used) of `name` under `table`, or None if no rule covers it."""
    module, _, leaf = name.rpartition(".")
    if leaf not in ("weight", "bias"):
        return None
    parts = module.split(".")
    for cut in range(len(parts), 0, -1):
        head, sub = ".".join(parts[:cut]), ".".join(parts[cut:])
        if head in table and sub in table[head][1]:
            new_head, renames = table[head]
            return ".".join(p for p in (new_head, renames[sub], leaf) if p), renames
    return None


def rename_all(tensors, table, prefix, unused):
    """{new name: array} of the `tensors` that `table` covers; the names of the others, after `prefix`, appended
    to `unused`."""
    out = {}
    for name, array in tensors.items():
        hit = rename(name, table)
        if hit is None:
            unused.append(prefix + name)
        else:
            out[hit[0]] = array
    return out


_CLIP_NAME = re.compile(r"(embeddings\.(token|position)_embedding\.weight"
                        r"|encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|layer_norm[12]|mlp\.fc[12])"
                        r"\.(weight|bias)|final_layer_norm\.(weight|bias))$")


def clip_name(name):
    """transformers name (`text_model.*`) of a `cond_stage_model.transformer.*` sub-name; None if unknown.

    Very old SD1 checkpoints lack the `text_model.` level (pre-4.20 transformers layout).
    """
    name = name.removeprefix("text_model.")
    return "text_model." + name if _CLIP_NAME.match(name) else None


OPEN_CLIP_TOP = {"token_embedding.weight": "embeddings.token_embedding.weight",
                 "positional_embedding": "embeddings.position_embedding.weight",
                 "ln_final.weight": "final_layer_norm.weight", "ln_final.bias": "final_layer_norm.bias"}
OPEN_CLIP_LAYER = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
                   "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_RESBLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)$")
_IN_PROJ = re.compile(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$")


def open_clip_names(name, array):
    """[(transformers name, array)] of one OpenCLIP text tensor (sub-name); None if unknown.

    The fused attention in_proj [3D, ...] is split into q/k/v projections; SDXL's `text_projection`
    [D, P] (applied as x @ P) is transformers' Linear weight [P, D].
    """
    if name in OPEN_CLIP_TOP:
        return [("text_model." + OPEN_CLIP_TOP[name], array)]
    if name == "text_projection":
        return [("text_projection.weight", np.ascontiguousarray(array.T))]
    m = _IN_PROJ.match(name)
    if m:
        base = f"text_model.encoder.layers.{m.group(1)}.self_attn"
        q, k, v = (array[i * (len(array) // 3):(i + 1) * (len(array) // 3)] for i in range(3))
        return [(f"{base}.{p}_proj.{m.group(2)}", a) for p, a in zip("qkv", (q, k, v))]
    m = _RESBLOCK.match(name)
    if m and m.group(2) in OPEN_CLIP_LAYER:
        return [(f"text_model.encoder.layers.{m.group(1)}.{OPEN_CLIP_LAYER[m.group(2)]}.{m.group(3)}", array)]
    return None


def resblock_index(name):
    """Layer index of an OpenCLIP `transformer.resblocks.N.*` sub-name, else None."""
    m = re.match(r"transformer\.resblocks\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def open_clip_export(text, pad_layer=True):
    """OpenCLIP sub-names of transformers CLIP text tensors: q/k/v fused into in_proj, `text_projection`
    (SDXL's: the transpose of transformers' Linear weight), plus (pad_layer) one zero-filled resblock after the
    last (SD2 reads the penultimate layer, so it is never used)."""
    top = {v: k for k, v in OPEN_CLIP_TOP.items()}
    layer = {v: k for k, v in OPEN_CLIP_LAYER.items()}
    out, qkv = {}, {}
    for name, array in text.items():
        sub = name.removeprefix("text_model.")
        m = re.match(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$", sub)
        if sub in top:
            out[top[sub]] = array
        elif sub == "text_projection.weight":
            out["text_projection"] = np.ascontiguousarray(array.T)  # safetensors writes the buffer as it lies
        elif m and m.group(2) in layer:
            out[f"transformer.resblocks.{m.group(1)}.{layer[m.group(2)]}.{m.group(3)}"] = array
        elif m:  # self_attn.{q,k,v}_proj
            qkv[(m.group(1), m.group(2), m.group(3))] = array
    for (i, proj, leaf), array in qkv.items():
        if proj == "self_attn.q_proj":
            parts = [qkv[(i, f"self_attn.{p}_proj", leaf)] for p in "qkv"]
            out[f"transformer.resblocks.{i}.attn.in_proj_{leaf}"] = np.concatenate(parts)
    last = max(int(k.split(".")[2]) for k in out if k.startswith("transformer.resblocks."))
    for k in [k for k in out if k.startswith(f"transformer.resblocks.{last}.")] if pad_layer else []:
        out[k.replace(f".{last}.", f".{last + 1}.", 1)] = np.zeros_like(out[k])
    return out

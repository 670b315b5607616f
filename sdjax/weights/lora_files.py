"""LoRA files as people share them, read into `adapters.lora.LowRank` layers of a model's params, and written
(`lora_tensors`: a trained LoRA, in the diffusers and kohya formats below).

- diffusers / PEFT (`save_lora_weights`): `unet.` / `text_encoder.` / `text_encoder_2.` + module + `.lora_A.weight` /
  `.lora_B.weight` (older files: `.lora.down.weight`, `.lora_linear_layer.down.weight`, attention processors'
  `.processor.to_q_lora.down.weight`); alpha from PEFT's config in the header (`lora_adapter_metadata`), else from
  `module.alpha` tensors, else the rank.
- kohya / AUTOMATIC1111: `lora_unet_` / `lora_te_` (SDXL: `lora_te1_` / `lora_te2_`) + module with `_` for `.` +
  `.lora_down.weight` / `.lora_up.weight` / `.alpha`; LoCon adds the same on the convolutions.

The module names are no table of their own: they are the names the model's params load under (convert.torch_name),
and for the U-Net also its original (sgm) names (ldm_names' table of single files), which kohya's SDXL LoRAs use.
"""
import json
import math
import os
import re

import numpy as np
from flax import traverse_util
from safetensors import safe_open

from sdjax.adapters.lora import LowRank
from sdjax.errors import WeightLoadError
from sdjax.weights import ldm_names
from sdjax.weights.convert import kernel_layout, torch_layout, torch_name
from sdjax.weights.files import read_tensors

# A tensor name's prefix -> the model component it adapts
PREFIXES = {"unet.": "unet", "text_encoder.": "text_encoder", "text_encoder_2.": "text_encoder_2",
            "lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
            "lora_te2_": "text_encoder_2"}
# A tensor name's ending -> the part of the layer it is
PARTS = {".lora_A.weight": "down", ".lora_B.weight": "up",  # PEFT
         ".lora.down.weight": "down", ".lora.up.weight": "up",  # diffusers' LoRA layers (< 0.22)
         ".lora_linear_layer.down.weight": "down", ".lora_linear_layer.up.weight": "up",
         "_lora.down.weight": "down", "_lora.up.weight": "up",  # attention processors (diffusers < 0.17)
         ".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha"}  # kohya; alpha: both
# Module names of attention processors (diffusers < 0.17) -> the layers'
OLD_MODULES = ((re.compile(r"\.processor\.to_out$"), ".to_out.0"), (re.compile(r"\.processor\.(to_[qkv])$"), r".\1"),
               (re.compile(r"\.self_attn\.to_([qkv])$"), r".self_attn.\1_proj"),
               (re.compile(r"\.self_attn\.to_out$"), ".self_attn.out_proj"))
# Adapters that are not LoRAs, by their tensor names (LyCORIS' and PEFT's spellings)
OTHER_KINDS = {"LoHa": re.compile(r"\.hada_"), "LoKr": re.compile(r"\.lokr_"),
               "DoRA": re.compile(r"(dora_scale|lora_magnitude_vector)"),
               "Tucker LoCon": re.compile(r"\.lora_mid\."),
               "textual-inversion embedding": re.compile(r"^(emb_params|string_to_param|clip_[lg])$")}
_FORMATS = ("sdjax loads LoRA/LoCon files: diffusers/PEFT (unet./text_encoder. ... lora_A/lora_B) and "
            "kohya/A1111 (lora_unet_/lora_te_ ... lora_down/lora_up)")


def module_names(component, params):
    """{kernel path: (the module's name in diffusers / transformers, its original (sgm) name or None)} of `params`
    (one component's tree): every layer a LoRA may adapt; original names are the U-Net's."""
    flat = traverse_util.flatten_dict(params)
    names = {p: torch_name(p).removesuffix(".weight") for p in flat if p[-1] == "kernel"}
    if component != "unet":
        return {p: (n, None) for p, n in names.items()}
    table = ldm_names.unet_export_table([torch_name(p) for p in flat])
    original = {p: ldm_names.rename(f"{n}.weight", table) for p, n in names.items()}
    return {p: (n, original[p] and original[p][0].removesuffix(".weight")) for p, n in names.items()}


def names(pattern, module):
    """Whether the regex `pattern` names the layer `module` (its dotted name), as PEFT's target_modules and
    alpha_pattern do: the whole name, or its end after a dot."""
    return re.match(rf"(.*\.)?({pattern})$", module) is not None


def layer_names(component, params):
    """{module name with `_` for `.`: kernel path} of every name a LoRA file may give a layer of `params` (one
    component's tree): its diffusers / transformers name (a text tower's also without `text_model.`), its original."""
    out = {}
    for path, names in module_names(component, params).items():
        for name in (*names, names[0].removeprefix("text_model.")):
            if name:
                out[name.replace(".", "_")] = path
    return out


def kohya_names(component, params, xl):
    """{kernel path: kohya's name of the layer} as kohya's trainers write them: SD 1.x / 2.x's under diffusers /
    transformers names (`lora_unet_`, `lora_te_`), SDXL's U-Net under its original names (`lora_te1_` / `lora_te2_`
    for the towers)."""
    prefix = {"unet": "lora_unet_", "text_encoder": "lora_te1_" if xl else "lora_te_", "text_encoder_2": "lora_te2_"}
    return {p: prefix[component] + (original if xl and original else name).replace(".", "_")
            for p, (name, original) in module_names(component, params).items()}


def _split(key):
    """(component, module, part) of a LoRA tensor name, or None."""
    prefix = next((p for p in sorted(PREFIXES, key=len, reverse=True) if key.startswith(p)), None)
    ending = next((e for e in sorted(PARTS, key=len, reverse=True) if key.endswith(e)), None)
    if prefix is None or ending is None or len(key) <= len(prefix) + len(ending):
        return None
    module = key[len(prefix):-len(ending)]
    for pattern, new in OLD_MODULES:
        module = pattern.sub(new, module)
    return PREFIXES[prefix], module, PARTS[ending]


def _examples(keys, n=3):
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" (and {len(keys) - n} more)" if len(keys) > n else "")


def _peft_configs(path):
    """{component: PEFT LoraConfig fields} from a safetensors header's `lora_adapter_metadata` (diffusers)."""
    if not path.endswith(".safetensors"):
        return {}
    with safe_open(path, framework="numpy") as f:
        packed = (f.metadata() or {}).get("lora_adapter_metadata")
    if not packed:
        return {}
    out = {}
    for key, value in json.loads(packed).items():
        component, _, field = key.partition(".")
        out.setdefault(component, {})[field] = value
    return out


def _factor(module, rank, alpha, config):
    """alpha / rank of a layer: its alpha tensor's, else PEFT's config (alpha_pattern, rsLoRA), else 1."""
    if alpha is not None:
        return float(alpha) / rank
    if not config:
        return 1.0
    pattern = next((p for p in config.get("alpha_pattern") or {} if names(p, module)), None)
    alpha = config["alpha_pattern"][pattern] if pattern else config.get("lora_alpha", rank)
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


def _check_kind(path, tensors, configs):
    """Raise for an adapter that is not a LoRA (one line: the file, the kind, a few of its keys)."""
    for kind, pattern in OTHER_KINDS.items():
        keys = [k for k in tensors if pattern.search(k)]
        if kind == "DoRA" and not keys and any(c.get("use_dora") for c in configs.values()):
            keys = ["lora_adapter_metadata: use_dora"]
        if keys:
            hint = "; load it with load_textual_inversion (--embedding)" if kind.startswith("textual") else ""
            raise WeightLoadError(f"{path}: a {kind} file (keys like {_examples(keys)}), not a LoRA; {_FORMATS}{hint}")
    unknown = [k for k in tensors if _split(k) is None]
    if not tensors:
        raise WeightLoadError(f"{path}: holds no tensors; {_FORMATS}")
    if unknown:
        raise WeightLoadError(f"{path}: {len(unknown)} tensor(s) that are no LoRA layer sdjax knows (e.g. "
                              f"{_examples(unknown)}); {_FORMATS}")


def _layer(path, key, parts, shape, factor):
    """LowRank of one layer's tensors (PyTorch layouts) for a kernel of `shape`, or a one-line error."""
    down, up = (np.array(parts[p], np.float32) for p in ("down", "up"))
    rank = down.shape[0]
    if down.ndim not in (2, 4) or up.ndim != down.ndim or up.shape[1] != rank or up.shape[2:] not in ((), (1, 1)):
        raise WeightLoadError(f"{path}: {key}: down {down.shape} and up {up.shape} are no LoRA pair (down [r, in] or "
                              "[r, in, kh, kw], up [out, r] or [out, r, 1, 1])")
    layer = LowRank(kernel_layout(down), kernel_layout(up).reshape(rank, -1), factor)
    if (layer.down.size // rank * layer.up.shape[1] != math.prod(shape) or layer.up.shape[1] != shape[-1]
            or layer.down.shape[-2] != shape[-2]):
        raise WeightLoadError(f"{path}: {key}: down {down.shape} and up {up.shape} (PyTorch layout) do not fit the "
                              f"model's layer of kernel {tuple(shape)} (Flax layout): a LoRA of another model?")
    return layer


def read_lora(path, params):
    """{component: {kernel path: LowRank}} of the LoRA file at `path` (.safetensors; .pt/.bin/.ckpt with torch)
    for the model of `params` ({component: params tree}); every tensor is used or the file is refused."""
    if not os.path.isfile(path):
        raise WeightLoadError(f"LoRA file not found: {path}")
    tensors = read_tensors(path)
    configs = _peft_configs(path)
    _check_kind(path, tensors, configs)
    grouped = {}
    for key, value in tensors.items():
        component, module, part = _split(key)
        grouped.setdefault((component, module), {})[part] = value
    names = {c: layer_names(c, params[c]) for c in {c for c, _ in grouped} if c in params}
    missing = [f"{c}: {m}" for c, m in grouped if m.replace(".", "_") not in names.get(c, {})]
    if missing:
        raise WeightLoadError(f"{path}: {len(missing)} LoRA layer(s) name no layer of this model "
                              f"(components {sorted(params)}): {_examples(missing)}; a LoRA of another model family?")
    shapes = {c: {p: x.shape for p, x in traverse_util.flatten_dict(params[c]).items()} for c in names}
    out = {}
    for (component, module), parts in grouped.items():
        if "down" not in parts or "up" not in parts:
            raise WeightLoadError(f"{path}: {component} {module} has no LoRA {'up' if 'down' in parts else 'down'} "
                                  "tensor; the file is incomplete")
        kernel = names[component][module.replace(".", "_")]
        shape = shapes[component][kernel]
        factor = _factor(module, parts["down"].shape[0], parts.get("alpha"), configs.get(component))
        out.setdefault(component, {})[kernel] = _layer(path, f"{component} {module}", parts, shape,
                                                               factor)
    return out


WRITE_FORMATS = ("diffusers", "kohya")


def lora_tensors(layers, params, fmt):
    """({tensor name: float32 PyTorch-layout array}, header metadata {str: str}) of the LoRA `layers` ({component:
    {kernel path: LowRank}}, one rank and factor per component) of the model of `params` ({component: params tree})
    as `fmt` writes them: "diffusers" as `save_lora_weights` (PEFT's lora_A / lora_B under the modules' names, the
    PEFT config of each component in the header's `lora_adapter_metadata`), "kohya" as kohya's trainers (lora_down /
    lora_up / alpha; SDXL's U-Net under its original names)."""
    xl = "text_encoder_2" in params
    tensors, configs = {}, {}
    for component, by_path in layers.items():
        modules = module_names(component, params[component])
        kohya = kohya_names(component, params[component], xl) if fmt == "kohya" else None
        (rank, factor), = {(layer.up.shape[0], layer.factor) for layer in by_path.values()}
        for path, layer in by_path.items():
            # contiguous: safetensors writes an array's buffer as it lies (a transposed view's would be scrambled)
            down = np.ascontiguousarray(torch_layout(np.asarray(layer.down, np.float32)))
            up = np.ascontiguousarray(torch_layout(np.asarray(layer.up, np.float32)))
            up = up[..., None, None] if down.ndim == 4 else up  # a convolution's B: a 1x1 convolution
            if kohya:
                name = kohya[path]
                tensors.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                                f"{name}.alpha": np.asarray(factor * rank, np.float32)})
            else:
                name = f"{component}.{modules[path][0]}"
                tensors.update({f"{name}.lora_A.weight": down, f"{name}.lora_B.weight": up})
        # target_modules: the text towers' names without `text_model.` (transformers 5's CLIPTextModel has none)
        configs[component] = dict(r=rank, lora_alpha=factor * rank, target_modules=sorted(
            modules[p][0].removeprefix("text_model.") for p in by_path))
    if kohya:
        return tensors, {}
    packed = {f"{c}.{k}": v for c, config in configs.items() for k, v in config.items()}
    return tensors, {"format": "pt", "lora_adapter_metadata": json.dumps(packed, indent=2, sort_keys=True)}

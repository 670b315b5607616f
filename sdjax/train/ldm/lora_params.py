"""LoRA training (`config.lora`): the adapters of the targeted layers are the only trained params, the base is frozen.

The adapters are a params component of their own, "lora": {component: the component's tree down to each adapted
layer, whose kernel is replaced by {"down": [in, r] or [kh, kw, in, r], "up": [r, out]}} (float32; PEFT's
initialisation: down uniform in +-1/sqrt(fan_in), up zero). The step computes with each adapted kernel
W + alpha/r * down @ up (`adapters.lora`'s update), a function of the params; with `dropout` the update cannot be
merged (PEFT drops the layer's input x on the adapter's path only: W x + alpha/r * up(down(dropout(x)))), and the
adapted layers add that path to their output instead (`branched`).
"""
import math
import re

import jax
import jax.numpy as jnp
import flax.linen as nn
import ml_collections
from flax import traverse_util

from sdjax.adapters.lora import LowRank, delta
from sdjax.train.config import require
from sdjax.weights.lora_files import module_names, names

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")  # what a LoRA may adapt (their index: their init key)
BASE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
INIT_TAG = 0x4C6F5241  # folded into the seed's key for the adapters' initialisation ("LoRA"; no step count reaches it)


def default_config():
    """The `lora` section: diffusers' LoRA scripts' targets (attention projections of the U-Net and text towers)."""
    return ml_collections.ConfigDict(dict(
        rank=4,
        alpha=4.0,            # the update's factor is alpha / rank
        dropout=0.0,          # of the adapted layers' input on the adapter's path (PEFT's lora_dropout)
        targets=("to_q", "to_k", "to_v", "to_out.0", "q_proj", "k_proj", "v_proj", "out_proj"),  # regexes of names
        conv=False,           # adapt the convolutions the targets name too (LoCon; SD 1.x's proj_in/out are 1x1 ones)
        components=("unet",),  # and/or text_encoder, text_encoder_2 (SDXL's second tower)
        base_dtype="float32",  # the frozen U-Net's dtype: bfloat16 halves it (adapters and their updates: float32)
    ))


def enabled(config):
    return bool(config.get("lora"))


def check(config):
    """ValueError naming the first bad field of `config.lora` (or what it conflicts with)."""
    c = config.lora
    for key in default_config():
        require(key in c, f"missing field lora.{key}")
    require(isinstance(c.rank, int) and c.rank >= 1, f"lora.rank must be an integer >= 1, got {c.rank!r}")
    require(isinstance(c.alpha, (int, float)) and math.isfinite(c.alpha) and c.alpha > 0,
            f"lora.alpha must be a number > 0, got {c.alpha!r}")
    require(0 <= c.dropout < 1, f"lora.dropout must be in [0, 1), got {c.dropout}")
    require(not isinstance(c.targets, str) and len(c.targets) > 0 and all(isinstance(t, str) and t for t in c.targets),
            f"lora.targets must be a non-empty list of layer-name patterns, got {c.targets!r}")
    for pattern in c.targets:
        try:
            re.compile(pattern)
        except re.error as e:
            require(False, f"lora.targets: {pattern!r} is no regular expression ({e})")
    require(isinstance(c.conv, bool), f"lora.conv must be true or false, got {c.conv!r}")
    require(not isinstance(c.components, str) and len(c.components) > 0 and set(c.components) <= set(COMPONENTS)
            and len(set(c.components)) == len(c.components),
            f"lora.components must be a non-empty list of distinct names of {COMPONENTS}, got {c.components!r}")
    require(c.base_dtype in BASE_DTYPES, f"lora.base_dtype must be one of {tuple(BASE_DTYPES)}, got {c.base_dtype!r}")
    require(not config.get("train_text_encoder"), "train_text_encoder trains the whole tower; with lora, add "
            "text_encoder to lora.components instead")
    require(config.get("data", {}).get("source") != "cache" or tuple(c.components) == ("unet",),
            "data.source 'cache' holds the text conditioning: lora.components can only be ('unet',)")


def targeted(c, component, params):
    """{kernel path: shape} of the layers of `params` (one component's tree) that the `lora` section `c` adapts,
    in the order of their paths."""
    shapes = {p: x.shape for p, x in traverse_util.flatten_dict(params).items()}
    return {p: shapes[p] for p, (name, _) in sorted(module_names(component, params).items())
            if (c.conv or len(shapes[p]) == 2) and any(names(t, name) for t in c.targets)}


def init(c, params, seed, abstract=False):
    """{component: adapters} for the `lora` section `c` of the model of `params` ({component: params tree}): down
    uniform in +-1/sqrt(fan_in) (PEFT's kaiming-uniform), up zero, keyed by `seed`, the component and the layer's
    place; ShapeDtypeStructs when `abstract`. ValueError for a component the model lacks or a component no target
    names a layer of."""
    layers = {}
    for component in c.components:
        require(component in params, f"lora.components: {component!r} is not a component of this model "
                                     f"({', '.join(k for k in COMPONENTS if k in params)})")
        layers[component] = targeted(c, component, params[component])
        require(layers[component], f"lora.targets {tuple(c.targets)} name no {'' if c.conv else 'linear '}layer of "
                                   f"the {component}{'' if c.conv else ' (convolutions: lora.conv is false)'}")

    def draw():
        key = jax.random.fold_in(jax.random.key(seed), INIT_TAG)
        out = {}
        for component, shapes in layers.items():
            flat, k = {}, jax.random.fold_in(key, COMPONENTS.index(component))
            for j, (path, shape) in enumerate(shapes.items()):
                bound = 1 / math.sqrt(math.prod(shape[:-1]))
                flat[path[:-1] + ("down",)] = jax.random.uniform(jax.random.fold_in(k, j), (*shape[:-1], c.rank),
                                                                 jnp.float32, -bound, bound)
                flat[path[:-1] + ("up",)] = jnp.zeros((c.rank, shape[-1]), jnp.float32)
            out[component] = traverse_util.unflatten_dict(flat)
        return out

    return jax.eval_shape(draw) if abstract else draw()


def low_rank(c, adapters):
    """{component: {kernel path: LowRank}} of `adapters` ({component: adapters tree}) with the section's factor."""
    out = {}
    for component, tree in adapters.items():
        flat = traverse_util.flatten_dict(tree)
        out[component] = {p[:-1] + ("kernel",): LowRank(flat[p[:-1] + ("down",)], flat[p], c.alpha / c.rank)
                          for p in flat if p[-1] == "up"}
    return out


def merged(c, params):
    """`params` ({component: tree, "lora": adapters}) with every adapted kernel W + alpha/r * down @ up (float32),
    without "lora": what the model computes with (a function of the params: gradients reach the adapters)."""
    out = {k: v for k, v in params.items() if k != "lora"}
    for component, layers in low_rank(c, params["lora"]).items():
        flat = traverse_util.flatten_dict(out[component])
        for path, layer in layers.items():
            flat[path] = flat[path].astype(jnp.float32) + delta(layer, flat[path].shape)
        out[component] = traverse_util.unflatten_dict(flat)
    return out


def model_params(config, params):
    """The {component: params} a pipeline samples with from a run's {component: params} (its frozen and trained)."""
    return merged(config.lora, params) if enabled(config) else params


def adapted(config, modules, params, dropout_keys):
    """(modules, params) a train step computes with from its {component: params} (frozen and trained): without
    `lora` as they are; else the adapters merged, or with lora.dropout the adapted modules' extra path (`branched`:
    dropout_keys [b] are the examples' keys of it)."""
    if not enabled(config):
        return modules, params
    if config.lora.dropout == 0:
        return modules, merged(config.lora, params)
    return branched(config.lora, modules, params, dropout_keys)


def branched(c, modules, params, keys):
    """(modules, params without "lora"): each adapted component's module computing every adapted layer as PEFT does
    with dropout, W x + alpha/r * up(down(dropout(x))); the dropout of example i in layer j of component k keyed by
    fold_in(fold_in(keys[i], k), j) (k: its COMPONENTS index; j: the layer's place in path order)."""
    layers = low_rank(c, params["lora"])
    out = {k: _Branched(m, layers[k], c.dropout, keys, COMPONENTS.index(k)) if k in layers else m
           for k, m in modules.items()}
    return out, {k: v for k, v in params.items() if k != "lora"}


class _Branched:
    """A module whose `apply` adds the adapter's path to the output of each adapted Dense / Conv layer (a flax
    interceptor: found by the layer's path, which is its kernel's without "kernel"); other attributes: the module's."""

    def __init__(self, module, layers, rate, keys, index):
        self.module, self.rate, self.keys = module, rate, jax.vmap(lambda k: jax.random.fold_in(k, index))(keys)
        self.layers = {path[:-1]: (j, layer) for j, (path, layer) in enumerate(sorted(layers.items()))}

    def __getattr__(self, name):
        return getattr(self.module, name)

    def apply(self, variables, *args, **kwargs):
        with nn.intercept_methods(self._intercept):
            return self.module.apply(variables, *args, **kwargs)

    def _intercept(self, call, args, kwargs, context):
        y = call(*args, **kwargs)
        m = context.module
        if context.method_name != "__call__" or not isinstance(m, (nn.Dense, nn.Conv)) or m.path not in self.layers:
            return y
        j, layer = self.layers[m.path]
        x = args[0]
        require(x.shape[0] == self.keys.shape[0], f"lora.dropout: layer {'/'.join(m.path)} takes a batch of "
                                                  f"{x.shape[0]}, not the {self.keys.shape[0]} examples")
        keep = jax.vmap(lambda k: jax.random.bernoulli(jax.random.fold_in(k, j), 1 - self.rate, x.shape[1:]))(self.keys)
        x = jnp.where(keep, x / (1 - self.rate), 0).astype(x.dtype)
        rank = layer.up.shape[0]  # down as the layer's own kind (a convolution's strides and padding), rank wide
        h = m.clone(parent=None, features=rank, use_bias=False).apply({"params": {"kernel": layer.down}}, x)
        return y + (layer.factor * jnp.dot(h, layer.up.astype(h.dtype))).astype(y.dtype)

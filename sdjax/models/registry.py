"""The Stable Diffusion components (SDXL: a second, projected text tower): construction from configs and
parameter init."""
import dataclasses

import jax
import jax.numpy as jnp

from sdjax.models.autoencoder import AutoencoderKL
from sdjax.models.clip_text import CLIPTextModel, CLIPTextModelWithProjection
from sdjax.models.controlnet import ControlNetModel
from sdjax.models.model_config import NOT_CONFIG
from sdjax.models.unet import UNet2DConditionModel

MODELS = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel,
          "text_encoder_2": CLIPTextModelWithProjection, "controlnet": ControlNetModel}


def build(kind, config, dtype=jnp.float32, param_dtype=jnp.float32):
    """Module of component `kind` from a reference-format config dict."""
    return MODELS[kind].from_config(dict(config)).clone(dtype=dtype, param_dtype=param_dtype)


def config_of(module):
    """The reference-format config dict a module was built from (tuples as lists)."""
    unused = getattr(type(module), "UNET_ONLY", ())  # a ControlNet's inherited U-Net fields
    cfg = {f.name: getattr(module, f.name) for f in dataclasses.fields(module)
           if f.name not in NOT_CONFIG and f.name not in unused}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}


def example_inputs(kind, module):
    """Smallest inputs that touch every parameter of `module`."""
    if kind.startswith("text_encoder"):
        return (jnp.zeros((1, 1), jnp.int32),)
    side = 2 ** len(module.block_out_channels)
    image = jnp.zeros((1, side, side, module.in_channels))
    if kind == "vae":
        return (image,)
    inputs = (image, jnp.zeros((1,)), jnp.zeros((1, 1, module.cross_attention_dim)))
    if kind == "controlnet":  # the conditioning image, at the latents' size times the embedding's factor
        f = 2 ** (len(module.conditioning_embedding_out_channels) - 1)
        inputs += (jnp.zeros((1, side * f, side * f, module.conditioning_channels)), 1.0)
    if module.addition_embed_type:  # SDXL's text_embeds, time_ids: only their total width shapes add_embedding
        width = module.projection_class_embeddings_input_dim - module.addition_time_embed_dim
        inputs += (jnp.zeros((1, width)), jnp.zeros((1, 1)))
    return inputs


def init_params(kind, module, key):
    """Randomly initialised params of `module`."""
    return jax.jit(module.init)(key, *example_inputs(kind, module))["params"]


def param_shapes(kind, module):
    """Params tree of ShapeDtypeStructs, without allocating anything."""
    return jax.eval_shape(module.init, jax.random.key(0), *example_inputs(kind, module))["params"]

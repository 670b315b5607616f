"""CLIP text tower (the Stable Diffusion text encoder), mirroring transformers' CLIPTextModel.

Param tree: text_model/{embeddings/{token_embedding, position_embedding},
encoder/layers_i/{self_attn/{q,k,v,out}_proj, layer_norm1, mlp/{fc1, fc2}, layer_norm2},
final_layer_norm}, i.e. the names of a diffusers-format `text_encoder` checkpoint on disk.
No attention_mask input: Stable Diffusion pads prompts and relies on the causal mask alone.
"""
import functools

import flax.linen as nn
import jax.numpy as jnp

from sdjax.errors import UnsupportedConfig
from sdjax.models import model_config
from sdjax.models.activations import ACTIVATIONS
from sdjax.models.attention import multi_head_attention

# The token embedding table [vocab_size, D] in the params of CLIPTextModel (textual inversion adds rows to it)
TOKEN_TABLE = ("text_model", "embeddings", "token_embedding", "embedding")


def eos_positions(input_ids, eos_token_id):
    """input_ids: [B, L] -> [B] index of the token whose state is pooled (as transformers does).

    Configs with the historical eos_token_id == 2 pool at the largest id (the EOS in CLIP's
    vocabulary); otherwise at the first position holding eos_token_id.
    """
    if eos_token_id == 2:
        return jnp.argmax(input_ids, axis=-1)
    return jnp.argmax((input_ids == eos_token_id).astype(jnp.int32), axis=-1)


class CLIPAttention(nn.Module):
    """Multi-head self-attention, causal for text (the vision tower's is not): [B, L, D] -> [B, L, D]."""
    hidden_size: int
    num_attention_heads: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    causal: bool = True

    @nn.compact
    def __call__(self, x):
        dense = functools.partial(nn.Dense, self.hidden_size, dtype=self.dtype,
                                  param_dtype=self.param_dtype)
        q, k, v = (dense(name=n)(x) for n in ("q_proj", "k_proj", "v_proj"))
        out = multi_head_attention(q, k, v, self.num_attention_heads, causal=self.causal)
        return dense(name="out_proj")(out)


class CLIPMLP(nn.Module):
    """fc1 -> activation -> fc2: [B, L, D] -> [B, L, D]."""
    hidden_size: int
    intermediate_size: int
    hidden_act: str
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = nn.Dense(self.intermediate_size, name="fc1", **kw)(x)
        x = ACTIVATIONS[self.hidden_act](x)
        return nn.Dense(self.hidden_size, name="fc2", **kw)(x)


class CLIPEncoderLayer(nn.Module):
    """Pre-norm transformer block: [B, L, D] -> [B, L, D]."""
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    hidden_act: str
    layer_norm_eps: float
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    causal: bool = True

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm = functools.partial(nn.LayerNorm, epsilon=self.layer_norm_eps, **kw)
        attention = CLIPAttention(self.hidden_size, self.num_attention_heads, causal=self.causal, name="self_attn", **kw)
        x = x + attention(norm(name="layer_norm1")(x))
        mlp = CLIPMLP(self.hidden_size, self.intermediate_size, self.hidden_act, name="mlp", **kw)
        return x + mlp(norm(name="layer_norm2")(x))


class CLIPEncoder(nn.Module):
    """Stack of encoder layers: [B, L, D] -> tuple of num_hidden_layers [B, L, D] layer outputs (causal: the text
    tower's; the vision tower's attends to all tokens)."""
    num_hidden_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    hidden_act: str
    layer_norm_eps: float
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    causal: bool = True

    @nn.compact
    def __call__(self, x):
        outputs = []
        for i in range(self.num_hidden_layers):
            x = CLIPEncoderLayer(self.hidden_size, self.intermediate_size, self.num_attention_heads,
                                 self.hidden_act, self.layer_norm_eps, self.dtype,
                                 self.param_dtype, self.causal, name=f"layers_{i}")(x)
            outputs.append(x)
        return tuple(outputs)


class CLIPTextEmbeddings(nn.Module):
    """Token plus learned position embeddings: input_ids [B, L] -> [B, L, D]."""
    vocab_size: int
    hidden_size: int
    max_position_embeddings: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        tokens = nn.Embed(self.vocab_size, self.hidden_size, name="token_embedding", **kw)
        positions = nn.Embed(self.max_position_embeddings, self.hidden_size,
                             name="position_embedding", **kw)
        return tokens(input_ids) + positions(jnp.arange(input_ids.shape[-1])[None])


class CLIPTextTransformer(nn.Module):
    """Embeddings, encoder and final norm; fields are transformers' CLIPTextConfig keys."""
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids, skip_last_layers: int = 0):
        """See CLIPTextModel.__call__."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = CLIPTextEmbeddings(self.vocab_size, self.hidden_size, self.max_position_embeddings,
                               name="embeddings", **kw)(input_ids)
        encoder = CLIPEncoder(self.num_hidden_layers, self.hidden_size, self.intermediate_size,
                              self.num_attention_heads, self.hidden_act, self.layer_norm_eps,
                              name="encoder", **kw)
        hidden_states = (x,) + encoder(x)
        final_norm = nn.LayerNorm(epsilon=self.layer_norm_eps, name="final_layer_norm", **kw)
        last = final_norm(hidden_states[-1])
        pooled = last[jnp.arange(last.shape[0]), eos_positions(input_ids, self.eos_token_id)]
        if skip_last_layers:
            last = final_norm(hidden_states[-1 - skip_last_layers])
        return dict(last_hidden_state=last, hidden_states=hidden_states, pooler_output=pooled)


class CLIPTextModel(CLIPTextTransformer):
    """CLIP text encoder with its params under `text_model`, as in diffusers-format checkpoints.

    Fields are transformers' CLIPTextConfig keys (projection_dim unused) plus dtype/param_dtype.
    """

    @classmethod
    def from_config(cls, cfg, **overrides):
        """Build from a transformers CLIPTextConfig dict (model_config.build); overrides (e.g. dtype) win.

        Keys that are not fields (projection_dim, dropouts, init scales, token ids other than
        eos, the generic PretrainedConfig keys that old config.json files dump) do not change
        the forward pass and are ignored.
        """
        return model_config.build(cls, cfg, overrides, only={"model_type": "clip_text_model"}, unknown="ignore")

    def check_config(self):
        """UnsupportedConfig for options this implementation lacks."""
        model_config.check_activation("CLIPTextModel", "hidden_act", self.hidden_act)
        if not isinstance(self.eos_token_id, int):
            raise model_config.unsupported("CLIPTextModel", "eos_token_id", self.eos_token_id, "one integer")
        if self.hidden_size % self.num_attention_heads:
            raise UnsupportedConfig(f"CLIPTextModel: hidden_size = {self.hidden_size} is not a multiple of "
                                    f"num_attention_heads = {self.num_attention_heads}")

    @nn.compact
    def __call__(self, input_ids, skip_last_layers: int = 0):
        """input_ids: [B, L] int -> dict of [B, L, D] last_hidden_state, hidden_states, [B, D] pooler_output.

        hidden_states holds num_hidden_layers + 1 entries, the embeddings first, as with
        transformers' output_hidden_states. last_hidden_state is final_layer_norm of
        hidden_states[-1 - skip_last_layers] (skip_last_layers static, the "CLIP skip");
        pooler_output is always taken from the full-depth output at the EOS token.
        """
        if input_ids.shape[-1] > self.max_position_embeddings:
            raise ValueError(f"CLIPTextModel: sequence length {input_ids.shape[-1]} exceeds "
                             f"max_position_embeddings = {self.max_position_embeddings}")
        if not 0 <= skip_last_layers <= self.num_hidden_layers:
            raise ValueError(f"CLIPTextModel: skip_last_layers = {skip_last_layers} must be in "
                             f"[0, num_hidden_layers = {self.num_hidden_layers}]")
        fields = {f: getattr(self, f) for f in CLIPTextTransformer.__dataclass_fields__
                  if f not in ("parent", "name")}
        out = CLIPTextTransformer(**fields, name="text_model")(input_ids, skip_last_layers)
        if hasattr(self, "projection_dim"):  # CLIPTextModelWithProjection
            projection = nn.Dense(self.projection_dim, use_bias=False, name="text_projection", dtype=self.dtype,
                                  param_dtype=self.param_dtype)
            out["text_embeds"] = projection(out["pooler_output"])
        return out


class CLIPTextModelWithProjection(CLIPTextModel):
    """SDXL's second text tower (OpenCLIP bigG; transformers' CLIPTextModelWithProjection): the CLIP text
    encoder, plus `text_embeds` [B, projection_dim]: `text_projection` (no bias) of the pooled EOS state."""
    projection_dim: int = 512


def sdxl_text(outputs, clip_skip=0):
    """SDXL's text conditioning from its towers' outputs, in order (the refiner has the second only):
    (each tower's states `clip_skip` layers before its penultimate one, no final norm, concatenated
    [B, L, sum of widths]; the last tower's projected EOS state `text_embeds` [B, P])."""
    states = [out["hidden_states"][-2 - clip_skip] for out in outputs]
    return jnp.concatenate(states, -1), outputs[-1]["text_embeds"]


def text_conditioning(modules, p, ids):
    """The text part of the U-Net's conditioning, {component: module} `modules` with {component: params} `p`
    applied to token ids {batch key: [b, L]}: {"encoder_hidden_states":
    the text encoder's last states}; SDXL (text_encoder_2): both towers' penultimate states and "text_embeds",
    the pooled text. (What the latent cache stores.)"""
    if "text_encoder_2" not in modules:
        return {"encoder_hidden_states": modules["text_encoder"].apply(
            {"params": p["text_encoder"]}, ids["input_ids"])["last_hidden_state"]}
    outputs = [modules[k].apply({"params": p[k]}, ids[key])
               for k, key in (("text_encoder", "input_ids"), ("text_encoder_2", "input_ids_2"))]
    text, pooled = sdxl_text(outputs)
    return dict(encoder_hidden_states=text, text_embeds=pooled)

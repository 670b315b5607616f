"""Conditional U-Net of Stable Diffusion 1.x/2.x and SDXL (diffusers `UNet2DConditionModel`), NHWC."""
import flax.linen as nn
import jax.numpy as jnp

from sdjax.models.conv import Conv
from sdjax.models import model_config
from sdjax.models.activations import ACTIVATIONS
from sdjax.models.unet_blocks import (DownBlock2D, TimestepEmbedding, UNetMidBlock2DCrossAttn, UpBlock2D,
                                      timestep_embedding)

# Block type -> whether it carries cross-attention transformers.
_DOWN_TYPES = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
_UP_TYPES = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}
# Config keys that change the architecture, with the only value implemented here.
_ONLY = {
    "mid_block_type": "UNetMidBlock2DCrossAttn", "resnet_time_scale_shift": "default",
    "dual_cross_attention": False, "class_embed_type": None,
    "dropout": 0.0, "reverse_transformer_layers_per_block": None, "encoder_hid_dim": None,
    "encoder_hid_dim_type": None, "num_class_embeds": None,
    "time_embedding_type": "positional", "time_embedding_dim": None, "time_embedding_act_fn": None,
    "timestep_post_act": None, "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "attention_type": "default",
    "class_embeddings_concat": False,
}
# Config keys that diffusers ignores for the block types above (they only affect other blocks).
_NO_EFFECT = {"resnet_skip_time_act", "resnet_out_scale_factor", "cross_attention_norm",
              "mid_block_only_cross_attention", "addition_embed_type_num_heads"}
_BOOKKEEPING = {"architectures", "transformers_version", "torch_dtype"}


def _per_block(value, n):
    """An int/bool/None, or a per-block sequence, as a tuple of length n."""
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * n


class UNet2DConditionModel(nn.Module):
    """Noise predictor eps(x_t, t, text): sample [B, H, W, in] -> [B, H, W, out_channels].

    Attributes are diffusers' config keys with its defaults (SD 1.x sizes). As in diffusers,
    `num_attention_heads=None` means `attention_head_dim` is the number of heads per block.
    """
    sample_size: int | None = None
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                         "CrossAttnDownBlock2D", "DownBlock2D")
    mid_block_type: str = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                       "CrossAttnUpBlock2D")
    only_cross_attention: bool | tuple[bool, ...] = False
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int | tuple[int, ...] = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int | tuple[int, ...] = 1280
    transformer_layers_per_block: int | tuple[int, ...] = 1
    attention_head_dim: int | tuple[int, ...] = 8
    num_attention_heads: int | tuple[int, ...] | None = None
    use_linear_projection: bool = False
    upcast_attention: bool = False
    resnet_time_scale_shift: str = "default"
    dual_cross_attention: bool = False
    class_embed_type: str | None = None
    addition_embed_type: str | None = None  # None, or "text_time" (SDXL: pooled text + size/crop micro-conditioning)
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat: bool = False  # not a config key: recompute each block's activations in the backward pass

    @classmethod
    def from_config(cls, cfg, **overrides):
        """Build from a diffusers `config.json` dict (model_config.build); overrides (e.g. dtype) win."""
        return model_config.build(cls, cfg, overrides, only=_ONLY, ignored=_NO_EFFECT | _BOOKKEEPING)

    def check_config(self):
        """UnsupportedConfig naming the first field whose value this U-Net does not implement."""
        for key, types, known in (("down_block_types", self.down_block_types, _DOWN_TYPES),
                                  ("up_block_types", self.up_block_types, _UP_TYPES)):
            if any(t not in known for t in types):
                raise model_config.unsupported("UNet2DConditionModel", key, list(types), f"types from {sorted(known)}")
        model_config.check_activation("UNet2DConditionModel", "act_fn", self.act_fn)
        if self.norm_num_groups is None:
            raise model_config.unsupported("UNet2DConditionModel", "norm_num_groups", None, "an integer")
        if self.addition_embed_type not in (None, "text_time"):
            raise model_config.unsupported("UNet2DConditionModel", "addition_embed_type", self.addition_embed_type,
                                           "None or 'text_time'")
        if self.addition_embed_type and not (self.addition_time_embed_dim and self.projection_class_embeddings_input_dim):
            raise model_config.unsupported("UNet2DConditionModel", "addition_time_embed_dim",
                                           self.addition_time_embed_dim, "an integer (with "
                                           "projection_class_embeddings_input_dim) for addition_embed_type='text_time'")
        layers = self.transformer_layers_per_block
        if isinstance(layers, (tuple, list)) and any(isinstance(v, (tuple, list)) for v in layers):
            raise model_config.unsupported("UNet2DConditionModel", "transformer_layers_per_block", layers,
                                           "an integer or one per block")

    def _check_inputs(self, sample, context, text_embeds, time_ids):
        self.check_config()
        if self.addition_embed_type:
            want = self.projection_class_embeddings_input_dim
            if (text_embeds is None or time_ids is None or text_embeds.ndim != 2 or time_ids.ndim != 2
                    or text_embeds.shape[-1] + time_ids.shape[-1] * self.addition_time_embed_dim != want):
                raise ValueError(f"addition_embed_type='text_time' needs text_embeds [B, D] and time_ids [B, N] with "
                                 f"D + N * {self.addition_time_embed_dim} = {want}, got "
                                 f"{getattr(text_embeds, 'shape', None)} and {getattr(time_ids, 'shape', None)}")
        if sample.ndim != 4 or sample.shape[-1] != self.in_channels:
            raise ValueError(f"sample must be [B, H, W, {self.in_channels}], got {sample.shape}")
        if context.ndim != 3 or context.shape[-1] not in _per_block(self.cross_attention_dim, 1):
            raise ValueError(f"encoder_hidden_states must be [B, L, {self.cross_attention_dim}], got {context.shape}")

    def _stage_args(self):
        """Per-block settings (heads, layers, transformer depth, cross-only) and the blocks' common keywords."""
        n = len(self.block_out_channels)
        stage = dict(groups=self.norm_num_groups, eps=self.norm_eps, act_fn=self.act_fn,
                     use_linear_projection=self.use_linear_projection, upcast_attention=self.upcast_attention,
                     dtype=self.dtype, param_dtype=self.param_dtype)
        return (_per_block(self.num_attention_heads or self.attention_head_dim, n), _per_block(self.layers_per_block, n),
                _per_block(self.transformer_layers_per_block, n), _per_block(self.only_cross_attention, n), stage)

    def encode(self, sample, timesteps, encoder_hidden_states, text_embeds=None, time_ids=None, hint=None):
        """The first half, shared with the ControlNet (which is built from it, with the same names): the time
        embedding temb [B, T], conv_in (+ `hint`, a function adding the ControlNet's conditioning), the down
        blocks and the mid block -> (temb, the mid block's output, the skips [B, h, w, c] of every level)."""
        self._check_inputs(sample, encoder_hidden_states, text_embeds, time_ids)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        heads, layers, tlayers, only_cross, stage = self._stage_args()
        n = len(self.block_out_channels)
        x = sample.astype(self.dtype)
        context = encoder_hidden_states.astype(self.dtype)
        if self.center_input_sample:
            x = 2 * x - 1.0
        t = jnp.broadcast_to(jnp.asarray(timesteps).reshape(-1), (x.shape[0],))
        temb = timestep_embedding(t, self.block_out_channels[0], self.flip_sin_to_cos, self.freq_shift)
        temb = TimestepEmbedding(dim=4 * self.block_out_channels[0], act_fn=self.act_fn,
                                 name="time_embedding", **kw)(temb.astype(self.dtype))
        if self.addition_embed_type:
            sizes = timestep_embedding(time_ids.reshape(-1), self.addition_time_embed_dim, self.flip_sin_to_cos,
                                       self.freq_shift).reshape(x.shape[0], -1)
            added = jnp.concatenate([text_embeds.astype(jnp.float32), sizes], axis=-1).astype(self.dtype)
            temb = temb + TimestepEmbedding(dim=temb.shape[-1], act_fn=self.act_fn, name="add_embedding", **kw)(added)

        x = Conv(self.block_out_channels[0], (3, 3), padding=1, name="conv_in", **kw)(x)
        if hint is not None:
            x = hint(x)
        # nn.remat keeps names (and so params)
        down, mid = ((nn.remat(DownBlock2D), nn.remat(UNetMidBlock2DCrossAttn)) if self.remat
                     else (DownBlock2D, UNetMidBlock2DCrossAttn))
        skips = [x]
        for i, block_type in enumerate(self.down_block_types):
            x, res = down(
                out_channels=self.block_out_channels[i], num_layers=layers[i], cross_attention=_DOWN_TYPES[block_type],
                num_heads=heads[i], transformer_layers=tlayers[i], only_cross_attention=only_cross[i],
                add_downsample=i < n - 1, downsample_padding=self.downsample_padding,
                name=f"down_blocks_{i}", **stage)(x, temb, context)
            skips += res
        x = mid(
            out_channels=self.block_out_channels[-1], num_heads=heads[-1], transformer_layers=tlayers[-1],
            output_scale_factor=self.mid_block_scale_factor, name="mid_block", **stage)(x, temb, context)
        return temb, x, skips

    @nn.compact
    def __call__(self, sample, timesteps, encoder_hidden_states, text_embeds=None, time_ids=None,
                 down_residuals=None, mid_residual=None):
        """sample [B, H, W, in], timesteps scalar or [B] (float ok), text [B, L, D] -> [B, H, W, out].

        With addition_embed_type="text_time" (SDXL): text_embeds [B, P] (the pooled, projected text) and
        time_ids [B, N] (original size, crop top-left, target size; the refiner: aesthetic score instead of
        the target size), diffusers' `added_cond_kwargs`. down_residuals (one per skip) / mid_residual: what
        ControlNets add to the skips and to the mid block's output (diffusers' down_block_additional_residuals,
        mid_block_additional_residual)."""
        temb, x, skips = self.encode(sample, timesteps, encoder_hidden_states, text_embeds, time_ids)
        context = encoder_hidden_states.astype(self.dtype)
        if down_residuals is not None:
            if len(down_residuals) != len(skips):
                raise ValueError(f"down_residuals: {len(skips)} expected (one per skip), got {len(down_residuals)}")
            skips = [s + r.astype(s.dtype) for s, r in zip(skips, down_residuals)]
        if mid_residual is not None:
            x = x + mid_residual.astype(x.dtype)
        heads, layers, tlayers, only_cross, stage = self._stage_args()
        n = len(self.block_out_channels)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        # `size` (argument 5 counting self) is static
        up = nn.remat(UpBlock2D, static_argnums=(5,)) if self.remat else UpBlock2D
        for i, block_type in enumerate(self.up_block_types):
            r = n - 1 - i  # the matching down level
            k = layers[r] + 1
            res, skips = skips[-k:], skips[:-k]
            # Upsample to the next skip's size: 2x, or what restores an odd size on the way down.
            size = skips[-1].shape[1:3] if i < n - 1 else None
            x = up(
                out_channels=self.block_out_channels[r], num_layers=k, cross_attention=_UP_TYPES[block_type],
                num_heads=heads[r], transformer_layers=tlayers[r], only_cross_attention=only_cross[r],
                add_upsample=i < n - 1, name=f"up_blocks_{i}", **stage)(x, res, temb, context, size)

        x = nn.GroupNorm(self.norm_num_groups, epsilon=self.norm_eps, name="conv_norm_out", **kw)(x)
        x = ACTIVATIONS[self.act_fn](x)
        return Conv(self.out_channels, (3, 3), padding=1, name="conv_out", **kw)(x)

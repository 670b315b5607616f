"""Building blocks of the conditional U-Net, named like diffusers' modules (NHWC tensors)."""
import math

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from sdjax.models.activations import ACTIVATIONS
from sdjax.models.attention import multi_head_attention
from sdjax.models.conv import Conv



def timestep_embedding(timesteps, dim, flip_sin_to_cos=True, freq_shift=0.0, max_period=10000):
    """Sinusoidal embedding of (possibly fractional) timesteps: [B] -> [B, dim] float32."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift))
    args = timesteps.astype(jnp.float32)[:, None] * freqs[None, :]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    return jnp.pad(emb, ((0, 0), (0, dim % 2)))


def resize_nearest(x, size):
    """PyTorch `interpolate(mode='nearest')`: x [B, H, W, C] -> [B, size[0], size[1], C]."""
    for axis, out in zip((1, 2), size):
        n = x.shape[axis]
        if out == 2 * n:
            x = jnp.repeat(x, 2, axis=axis)
        elif out != n:
            # torch's index rule: floor(i * (in / out)) in float32, clamped.
            scale = np.float32(n) / np.float32(out)
            idx = np.minimum(np.floor(np.arange(out, dtype=np.float32) * scale).astype(np.int32), n - 1)
            x = jnp.take(x, idx, axis=axis)
    return x


class _Layer(nn.Module):
    """Base holding the compute and parameter dtypes every block passes on."""
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @property
    def kw(self):
        return dict(dtype=self.dtype, param_dtype=self.param_dtype)


class TimestepEmbedding(_Layer):
    """MLP on the sinusoidal embedding: [B, C] -> [B, dim]."""
    dim: int = 1280
    act_fn: str = "silu"

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(self.dim, name="linear_1", **self.kw)(x)
        return nn.Dense(self.dim, name="linear_2", **self.kw)(ACTIVATIONS[self.act_fn](x))


class ResnetBlock2D(_Layer):
    """Pre-norm residual block with a time-embedding bias: x [B, H, W, Cin], temb [B, T] -> [B, H, W, out]."""
    out_channels: int = 320
    groups: int = 32
    eps: float = 1e-5
    act_fn: str = "silu"
    output_scale_factor: float = 1.0

    @nn.compact
    def __call__(self, x, temb):
        act, kw = ACTIVATIONS[self.act_fn], self.kw
        h = act(nn.GroupNorm(self.groups, epsilon=self.eps, name="norm1", **kw)(x))
        h = Conv(self.out_channels, (3, 3), padding=1, name="conv1", **kw)(h)
        h = h + nn.Dense(self.out_channels, name="time_emb_proj", **kw)(act(temb))[:, None, None, :]
        h = act(nn.GroupNorm(self.groups, epsilon=self.eps, name="norm2", **kw)(h))
        h = Conv(self.out_channels, (3, 3), padding=1, name="conv2", **kw)(h)
        if x.shape[-1] != self.out_channels:
            x = Conv(self.out_channels, (1, 1), name="conv_shortcut", **kw)(x)
        return (x + h) / self.output_scale_factor


class Attention(_Layer):
    """Multi-head attention of x [B, L, D] over context [B, S, Dc] (x itself when None) -> [B, L, D]."""
    num_heads: int = 8
    upcast: bool = False

    @nn.compact
    def __call__(self, x, context=None):
        context = x if context is None else context
        d = x.shape[-1]
        q = nn.Dense(d, use_bias=False, name="to_q", **self.kw)(x)
        k = nn.Dense(d, use_bias=False, name="to_k", **self.kw)(context)
        v = nn.Dense(d, use_bias=False, name="to_v", **self.kw)(context)
        out = multi_head_attention(q, k, v, self.num_heads, upcast=self.upcast)
        return nn.Dense(d, name="to_out_0", **self.kw)(out)


class GEGLU(_Layer):
    """GELU-gated projection: [B, L, D] -> [B, L, inner]."""
    inner: int = 1280

    @nn.compact
    def __call__(self, x):
        h, gate = jnp.split(nn.Dense(2 * self.inner, name="proj", **self.kw)(x), 2, axis=-1)
        return h * nn.gelu(gate, approximate=False)


class FeedForward(_Layer):
    """GEGLU feed-forward with 4x width: [B, L, D] -> [B, L, D]."""

    @nn.compact
    def __call__(self, x):
        h = GEGLU(inner=4 * x.shape[-1], name="net_0", **self.kw)(x)
        return nn.Dense(x.shape[-1], name="net_2", **self.kw)(h)


class BasicTransformerBlock(_Layer):
    """Self-attention, cross-attention, feed-forward, each pre-LayerNorm and residual: [B, L, D] -> [B, L, D]."""
    num_heads: int = 8
    only_cross_attention: bool = False
    upcast_attention: bool = False

    @nn.compact
    def __call__(self, x, context):
        norm = lambda name: nn.LayerNorm(epsilon=1e-5, name=name, **self.kw)
        attn = lambda name: Attention(num_heads=self.num_heads, upcast=self.upcast_attention, name=name, **self.kw)
        x = x + attn("attn1")(norm("norm1")(x), context if self.only_cross_attention else None)
        x = x + attn("attn2")(norm("norm2")(x), context)
        return x + FeedForward(name="ff", **self.kw)(norm("norm3")(x))


class Transformer2D(_Layer):
    """Spatial transformer (diffusers Transformer2DModel): x [B, H, W, C], context [B, S, Dc] -> [B, H, W, C]."""
    num_heads: int = 8
    num_layers: int = 1
    groups: int = 32
    use_linear_projection: bool = False
    only_cross_attention: bool = False
    upcast_attention: bool = False

    @nn.compact
    def __call__(self, x, context):
        b, h, w, c = x.shape
        inner = self.num_heads * (c // self.num_heads)
        proj = lambda n, name: (nn.Dense(n, name=name, **self.kw) if self.use_linear_projection
                                else Conv(n, (1, 1), name=name, **self.kw))
        y = nn.GroupNorm(self.groups, epsilon=1e-6, name="norm", **self.kw)(x)
        y = proj(inner, "proj_in")(y).reshape(b, h * w, inner)
        for k in range(self.num_layers):
            y = BasicTransformerBlock(
                num_heads=self.num_heads, only_cross_attention=self.only_cross_attention,
                upcast_attention=self.upcast_attention, name=f"transformer_blocks_{k}", **self.kw)(y, context)
        return proj(c, "proj_out")(y.reshape(b, h, w, inner)) + x


class Downsample2D(_Layer):
    """Stride-2 3x3 conv: [B, H, W, C] -> [B, ceil(H/2), ceil(W/2), C]; padding 0 pads right/bottom by one."""
    padding: int = 1

    @nn.compact
    def __call__(self, x):
        p = self.padding
        pad = ((0, 1), (0, 1)) if p == 0 else ((p, p), (p, p))
        return Conv(x.shape[-1], (3, 3), strides=2, padding=pad, name="conv", **self.kw)(x)


class Upsample2D(_Layer):
    """Nearest resize to `size` then 3x3 conv: [B, H, W, C] -> [B, size[0], size[1], C]."""

    @nn.compact
    def __call__(self, x, size):
        return Conv(x.shape[-1], (3, 3), padding=1, name="conv", **self.kw)(resize_nearest(x, size))


class _Stage(_Layer):
    """Settings shared by the down, mid and up stages."""
    out_channels: int = 320
    num_layers: int = 1
    cross_attention: bool = True  # diffusers' CrossAttn*Block2D when True, plain *Block2D when False
    num_heads: int = 8
    transformer_layers: int = 1
    groups: int = 32
    eps: float = 1e-5
    act_fn: str = "silu"
    use_linear_projection: bool = False
    only_cross_attention: bool = False
    upcast_attention: bool = False

    def resnet(self, name, output_scale_factor=1.0):
        return ResnetBlock2D(out_channels=self.out_channels, groups=self.groups, eps=self.eps,
                             act_fn=self.act_fn, output_scale_factor=output_scale_factor, name=name, **self.kw)

    def attention(self, name):
        return Transformer2D(
            num_heads=self.num_heads, num_layers=self.transformer_layers, groups=self.groups,
            use_linear_projection=self.use_linear_projection, only_cross_attention=self.only_cross_attention,
            upcast_attention=self.upcast_attention, name=name, **self.kw)


class DownBlock2D(_Stage):
    """Resnets (+ transformers) then optional downsampling: -> (x [B, H', W', out], skips)."""
    add_downsample: bool = True
    downsample_padding: int = 1

    @nn.compact
    def __call__(self, x, temb, context):
        skips = []
        for j in range(self.num_layers):
            x = self.resnet(f"resnets_{j}")(x, temb)
            if self.cross_attention:
                x = self.attention(f"attentions_{j}")(x, context)
            skips.append(x)
        if self.add_downsample:
            x = Downsample2D(padding=self.downsample_padding, name="downsamplers_0", **self.kw)(x)
            skips.append(x)
        return x, skips


class UNetMidBlock2DCrossAttn(_Stage):
    """Resnet, transformer, resnet at the lowest resolution: [B, h, w, C] -> [B, h, w, C]."""
    output_scale_factor: float = 1.0

    @nn.compact
    def __call__(self, x, temb, context):
        x = self.resnet("resnets_0", self.output_scale_factor)(x, temb)
        x = self.attention("attentions_0")(x, context)
        return self.resnet("resnets_1", self.output_scale_factor)(x, temb)


class UpBlock2D(_Stage):
    """Resnets on [x, skip] concatenations (+ transformers), then optional upsampling to `size`."""
    add_upsample: bool = True

    @nn.compact
    def __call__(self, x, skips, temb, context, size=None):
        for j in range(self.num_layers):
            x = jnp.concatenate([x, skips[-1 - j]], axis=-1)
            x = self.resnet(f"resnets_{j}")(x, temb)
            if self.cross_attention:
                x = self.attention(f"attentions_{j}")(x, context)
        if self.add_upsample:
            size = size or (2 * x.shape[1], 2 * x.shape[2])
            x = Upsample2D(name="upsamplers_0", **self.kw)(x, size)
        return x

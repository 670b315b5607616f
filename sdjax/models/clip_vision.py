"""CLIP's vision tower and the two-tower CLIPModel with its projections, mirroring transformers' CLIPVisionModel and
CLIPModel (the scorer of CLIP score; the text tower is clip_text's).

Param tree: vision_model/{embeddings/{class_embedding, patch_embedding, position_embedding}, pre_layrnorm,
encoder/layers_i/..., post_layernorm}, text_model/... (clip_text), visual_projection, text_projection: the names of a
transformers CLIPModel checkpoint. The class embedding, a [D] parameter in PyTorch, is an Embed of one row here
(`weights/clip_model.py` reshapes it).
"""
import flax.linen as nn
import jax.numpy as jnp

from sdjax.errors import UnsupportedConfig
from sdjax.models import model_config
from sdjax.models.clip_text import CLIPEncoder, CLIPTextModel, CLIPTextTransformer


class CLIPVisionEmbeddings(nn.Module):
    """Patches (a strided conv without bias) after a learned class token, plus position embeddings:
    pixel_values [B, S, S, C] -> [B, 1 + (S / patch_size)², D]."""
    hidden_size: int
    image_size: int
    patch_size: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        p = self.patch_size
        patches = nn.Conv(self.hidden_size, (p, p), strides=(p, p), padding="VALID", use_bias=False,
                          name="patch_embedding", **kw)(pixel_values.astype(self.dtype))
        b = patches.shape[0]
        patches = patches.reshape(b, -1, self.hidden_size)  # row-major over the grid, as PyTorch's flatten(2)
        cls = nn.Embed(1, self.hidden_size, name="class_embedding", **kw)(jnp.zeros((b, 1), jnp.int32))
        n = (self.image_size // p) ** 2 + 1
        positions = nn.Embed(n, self.hidden_size, name="position_embedding", **kw)(jnp.arange(n)[None])
        return jnp.concatenate([cls, patches], axis=1) + positions


class CLIPVisionTransformer(nn.Module):
    """ViT: embeddings, pre-norm, encoder (not causal), the class token's state normalised; fields are transformers'
    CLIPVisionConfig keys. pixel_values [B, S, S, C] (S = image_size) -> pooled [B, D]."""
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @classmethod
    def from_config(cls, cfg, **overrides):
        """Build from a transformers CLIPVisionConfig dict; keys that do not change the forward pass (dropouts,
        init scales, projection_dim) are ignored."""
        return model_config.build(cls, cfg, overrides, only={"model_type": "clip_vision_model"}, unknown="ignore")

    def check_config(self):
        """UnsupportedConfig for options this implementation lacks."""
        model_config.check_activation("CLIPVisionModel", "hidden_act", self.hidden_act)
        if self.hidden_size % self.num_attention_heads:
            raise UnsupportedConfig(f"CLIPVisionModel: hidden_size = {self.hidden_size} is not a multiple of "
                                    f"num_attention_heads = {self.num_attention_heads}")
        if self.image_size % self.patch_size:
            raise UnsupportedConfig(f"CLIPVisionModel: image_size = {self.image_size} is not a multiple of "
                                    f"patch_size = {self.patch_size}")

    @nn.compact
    def __call__(self, pixel_values):
        if pixel_values.shape[1:] != (self.image_size, self.image_size, self.num_channels):
            raise ValueError(f"CLIPVisionModel: pixel_values of shape {pixel_values.shape[1:]}, expected "
                             f"{(self.image_size, self.image_size, self.num_channels)} (B, H, W, C)")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = CLIPVisionEmbeddings(self.hidden_size, self.image_size, self.patch_size, name="embeddings",
                                 **kw)(pixel_values)
        x = nn.LayerNorm(epsilon=self.layer_norm_eps, name="pre_layrnorm", **kw)(x)  # sic: transformers' name
        x = CLIPEncoder(self.num_hidden_layers, self.hidden_size, self.intermediate_size, self.num_attention_heads,
                        self.hidden_act, self.layer_norm_eps, causal=False, name="encoder", **kw)(x)[-1]
        return nn.LayerNorm(epsilon=self.layer_norm_eps, name="post_layernorm", **kw)(x[:, 0])


def text_transformer(cfg, **overrides):
    """The CLIPTextTransformer of a transformers CLIPTextConfig dict (checked as CLIPTextModel checks it)."""
    model = CLIPTextModel.from_config(cfg, **overrides)
    return CLIPTextTransformer(**{f: getattr(model, f) for f in CLIPTextTransformer.__dataclass_fields__
                                  if f not in ("parent", "name")})


class CLIPModel(nn.Module):
    """The two towers and their projections (no biases) into one embedding space of projection_dim."""
    text_model: CLIPTextTransformer
    vision_model: CLIPVisionTransformer
    projection_dim: int = 512

    @classmethod
    def from_config(cls, cfg, **overrides):
        """Build from a transformers CLIPConfig dict (config.json of a CLIPModel folder); overrides (dtype,
        param_dtype) go to both towers."""
        if cfg.get("model_type", "clip") != "clip":
            raise model_config.unsupported("CLIPModel", "model_type", cfg["model_type"], "'clip'")
        tower = lambda key: cfg.get(key) or cfg.get(key + "_dict") or {}  # noqa: E731 (transformers < 4.23: *_dict)
        return cls(text_transformer(tower("text_config"), **overrides),
                   CLIPVisionTransformer.from_config(tower("vision_config"), **overrides),
                   cfg.get("projection_dim", 512))

    def setup(self):
        dense = lambda name: nn.Dense(self.projection_dim, use_bias=False, name=name,  # noqa: E731
                                      dtype=self.vision_model.dtype, param_dtype=self.vision_model.param_dtype)
        self.visual_projection, self.text_projection = dense("visual_projection"), dense("text_projection")

    def image_embeds(self, pixel_values):
        """pixel_values [B, S, S, C] (normalised) -> unnormalised image embeddings [B, projection_dim]."""
        return self.visual_projection(self.vision_model(pixel_values))

    def text_embeds(self, input_ids):
        """input_ids [B, L] -> unnormalised text embeddings [B, projection_dim] (of the pooled end-of-text state)."""
        return self.text_projection(self.text_model(input_ids)["pooler_output"])

    def __call__(self, pixel_values, input_ids):
        """Both embeddings: ([B, P], [B, P])."""
        return self.image_embeds(pixel_values), self.text_embeds(input_ids)

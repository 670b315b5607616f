"""The full-size architectures of configs/models build the same parameters as diffusers / transformers."""
import math

import jax

from configs.models import sd15, sd21, sdxl
from sdjax.models import registry


def _reference_count(kind, cfg):
    """Parameters of the reference model for `cfg`, built without allocating (accelerate's empty weights)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    with init_empty_weights():
        if kind.startswith("text_encoder"):
            model = {"text_encoder": CLIPTextModel, "text_encoder_2": CLIPTextModelWithProjection}[kind](
                CLIPTextConfig(**cfg))
        else:
            model = {"unet": UNet2DConditionModel, "vae": AutoencoderKL}[kind](**cfg)
    return sum(p.numel() for p in model.parameters())


def _count(kind, cfg):
    shapes = registry.param_shapes(kind, registry.build(kind, cfg))
    return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))


def test_sd21_matches_the_reference():
    """SD 2.1 (derived from sd15.py and single-file import's table): U-Net and text tower as diffusers counts."""
    cfg = sd21.get_config().to_dict()
    counts = {kind: _count(kind, cfg[kind]) for kind in ("unet", "text_encoder")}
    assert counts == {kind: _reference_count(kind, cfg[kind]) for kind in ("unet", "text_encoder")}
    # SD 1.5's U-Net differs only in heads, context width and projections: the number everyone quotes
    assert _count("unet", sd15.get_config().unet.to_dict()) == 859_520_964


def test_sdxl_matches_the_reference():
    """SDXL base: U-Net (the 2.57 B everyone quotes) and the projected bigG tower as diffusers / transformers
    count them."""
    cfg = sdxl.get_config().to_dict()
    counts = {kind: _count(kind, cfg[kind]) for kind in ("unet", "text_encoder_2")}
    assert counts == {kind: _reference_count(kind, cfg[kind]) for kind in ("unet", "text_encoder_2")}
    assert counts["unet"] == 2_567_463_684

"""The full-size architectures of configs/models build the same parameters as diffusers / transformers."""
import math

import jax
import pytest

from configs.models import sd15, sd21
from sdjax.models import registry


def _reference_count(kind, cfg):
    """Parameters of the reference model for `cfg`, built without allocating (accelerate's empty weights)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    with init_empty_weights():
        if kind == "text_encoder":
            model = CLIPTextModel(CLIPTextConfig(**cfg))
        else:
            model = {"unet": UNet2DConditionModel, "vae": AutoencoderKL}[kind](**cfg)
    return sum(p.numel() for p in model.parameters())


def _count(kind, cfg):
    shapes = registry.param_shapes(kind, registry.build(kind, cfg))
    return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))


@pytest.mark.parametrize("name,get", [("sd15", sd15.get_config), ("sd21", sd21.get_config)])
def test_architecture_matches_the_reference(name, get):
    cfg = get().to_dict()
    kinds = ("unet",) if name == "sd15" else ("unet", "text_encoder")
    counts = {kind: _count(kind, cfg[kind]) for kind in kinds}
    assert counts == {kind: _reference_count(kind, cfg[kind]) for kind in kinds}
    if name == "sd15":  # the number everyone quotes
        assert counts["unet"] == 859_520_964

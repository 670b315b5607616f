"""Stable Diffusion 2.1 (768, v-prediction) architecture (diffusers config.json keys).

Prediction type, image size and upcast attention are single-file import's table (`single_file.VARIANTS`),
so the two cannot disagree."""
from configs.models import sd15
from sdjax.weights.single_file import VARIANTS


def get_config(variant="sd21"):
    """variant: "sd21" (768, v-prediction) or "sd21-base" (512, epsilon)."""
    family, prediction, size, upcast, inpainting = VARIANTS[variant]
    assert family == "sd2" and not inpainting, variant
    c = sd15.get_config()
    with c.unet.ignore_type():  # 8 heads everywhere -> 64-channel heads (5, 10, 20, 20 of them)
        c.unet.attention_head_dim = (5, 10, 20, 20)
    c.unet.update(sample_size=size // 8, cross_attention_dim=1024, use_linear_projection=True, upcast_attention=upcast)
    c.vae.sample_size = size
    # OpenCLIP ViT-H/14 text tower without its last layer (SD2 reads the penultimate one).
    c.text_encoder.update(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
        hidden_act="gelu", eos_token_id=2,
    )
    c.scheduler.prediction_type = prediction
    return c

"""Stable Diffusion 2.1 (768, v-prediction) architecture (diffusers config.json keys)."""
from configs import sd15


def get_config():
    c = sd15.get_config()
    c.unet.update(
        sample_size=96, attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024,
        use_linear_projection=True, upcast_attention=True,
    )
    c.vae.sample_size = 768
    # OpenCLIP ViT-H/14 text tower without its last layer (SD2 reads the penultimate one).
    c.text_encoder.update(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
        hidden_act="gelu", eos_token_id=2,
    )
    c.scheduler.prediction_type = "v_prediction"
    return c

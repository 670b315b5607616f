"""A tiny SDXL-shaped model for tests: configs/models/sdxl.py's layout (no attention at the top level, more
transformer layers below, two text towers, text_time embedding) at tiny.py's sizes."""
from configs.models import sdxl, tiny


def get_config():
    c = sdxl.get_config()
    small = tiny.get_config()
    with c.unet.ignore_type():
        c.unet.update(block_out_channels=(32, 64), attention_head_dim=(4, 8), transformer_layers_per_block=(1, 2),
                      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
    c.unet.update(sample_size=8, layers_per_block=1, norm_num_groups=8, cross_attention_dim=128,  # 64 + 64 wide
                  addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8)
    c.vae = small.vae
    c.vae.update(scaling_factor=0.13025, force_upcast=True)
    c.text_encoder = small.text_encoder
    c.text_encoder_2.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            projection_dim=32)
    return c

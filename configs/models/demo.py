"""The bundled demo model: a small latent diffusion model for 64x64 captioned shapes (about 4.8M params, 19 MB)."""
from configs.models import sd15


def get_config(vocab_size=640):
    c = sd15.get_config()
    c.vae.update(
        sample_size=64, block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        scaling_factor=1.0,  # replaced by 1 / std of the trained VAE's latents (as SD's 0.18215)
    )
    c.unet.update(
        sample_size=16, block_out_channels=(48, 96, 96), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=4, cross_attention_dim=128, norm_num_groups=16,
    )
    c.text_encoder.update(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
        bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
    )
    return c

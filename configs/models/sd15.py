"""Stable Diffusion 1.5 architecture (diffusers config.json keys)."""
import ml_collections


def get_config():
    return ml_collections.ConfigDict(dict(
        unet=dict(
            in_channels=4, out_channels=4, sample_size=64,
            block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            attention_head_dim=8, cross_attention_dim=768, norm_num_groups=32,
        ),
        vae=dict(
            in_channels=3, out_channels=3, latent_channels=4, sample_size=512,
            block_out_channels=(128, 256, 512, 512), layers_per_block=2,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            scaling_factor=0.18215,
        ),
        text_encoder=dict(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
            layer_norm_eps=1e-5, eos_token_id=2,
        ),
        scheduler=dict(
            num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            prediction_type="epsilon", steps_offset=1, set_alpha_to_one=False, clip_sample=False,
        ),
    ))

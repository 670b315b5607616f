"""Stable Diffusion XL 1.0 base architecture (diffusers config.json keys): a 3-level U-Net with no attention at the
top level and 1, 2, 10 transformer layers below, conditioned on the two text towers' penultimate states
concatenated (768 + 1280 = 2048 wide) and, through the text_time embedding, on the second tower's pooled
projection (1280) and six micro-conditioning numbers (6 x 256): 2816."""
from configs.models import sd15


def get_config():
    c = sd15.get_config()
    with c.unet.ignore_type():
        c.unet.update(
            block_out_channels=(320, 640, 1280), attention_head_dim=(5, 10, 20),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
    c.unet.update(
        sample_size=128, cross_attention_dim=2048, use_linear_projection=True, transformer_layers_per_block=(1, 2, 10),
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
    c.vae.update(sample_size=1024, scaling_factor=0.13025, force_upcast=True)  # its float16 activations overflow
    c.text_encoder_2 = dict(  # OpenCLIP ViT-bigG/14, all 32 layers (the pooled projection needs the last)
        vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
        max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5, eos_token_id=2, projection_dim=1280)
    c.scheduler.update(timestep_spacing="leading")  # diffusers' SDXL folders: EulerDiscreteScheduler
    return c

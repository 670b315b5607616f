"""The latent diffusion stage (config `stage = "ldm"`, the default): U-Net (+ text encoder) on frozen VAE latents."""

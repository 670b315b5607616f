"""Stage 1 of the demo model: its autoencoder (f = 4, 4 latent channels) on 64x64 captioned shapes."""
from configs.models import demo
from configs.train import vae_tiny as train_vae_tiny


def get_config():
    c = train_vae_tiny.get_config()
    c.model.vae = demo.get_config().vae
    c.data.update(image_size=64, random_flip=True, shapes=dict(num_train=20000, num_test=500, num_heldout=500, seed=0))
    c.batch_size = 16
    c.total_steps = 1500
    c.optimizer.update(learning_rate=1e-3, warmup_steps=50)
    c.disc_optimizer = c.optimizer.copy_and_resolve_references()
    # Flat shapes on black are reconstructed sharply by L1 alone; the GAN would only cost time here.
    c.loss.update(l1_weight=1.0, l2_weight=1.0, kl_weight=1e-6, disc_factor=0.0, disc_start=10 ** 9)
    c.checkpoint_every = 250
    c.log_every = 25
    return c

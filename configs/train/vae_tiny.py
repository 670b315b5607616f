"""The autoencoder stage: the tiny VAE (configs/models/tiny.py) + a small PatchGAN on 32x32 captioned shapes, CPU-sized.

python train.py --config=configs/train/vae_tiny.py --workdir=/tmp/vae --export_dir=/tmp/vae_out
(--export_dir gets vae/ in diffusers layout). Perceptual loss: --config.loss.perceptual_weight=1.0
--config.loss.lpips_weights=/path/lpips_vgg.pth,/path/vgg16.pth (the lpips package's lin weights +
torchvision's VGG16; nothing is downloaded).
"""
import ml_collections

from configs.models import tiny
from sdjax.data import input_pipeline


def get_config():
    c = ml_collections.ConfigDict()
    c.stage = "autoencoder"
    c.model = ml_collections.ConfigDict()
    c.model.vae = tiny.get_config().vae      # diffusers AutoencoderKL keys
    c.model.vae.sample_size = 32
    c.model.discriminator = ml_collections.ConfigDict(dict(input_nc=3, ndf=16, n_layers=2, norm_num_groups=8))
    c.pretrained = ""                        # a diffusers folder whose vae/ to fine-tune instead of `model.vae`
    c.tokenizer = ""                         # the pipeline tokenizes captions; unused by this stage
    c.data = input_pipeline.default_config()
    c.data.update(source="shapes", image_size=32, random_flip=True, num_threads=2,
                  shapes=dict(num_train=5000, num_test=200, num_heldout=200, seed=0))
    c.batch_size = 16
    c.total_steps = 2000
    c.seed = 0
    # The LDM recipe: Adam(0.5, 0.9) for both players, no decay.
    c.optimizer = ml_collections.ConfigDict(dict(
        learning_rate=2e-4, warmup_steps=20, schedule="constant", b1=0.5, b2=0.9, eps=1e-8,
        weight_decay=0.0, grad_clip_norm=0.0, grad_accum_steps=1))
    c.disc_optimizer = c.optimizer.copy_and_resolve_references()
    c.ema_decay = 0.0                        # export writes params as trained
    c.loss = ml_collections.ConfigDict(dict(
        l1_weight=1.0, l2_weight=0.0, kl_weight=1e-6, sample_posterior=True,
        perceptual_weight=0.0, lpips_weights="",  # comma-separated weight files
        disc_weight=0.5, disc_factor=1.0, disc_start=1000))
    c.precision = ml_collections.ConfigDict(dict(compute_dtype="float32"))
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, min_shard_size=2 ** 14))
    c.checkpoint_every = 500
    c.keep_checkpoints = 3
    c.log_every = 10
    c.max_bad_steps = 20
    return c

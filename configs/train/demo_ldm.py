"""Stage 2 of the demo model: U-Net and text tower from scratch over the frozen stage-1 autoencoder.

`pretrained` is the folder `python scripts/build_demo.py` assembles (trained VAE, random U-Net and
text tower from configs/models/demo.py, the shapes BPE tokenizer).
"""
from configs.train import tiny as train_tiny


def get_config():
    c = train_tiny.get_config()
    c.pretrained = "/tmp/sdjax_demo/init"
    c.train_text_encoder = True
    c.data.update(image_size=64, random_flip=False,  # a flip would contradict "on the left"
                  shapes=dict(num_train=20000, num_test=500, num_heldout=500, seed=0))
    c.batch_size = 32
    c.total_steps = 6000
    c.optimizer.update(learning_rate=1e-3, warmup_steps=200, schedule="cosine", weight_decay=1e-2)
    c.ema_decay = 0.999
    c.ema_warmup = True  # decay min(0.999, (1 + n) / (10 + n)): the average forgets the random init
    c.loss.update(prediction_type="epsilon", min_snr_gamma=5.0, caption_dropout=0.1, latent="mean")
    c.checkpoint_every = 250
    c.log_every = 25
    return c

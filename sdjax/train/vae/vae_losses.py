"""The autoencoder-stage losses (LDM / taming-transformers recipe) as plain functions.

Reductions follow the reference (`LPIPSWithDiscriminator`): reconstruction and KL terms are summed
over each example's pixels / latent entries and averaged over the batch, so the usual weights
(kl_weight 1e-6, disc_weight 0.5) keep their meaning; GAN terms are means over patches.
"""
import jax
import jax.numpy as jnp



def reconstruction_loss(images, recon, l1_weight=1.0, l2_weight=0.0, perceptual=None, perceptual_weight=0.0):
    """images, recon: [B, H, W, C]; perceptual: [B] LPIPS or None -> scalar.

    Per pixel l1_weight |x - x'| + l2_weight (x - x')^2 + perceptual_weight * LPIPS (the
    per-image LPIPS added at every pixel, as the reference does), summed per image, mean over B.
    """
    err = recon.astype(jnp.float32) - images.astype(jnp.float32)
    per_pixel = l1_weight * jnp.abs(err) + l2_weight * jnp.square(err)
    if perceptual is not None and perceptual_weight:
        per_pixel = per_pixel + perceptual_weight * perceptual.astype(jnp.float32).reshape(-1, 1, 1, 1)
    return jnp.sum(per_pixel) / images.shape[0]


def kl_loss(posterior):
    """KL(q(z|x) || N(0, I)) summed over latent entries, mean over the batch: scalar."""
    return jnp.mean(posterior.kl())


def hinge_d_loss(logits_real, logits_fake):
    """Discriminator hinge loss: 0.5 (mean relu(1 - D(x)) + mean relu(1 + D(x'))); logits [B, h, w, 1]."""
    return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def generator_loss(logits_fake):
    """Generator's adversarial loss: -mean D(x'); logits [B, h, w, 1] -> scalar."""
    return -jnp.mean(logits_fake)


def adaptive_weight(rec_grad, g_grad, disc_weight, eps=1e-4, max_weight=1e4):
    """Balance of the GAN term (Esser et al. 2021): disc_weight * clip(|grad rec| / (|grad G| + eps), 0, max).

    rec_grad, g_grad: gradients of the reconstruction and generator losses with respect to the
    decoder's last layer (same shape). No gradient flows through the weight.
    """
    ratio = jnp.linalg.norm(rec_grad.ravel()) / (jnp.linalg.norm(g_grad.ravel()) + eps)
    return jax.lax.stop_gradient(jnp.clip(ratio, 0.0, max_weight) * disc_weight)


def disc_factor(step, start, factor=1.0):
    """The GAN terms' factor: 0 before step `start`, then `factor`; step: int scalar array."""
    return jnp.where(step >= start, factor, 0.0).astype(jnp.float32)

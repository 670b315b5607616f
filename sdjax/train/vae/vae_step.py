"""One training step of the KL autoencoder with its PatchGAN discriminator: pure, jitted like the LDM step (sdjax.train.ldm.ldm_step).

Both players update from the same forward pass (the discriminator sees the reconstructions made
with the autoencoder params before this step's update).
"""

import jax
import jax.numpy as jnp
import optax

from sdjax.train.optim import guarded_update
from sdjax.train.vae import vae_losses

# Path of the decoder's last layer in the VAE params: the adaptive weight is measured there.
LAST_LAYER = ("decoder", "conv_out", "kernel")


def _last_layer(vae_grads):
    g = vae_grads
    for k in LAST_LAYER:
        g = g[k]
    return g


def make_generator_loss(modules, loss):
    """f(vae_params, d_params, lpips_params, images [B,H,W,3], key) -> ((nll, g_loss), aux).

    nll = reconstruction + kl_weight * KL (the loss the GAN term is balanced against); aux holds the
    reconstructions and the separate terms for the metrics.
    """
    vae, disc, lpips = modules["vae"], modules["discriminator"], modules.get("lpips")
    use_lpips = lpips is not None and loss.perceptual_weight > 0

    def fn(vae_params, d_params, lpips_params, images, key):
        posterior = vae.apply({"params": vae_params}, images, method="encode")
        z = posterior.sample(key) if loss.sample_posterior else posterior.mode()
        recon = vae.apply({"params": vae_params}, z, method="decode").astype(jnp.float32)
        perceptual = lpips.apply({"params": lpips_params}, images, recon) if use_lpips else None
        rec = vae_losses.reconstruction_loss(images, recon, loss.l1_weight, loss.l2_weight,
                                            perceptual, loss.perceptual_weight)
        kl = vae_losses.kl_loss(posterior)
        g = vae_losses.generator_loss(disc.apply({"params": d_params}, recon))
        aux = dict(recon=recon, rec_loss=rec, kl_loss=kl,
                   perceptual=jnp.mean(perceptual) if use_lpips else jnp.zeros(()))
        return (rec + loss.kl_weight * kl, g), aux

    return fn


def autoencoder_grads(gen_loss, params, frozen, images, key, factor, disc_weight):
    """(vae grads, reconstructions, metrics) of nll + factor * d_weight * g_loss, d_weight the adaptive weight.

    One forward, one backward per term (the G backward is skipped while factor is 0).
    """
    lpips_params = frozen.get("lpips")
    (nll, g), vjp_fn, aux = jax.vjp(
        lambda p: gen_loss(p, params["discriminator"], lpips_params, images, key), params["vae"], has_aux=True)
    one, zero = jnp.ones((), nll.dtype), jnp.zeros((), nll.dtype)
    nll_grads = vjp_fn((one, zero))[0]

    def with_gan():
        g_grads = vjp_fn((zero, one))[0]
        w = vae_losses.adaptive_weight(_last_layer(nll_grads), _last_layer(g_grads), disc_weight)
        return w, g_grads

    d_weight, g_grads = jax.lax.cond(factor > 0, with_gan,
                                     lambda: (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, nll_grads)))
    grads = jax.tree.map(lambda a, b: a + (factor * d_weight).astype(a.dtype) * b, nll_grads, g_grads)
    metrics = dict(loss=nll + factor * d_weight * g, nll_loss=nll, g_loss=g, d_weight=d_weight,
                   rec_loss=aux["rec_loss"], kl_loss=aux["kl_loss"], perceptual=aux["perceptual"])
    return grads, aux["recon"], metrics


def discriminator_grads(disc, d_params, images, recon, factor):
    """(grads, metrics) of factor * hinge loss on real images and (constant) reconstructions."""
    def fn(p):
        logits = disc.apply({"params": p}, jnp.concatenate([images.astype(jnp.float32), recon]))
        real, fake = jnp.split(logits, 2)
        return factor * vae_losses.hinge_d_loss(real, fake), (jnp.mean(real), jnp.mean(fake))

    (d_loss, (real, fake)), grads = jax.value_and_grad(fn, has_aux=True)(d_params)
    return grads, dict(d_loss=d_loss, logits_real=real, logits_fake=fake)


def make_train_step(modules, config, tx, schedule):
    """train_step(state, frozen, batch) -> (state, metrics), the LDM step's signature and bad-step rules.

    state.params: {"vae", "discriminator"}; frozen: {"lpips": params} or {}; batch: {"images"
    [B, H, W, 3] in [-1, 1], ...} (other fields unused). A step whose losses or gradients are not
    finite leaves params, optimizer and EMA as they were and counts itself in bad_steps.
    """
    loss = config.loss
    gen_loss = make_generator_loss(modules, loss)
    disc = modules["discriminator"]

    def train_step(state, frozen, batch):
        images = batch["images"]
        key = jax.random.fold_in(state.rng, state.step)
        factor = vae_losses.disc_factor(state.step, loss.disc_start, loss.disc_factor)
        vae_grads, recon, metrics = autoencoder_grads(gen_loss, state.params, frozen, images, key, factor,
                                                      loss.disc_weight)
        d_grads, d_metrics = discriminator_grads(disc, state.params["discriminator"], images,
                                                 jax.lax.stop_gradient(recon), factor)
        grads = {"vae": vae_grads, "discriminator": d_grads}
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(d_metrics["d_loss"]) & jnp.isfinite(grad_norm)
        new = guarded_update(state, grads, finite, tx, config)
        metrics = dict(metrics, **d_metrics, disc_factor=factor, grad_norm=grad_norm, finite=finite,
                       bad_steps=new.bad_steps, total_bad_steps=new.total_bad_steps,
                       learning_rate=schedule(state.step - state.total_bad_steps))
        return new, metrics

    return train_step

"""One training step of the latent diffusion model: pure, jitted over the mesh with donated state."""
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding

from sdjax.diffusion import schedules
from sdjax.models.autoencoder import to_latents
from sdjax.models.clip_text import sdxl_text
from sdjax.train.ldm import ldm_losses as losses
from sdjax.train.optim import guarded_update
from sdjax.train.sharding import BATCH


def example_draws(key, latent_shape, num_timesteps, loss):
    """Randomness of one example from its own key: t, eps [h, w, c], posterior noise, caption drop."""
    kt, ke, ko, kp, kd = jax.random.split(key, 5)
    eps = jax.random.normal(ke, latent_shape)
    if loss.offset_noise > 0:
        eps = eps + losses.offset_noise(ko, latent_shape, loss.offset_noise)
    return dict(t=jax.random.randint(kt, (), 0, num_timesteps), eps=eps,
                posterior=jax.random.normal(kp, latent_shape),
                drop=jax.random.uniform(kd) < loss.caption_dropout)


def latents(vae, vae_params, images, noise, sample):
    """Images [b, H, W, 3] in [-1, 1] -> scaled latents [b, h, w, c] (posterior mean, or a draw with `noise`)."""
    return jax.lax.stop_gradient(to_latents(vae, vae_params, images, noise if sample else None))


def latent_shape(vae, vae_params, images):
    """Latent shape [h, w, c] of images [b, H, W, 3], without computing anything."""
    post = jax.eval_shape(lambda p, x: vae.apply({"params": p}, x, method="encode"), vae_params, images)
    return post.mean.shape[1:]


def conditioning(modules, p, ids, micro):
    """The U-Net's conditioning keyword arguments from token ids {batch key: [b, L]}: the text encoder's last
    states; SDXL (text_encoder_2): both towers' penultimate states, the pooled text, and the time ids of each
    example's original size and crop, with the training size as the target size."""
    if "text_encoder_2" not in modules:
        return {"encoder_hidden_states": modules["text_encoder"].apply(
            {"params": p["text_encoder"]}, ids["input_ids"])["last_hidden_state"]}
    outputs = [modules[k].apply({"params": p[k]}, ids[key])
               for k, key in (("text_encoder", "input_ids"), ("text_encoder_2", "input_ids_2"))]
    text, pooled = sdxl_text(outputs)
    images = micro["images"]
    target = jnp.broadcast_to(jnp.asarray(images.shape[1:3], jnp.float32), (images.shape[0], 2))
    time_ids = jnp.concatenate([micro["original_size"].astype(jnp.float32),
                                micro["crop_top_left"].astype(jnp.float32), target], -1)
    return dict(encoder_hidden_states=text, text_embeds=pooled, time_ids=time_ids)


def make_loss_fn(modules, config, abar_table, empty_ids):
    """loss(trainable, frozen, micro) -> scalar; micro: {"images" [b,H,W,3], "input_ids" [b,L] (SDXL: also
    "input_ids_2", "original_size", "crop_top_left" [b,2]), "key" [b,2]}; empty_ids: {ids key: the empty
    caption's ids [L]}."""
    loss_cfg = config.loss
    unet, vae = modules["unet"], modules["vae"]
    num_t = abar_table.shape[0]

    def loss_fn(trainable, frozen, micro):
        p = {**frozen, **trainable}
        shape = latent_shape(vae, p["vae"], micro["images"])
        d = jax.vmap(lambda k: example_draws(k, shape, num_t, loss_cfg))(micro["key"])
        z = latents(vae, p["vae"], micro["images"], d["posterior"], loss_cfg.latent == "sample")
        ids = {k: losses.drop_captions(d["drop"], micro[k], empty) for k, empty in empty_ids.items()}
        cond = conditioning(modules, p, ids, micro)
        abar = abar_table[d["t"]]
        alpha, sigma = (losses.per_example(jnp.sqrt(a), z) for a in (abar, 1 - abar))
        x_t = schedules.add_noise(z, d["eps"], alpha, sigma)
        prediction = unet.apply({"params": p["unet"]}, x_t, d["t"], **cond)
        tgt = schedules.target(z, d["eps"], alpha, sigma, loss_cfg.prediction_type)
        weights = losses.min_snr_weight(schedules.snr(abar), loss_cfg.min_snr_gamma, loss_cfg.prediction_type)
        return losses.weighted_mse(prediction, tgt, weights)

    return loss_fn


def accumulate(grad_fn, params, frozen, batch, k, constrain):
    """(mean loss, mean grads) over k equal micro-batches of `batch` (rows j, j+k, ... form micro-batch j)."""
    if k == 1:
        return grad_fn(params, frozen, batch)
    micro = jax.tree.map(lambda x: jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1), batch)

    def body(carry, m):
        loss, grads = grad_fn(params, frozen, constrain(m))
        return jax.tree.map(jnp.add, carry, (loss, grads)), None

    zero = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
    (loss, grads), _ = jax.lax.scan(body, zero, micro)
    return jax.tree.map(lambda x: x / k, (loss, grads))


def make_train_step(modules, config, tx, schedule, abar_table, empty_ids, mesh=None):
    """train_step(state, frozen, batch) -> (state, metrics).

    frozen: {component: params} not trained (vae, text encoders unless trained); batch: the input pipeline's
    (`ldm_stage.batch_shapes`). A step whose loss or gradients are not finite leaves params,
    optimizer and EMA as they were and counts itself in bad_steps / total_bad_steps.
    """
    empty_ids = {k: jnp.asarray(v) for k, v in empty_ids.items()}
    grad_fn = jax.value_and_grad(make_loss_fn(modules, config, jnp.asarray(abar_table), empty_ids))
    k = config.optimizer.grad_accum_steps
    constrain = ((lambda m: jax.lax.with_sharding_constraint(m, NamedSharding(mesh, BATCH)))
                 if mesh is not None else (lambda m: m))

    def train_step(state, frozen, batch):
        key = jax.random.fold_in(state.rng, state.step)
        n = batch["images"].shape[0]
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(n))
        loss, grads = accumulate(grad_fn, state.params, frozen, {**batch, "key": keys}, k, constrain)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new = guarded_update(state, grads, finite, tx, config)
        metrics = dict(loss=loss, grad_norm=grad_norm, finite=finite, bad_steps=new.bad_steps,
                       total_bad_steps=new.total_bad_steps,
                       learning_rate=schedule(state.step - state.total_bad_steps))
        return new, metrics

    return train_step


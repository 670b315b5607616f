"""One training step of the latent diffusion model: pure, jitted over the mesh with donated state."""
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding

from sdjax.diffusion import schedules
from sdjax.models.autoencoder import to_latents
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


def make_loss_fn(modules, config, abar_table, empty_ids):
    """loss(trainable, frozen, micro) -> scalar; micro: {"images" [b,H,W,3], "input_ids" [b,L], "key" [b,2]}."""
    loss_cfg = config.loss
    unet, vae, text = modules["unet"], modules["vae"], modules["text_encoder"]
    num_t = abar_table.shape[0]

    def loss_fn(trainable, frozen, micro):
        p = {**frozen, **trainable}
        shape = latent_shape(vae, p["vae"], micro["images"])
        d = jax.vmap(lambda k: example_draws(k, shape, num_t, loss_cfg))(micro["key"])
        z = latents(vae, p["vae"], micro["images"], d["posterior"], loss_cfg.latent == "sample")
        ids = losses.drop_captions(d["drop"], micro["input_ids"], empty_ids)
        context = text.apply({"params": p["text_encoder"]}, ids)["last_hidden_state"]
        abar = abar_table[d["t"]]
        alpha, sigma = (losses.per_example(jnp.sqrt(a), z) for a in (abar, 1 - abar))
        x_t = schedules.add_noise(z, d["eps"], alpha, sigma)
        prediction = unet.apply({"params": p["unet"]}, x_t, d["t"], context)
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

    frozen: {component: params} not trained (vae, text encoder unless trained); batch: {"images"
    [B, H, W, 3], "input_ids" [B, L]}. A step whose loss or gradients are not finite leaves params,
    optimizer and EMA as they were and counts itself in bad_steps / total_bad_steps.
    """
    grad_fn = jax.value_and_grad(make_loss_fn(modules, config, jnp.asarray(abar_table), jnp.asarray(empty_ids)))
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


"""One training step of the latent diffusion model: pure, jitted over the mesh with donated state."""
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding

from sdjax.diffusion import schedules
from sdjax.models.autoencoder import scaled_latents, to_latents
from sdjax.models.clip_text import text_conditioning
from sdjax.train.ldm import ldm_losses as losses, lora_params
from sdjax.train.optim import guarded_update
from sdjax.train.sharding import BATCH


def example_draws(key, latent_shape, num_timesteps, loss):
    """Randomness of one example from its own key: t, eps [h, w, c], posterior noise, caption drop; the key of its
    LoRA dropout (fold_in(key, 5): split(key, 5)[i] is fold_in(key, i))."""
    kt, ke, ko, kp, kd = jax.random.split(key, 5)
    eps = jax.random.normal(ke, latent_shape)
    if loss.offset_noise > 0:
        eps = eps + losses.offset_noise(ko, latent_shape, loss.offset_noise)
    return dict(t=jax.random.randint(kt, (), 0, num_timesteps), eps=eps,
                posterior=jax.random.normal(kp, latent_shape),
                drop=jax.random.uniform(kd) < loss.caption_dropout, adapter_dropout=jax.random.fold_in(key, 5))


def latents(vae, vae_params, images, noise, sample):
    """Images [b, H, W, 3] in [-1, 1] -> scaled latents [b, h, w, c] (posterior mean, or a draw with `noise`)."""
    return jax.lax.stop_gradient(to_latents(vae, vae_params, images, noise if sample else None))


def latent_shape(vae, vae_params, images):
    """Latent shape [h, w, c] of images [b, H, W, 3], without computing anything."""
    post = jax.eval_shape(lambda p, x: vae.apply({"params": p}, x, method="encode"), vae_params, images)
    return post.mean.shape[1:]


def with_time_ids(cond, micro, size):
    """SDXL's (text_embeds in `cond`): add the time ids of each example's original size and crop, with the
    training size `size` (h, w) as the target size."""
    if "text_embeds" not in cond:
        return cond
    n = micro["original_size"].shape[0]
    target = jnp.broadcast_to(jnp.asarray(size, jnp.float32), (n, 2))
    time_ids = jnp.concatenate([micro["original_size"].astype(jnp.float32),
                                micro["crop_top_left"].astype(jnp.float32), target], -1)
    return {**cond, "time_ids": time_ids}


def conditioning(modules, p, micro, drop, empty_ids, empty_text=None, zero_dropped=False):
    """The U-Net's conditioning keyword arguments of a micro-batch (`make_loss_fn`'s), the captions where `drop`
    [b] bool is set dropped: replaced by the empty caption (its ids through the towers; from the latent cache, its
    cached text `empty_text`) or, `zero_dropped`, by zero text and pooled text. SDXL: with the time ids of each
    example's size and crop, the training size (the images', or the cached latents' times the VAE's factor) last."""
    cached = "latent_mean" in micro
    if cached:
        text = {k: micro[k] for k in empty_text}
        factor = 2 ** (len(modules["vae"].block_out_channels) - 1)  # the image size the latents are of
        size = tuple(n * factor for n in micro["latent_mean"].shape[1:3])
    else:  # dropped captions' ids become the empty caption's, unless their text is zeroed below
        ids = {k: micro[k] if zero_dropped else losses.drop_captions(drop, micro[k], empty)
               for k, empty in empty_ids.items()}
        text, size = text_conditioning(modules, p, ids), micro["images"].shape[1:3]
    if zero_dropped:
        text = _dropped(drop, text, dict.fromkeys(text, 0.0))
    elif cached:
        text = _dropped(drop, text, empty_text)
    return with_time_ids(text, micro, size)


def _dropped(drop, text, empty):
    """Text conditioning with the rows where `drop` [b] bool replaced by `empty`'s (arrays, or numbers)."""
    return {k: jnp.where(drop.reshape(-1, *[1] * (v.ndim - 1)), empty[k], v) for k, v in text.items()}


def unet_prediction(modules, p, x_t, t, cond, micro):
    """The U-Net's prediction for x_t [b, h, w, c] at t [b] with `cond` (its conditioning keywords): the default
    `predict` of make_loss_fn (a ControlNet's adds its residuals: sdjax.train.ldm.controlnet_stage)."""
    return modules["unet"].apply({"params": p["unet"]}, x_t, t, **cond)


def make_loss_fn(modules, config, abar_table, empty_ids, empty_text=None, zero_dropped=False, model_params=None,
                 predict=unet_prediction):
    """loss(trainable, frozen, micro) -> scalar; micro: {"images" [b,H,W,3], "input_ids" [b,L] (SDXL: also
    "input_ids_2", "original_size", "crop_top_left" [b,2]), "key" [b,2]}; empty_ids: {ids key: the empty
    caption's ids [L]}. From the latent cache (sdjax.data.cache), micro has "latent_mean" / "latent_std"
    [b,h,w,c] and the text conditioning in place of images and ids, and empty_text is the empty caption's.
    zero_dropped: dropped captions condition on zero text and pooled text instead of the empty caption's (an
    SDXL model with force_zeros_for_empty_prompt samples its unconditional branch from zeros). model_params: the
    models' {component: params} from the run's, frozen and trained (textual_inversion.model_params; default: those).
    predict(modules, params, x_t, t, cond, micro) -> the prediction (`unet_prediction`'s signature)."""
    loss_cfg = config.loss
    vae = modules["vae"]
    num_t = abar_table.shape[0]

    def loss_fn(trainable, frozen, micro):
        p = (model_params or dict)({**frozen, **trainable})
        cached = "latent_mean" in micro
        shape = micro["latent_mean"].shape[1:] if cached else latent_shape(vae, p["vae"], micro["images"])
        d = jax.vmap(lambda k: example_draws(k, shape, num_t, loss_cfg))(micro["key"])
        mods, p = lora_params.adapted(config, modules, p, d["adapter_dropout"])
        if cached:
            noise = d["posterior"] if loss_cfg.latent == "sample" else None
            z = scaled_latents(vae, micro["latent_mean"], micro["latent_std"], noise)
        else:
            z = latents(vae, p["vae"], micro["images"], d["posterior"], loss_cfg.latent == "sample")
        cond = conditioning(mods, p, micro, d["drop"], empty_ids, empty_text, zero_dropped)
        abar = abar_table[d["t"]]
        alpha, sigma = (losses.per_example(jnp.sqrt(a), z) for a in (abar, 1 - abar))
        x_t = schedules.add_noise(z, d["eps"], alpha, sigma)
        prediction = predict(mods, p, x_t, d["t"], cond, micro)
        tgt = schedules.target(z, d["eps"], alpha, sigma, loss_cfg.prediction_type)
        weights = losses.min_snr_weight(schedules.snr(abar), loss_cfg.min_snr_gamma, loss_cfg.prediction_type)
        if "class_example" in micro:  # DreamBooth's prior preservation (sdjax.train.ldm.dreambooth)
            return losses.prior_preservation_mse(prediction, tgt, weights, micro["class_example"],
                                                 config.dreambooth.prior_loss_weight)
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


def make_train_step(modules, config, tx, schedule, abar_table, empty_ids, mesh=None, empty_text=None,
                    zero_dropped=False, model_params=None, predict=unet_prediction):
    """train_step(state, frozen, batch) -> (state, metrics).

    frozen: {component: params} not trained (vae, text encoders unless trained); batch: the input pipeline's
    (`ldm_stage.batch_shapes`); empty_ids, empty_text, zero_dropped: what caption dropout puts in, model_params:
    the models' params from the run's, predict: the model's prediction (`make_loss_fn`). A step whose loss or
    gradients are not finite leaves params, optimizer and EMA as they were and counts itself in bad_steps /
    total_bad_steps.
    """
    empty_ids = {k: jnp.asarray(v) for k, v in empty_ids.items()}
    empty_text = None if empty_text is None else {k: jnp.asarray(v) for k, v in empty_text.items()}
    grad_fn = jax.value_and_grad(make_loss_fn(modules, config, jnp.asarray(abar_table), empty_ids, empty_text,
                                              zero_dropped, model_params, predict))
    k = config.optimizer.grad_accum_steps
    constrain = ((lambda m: jax.lax.with_sharding_constraint(m, NamedSharding(mesh, BATCH)))
                 if mesh is not None else (lambda m: m))

    def train_step(state, frozen, batch):
        key = jax.random.fold_in(state.rng, state.step)
        n = jax.tree.leaves(batch)[0].shape[0]
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


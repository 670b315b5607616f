"""Shared by the sampler tests: a closed-form fake model, diffusers' scheduler loop with injected noise, and ours.

Everything works on NHWC arrays: the fake model and the samplers are elementwise, so diffusers'
schedulers run on NHWC tensors unchanged and no transposes are needed.

    ref = run_diffusers(scheduler, x, noises, randn_module="diffusers.schedulers.scheduling_ddpm")
    ours = run_ours(SAMPLERS["ddpm"], plan, x, noises)
    # ref, ours: [S, B, h, w, c] float32 numpy: x after each iteration
"""
import contextlib
import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import torch

from sdjax.diffusion.plan import bind

# The SD 1.x scheduler_config.json (PNDM), also what pipelines pass to other schedulers' from_config.
SD_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 steps_offset=1, set_alpha_to_one=False, clip_sample=False, skip_prk_steps=True,
                 timestep_spacing="leading", prediction_type="epsilon")


def fake_model_torch(x, t):
    """Deterministic stand-in for a U-Net: elementwise in x, depends on the timestep t."""
    return 0.3 * torch.tanh(x) + 0.01 * float(t) / 1000


def fake_model_jax(x, t):
    """fake_model_torch in jnp (t may be traced)."""
    return 0.3 * jnp.tanh(x) + 0.01 * t / 1000


def test_inputs(seed, num_iters, shape=(2, 4, 4, 3)):
    """(x [B,h,w,c], noises [S,B,h,w,c]) float32 unit normals."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape, dtype=np.float32),
            rng.standard_normal((num_iters,) + shape, dtype=np.float32))


test_inputs.__test__ = False  # not a test despite its name


@contextlib.contextmanager
def injected_noise(module_name, box):
    """Within the block, `randn_tensor` in that diffusers module returns box["noise"] (a torch tensor)."""
    module = importlib.import_module(module_name)
    original = module.randn_tensor
    module.randn_tensor = lambda shape, **kwargs: box["noise"].reshape(shape).clone()
    try:
        yield
    finally:
        module.randn_tensor = original


def run_diffusers(scheduler, x, noises=None, randn_module=None, start=0, step_kwargs=None):
    """diffusers' loop over scheduler.timesteps[start:] (after set_timesteps) -> [S,...] x after each step."""
    box, out = {}, []
    sample = torch.from_numpy(x)
    guard = injected_noise(randn_module, box) if randn_module else contextlib.nullcontext()
    with guard, torch.no_grad():
        for i, t in enumerate(scheduler.timesteps[start:]):
            if noises is not None:
                box["noise"] = torch.from_numpy(noises[i])
            x_in = scheduler.scale_model_input(sample, t)
            model_out = fake_model_torch(x_in, t)
            sample = scheduler.step(model_out, t, sample, **(step_kwargs or {})).prev_sample
            out.append(sample.numpy().copy())
    return np.stack(out)


@functools.lru_cache(maxsize=None)
def _runner(sampler, options):
    """Jitted (x, steps, timesteps, noises) -> [S,...] trajectory of `sampler` with static options (a sorted tuple);
    one per sampler and options, so cases of equal shapes share a compile."""
    step_fn = bind(sampler, dict(options))

    @jax.jit
    def run(x, steps, timesteps, noises):
        def body(state, xs):
            step, t, noise = xs
            x_in = sampler.model_input(state, step)
            state = step_fn(state, fake_model_jax(x_in, t), step, noise)
            return state, state["x"]
        return jax.lax.scan(body, sampler.init(x, steps), (steps, timesteps, noises))[1]

    return run


def run_ours(sampler, plan, x, noises=None):
    """Our sampler under jit + lax.scan, one fake-model call per iteration -> [S,...] x after each iteration."""
    n = len(plan.timesteps)
    noises = np.zeros((n,) + x.shape, np.float32) if noises is None else noises[:n]
    run = _runner(sampler, tuple(sorted(plan.options.items())))
    return np.asarray(run(jnp.asarray(x), plan.steps, plan.timesteps, noises))

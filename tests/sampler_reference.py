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


def assert_noise_levels(scheduler, plan):
    """The plan's noise levels are the scheduler's add_noise at each of its timesteps (begin index set to the
    iteration, as pipelines do: the timesteps of two-stage samplers repeat)."""
    assert len(plan.timesteps) == len(scheduler.timesteps) and plan.order == scheduler.order
    x0, eps = test_inputs(1, 1)
    for i, t in enumerate(scheduler.timesteps):
        scheduler.set_begin_index(i)
        ref = scheduler.add_noise(torch.from_numpy(x0), torch.from_numpy(eps[0]), t[None]).numpy()
        np.testing.assert_allclose(plan.noise_a[i] * x0 + plan.noise_b[i] * eps[0], ref, rtol=1e-6, atol=1e-6)


def img2img_start(scheduler, plan, start, seed=2):
    """(x, noises) of diffusers' img2img from iteration `start` (set_begin_index, as pipelines do): x is the image
    noised to the sliced `plan`'s first level, checked against the scheduler's add_noise at timesteps[start]."""
    scheduler.set_begin_index(start)
    x0, noises = test_inputs(seed, len(plan.timesteps) + 1)
    x_ref = scheduler.add_noise(torch.from_numpy(x0), torch.from_numpy(noises[-1]), scheduler.timesteps[start:start + 1])
    x = plan.noise_a[0] * x0 + plan.noise_b[0] * noises[-1]
    np.testing.assert_allclose(x, x_ref.numpy(), rtol=0, atol=1e-5)
    return x, noises

"""Images/s of one training step of the SD 1.5 U-Net (256x256 images = 32x32 latents, batch 1), AdamW.

sdjax (jit, donated params + optimizer state) vs diffusers' UNet2DConditionModel in PyTorch, in fp32
and with bf16 compute (fp32 master weights: flax dtype=bf16 / torch.autocast). Random weights;
each (implementation, dtype) runs in its own process so memory is not shared.
    python bench/train_step.py [--steps 3] [--impls sdjax,torch] [--dtypes float32,bfloat16] [--threads 2]
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LATENT, TEXT = (1, 32, 32, 4), (1, 77, 768)
ADAMW = dict(lr=1e-5, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-2)


def inputs(seed=0):
    """Noisy latents, timesteps, text states and target noise (NHWC), numpy float32."""
    import numpy as np
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(LATENT, np.float32), np.array([500], np.int32),
            rng.standard_normal(TEXT, np.float32), rng.standard_normal(LATENT, np.float32))


def sdjax_steps(dtype, steps):
    """(compile + first step seconds, [seconds of each later step])."""
    import jax
    import jax.numpy as jnp
    import ml_collections
    import numpy as np
    import optax
    from configs import sd15
    from sdjax.models import registry
    from sdjax.train import losses
    from sdjax.train.optim import make_optimizer
    unet = registry.build("unet", sd15.get_config().unet.to_dict(), dtype=jnp.dtype(dtype))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape, np.float32) * 0.02),
                          registry.param_shapes("unet", unet))
    opt = ml_collections.ConfigDict(dict(learning_rate=ADAMW["lr"], warmup_steps=0, schedule="constant",
                                         b1=ADAMW["b1"], b2=ADAMW["b2"], eps=ADAMW["eps"],
                                         weight_decay=ADAMW["weight_decay"], grad_clip_norm=0.0))
    tx, _ = make_optimizer(opt, 1)

    def step(params, opt_state, x, t, ctx, eps):
        def loss_fn(p):
            return losses.weighted_mse(unet.apply({"params": p}, x, t, ctx), eps, jnp.ones((1,)))
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    step = jax.jit(step, donate_argnums=(0, 1))
    opt_state = tx.init(params)
    batch = [jnp.asarray(a) for a in inputs()]
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        params, opt_state, loss = step(params, opt_state, *batch)
        jax.block_until_ready(loss)
        times.append(time.perf_counter() - t0)
    return times[0], times[1:]


def torch_steps(dtype, steps, threads):
    import numpy as np
    import torch
    from diffusers import UNet2DConditionModel
    from configs import sd15
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**sd15.get_config().unet.to_dict()).train()
    opt = torch.optim.AdamW(unet.parameters(), lr=ADAMW["lr"], betas=(ADAMW["b1"], ADAMW["b2"]),
                            eps=ADAMW["eps"], weight_decay=ADAMW["weight_decay"])
    x, t, ctx, eps = (torch.from_numpy(np.ascontiguousarray(a)) for a in inputs())
    x, eps = x.permute(0, 3, 1, 2), eps.permute(0, 3, 1, 2)
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            out = unet(x, t, ctx).sample
        loss = torch.nn.functional.mse_loss(out.float(), eps)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return times[0], times[1:]


def one(impl, dtype, steps, threads):
    """Run one configuration here and print its result as a JSON line."""
    first, rest = sdjax_steps(dtype, steps) if impl == "sdjax" else torch_steps(dtype, steps, threads)
    step = sorted(rest)[len(rest) // 2]
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    print(json.dumps(dict(impl=impl, dtype=dtype, first_step_s=round(first, 2), step_s=round(step, 3),
                          images_per_s=round(1 / step, 4), peak_rss_gib=round(peak_gib, 2))))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3, help="timed steps after the first (compile) one; median reported")
    p.add_argument("--impls", default="sdjax,torch")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    p.add_argument("--one", nargs=2, metavar=("IMPL", "DTYPE"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        return one(*a.one, a.steps, a.threads)
    print(f"SD 1.5 U-Net train step, 256x256 (latents 32x32), batch 1, AdamW; {os.cpu_count()} CPUs")
    for dtype in a.dtypes.split(","):
        for impl in a.impls.split(","):
            cmd = [sys.executable, __file__, "--one", impl, dtype, "--steps", str(a.steps), "--threads", str(a.threads)]
            out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                                 env=dict(os.environ, PYTHONPATH=ROOT))
            lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
            print(lines[-1] if lines else f"{impl} {dtype} failed:\n{out.stderr[-2000:]}", flush=True)


if __name__ == "__main__":
    main()

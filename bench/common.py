"""Shared inputs and timing helpers of the benchmark (no framework imports)."""
import os
import subprocess
import sys
import time

import numpy as np

PROMPT = "a photo of an astronaut riding a horse on mars"
GUIDANCE = 7.5
ADAMW = dict(learning_rate=1e-5, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-2)


def latents(spec, channels, factor, batch=1, seed=0):
    """Unit-normal NHWC latents float32 [batch, size/f, size/f, channels] for spec["size"] images."""
    s = spec["size"] // factor
    return np.random.default_rng(seed).standard_normal((batch, s, s, channels), np.float32)


def timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def median(xs):
    return float(np.median(xs))


def reset_peak_rss():
    """Reset the process's peak RSS (Linux: VmHWM) so that rss("VmHWM") covers only what follows."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def rss(field="VmRSS"):
    """Resident memory in bytes (Linux /proc/self/status; VmHWM: the peak since the last reset), else None."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))
    except (OSError, StopIteration):
        return None


def available_bytes():
    """The machine's available memory (Linux /proc/meminfo)."""
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))


def run_step(low, steps, seed=0):
    """(median seconds of `steps` calls after a warm-up one, the last metrics) of a train step compiled from shapes
    (sdjax.train.memory.Lowered), on random weights (normal, std 0.02) and a random batch (floats uniform in
    [-1, 1], ids zero)."""
    import jax
    rng = np.random.default_rng(seed)
    real = lambda tree, shardings: jax.tree.map(  # noqa: E731
        lambda s, sh: jax.device_put((rng.standard_normal(s.shape, np.float32) * 0.02).astype(s.dtype), sh),
        tree, shardings)
    frozen = real(low.frozen, low.plan.frozen_sharding)
    trainable = real(low.plan.abstract.params, low.plan.state_sharding.params)
    state = jax.jit(low.plan.init, out_shardings=low.plan.state_sharding)(trainable)
    del trainable
    batch = {k: jax.device_put(np.zeros(s.shape, s.dtype) if s.dtype != np.float32 else
                               rng.uniform(-1, 1, s.shape).astype(np.float32), sh)
             for (k, s), sh in zip(low.batch.items(), low.batch_sharding.values())}
    times = []
    for _ in range(steps + 1):  # the first: warm-up
        t0 = time.perf_counter()
        state, metrics = low.compiled(state, frozen, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    return median(times[1:]), metrics


def report_step(c, what, header, steps):
    """Compile the train step of config `c` on one device from shapes (sdjax.train.memory), print `what: header` with
    XLA's account of one step (GiB), its FLOPs and the compile seconds, then, where the machine's free memory holds
    it, the median of `steps` step times."""
    import jax
    from sdjax.train import memory
    gib = 2 ** 30
    t0 = time.perf_counter()
    low = memory.compile_step(c, jax.devices()[:1])
    compile_s = time.perf_counter() - t0
    est = memory.estimate(c, lowered=low)
    trained = sum(x.size for x in jax.tree.leaves(low.plan.abstract.params)) / 1e6
    print(f"{what}: {header}, {jax.devices()[0].device_kind}; state {est.state / gib:.3f} GiB ({trained:.1f}M "
          f"trained), frozen {est.frozen / gib:.3f}, temp {est.temp / gib:.3f}, peak {est.peak / gib:.3f} GiB; "
          f"{est.flops / 1e9:.1f} GFLOP; compile {compile_s:.0f} s", flush=True)
    need, free = est.peak + est.state, available_bytes()  # the state's initial copy besides the donated one
    if jax.default_backend() == "cpu" and need > 0.9 * free:
        print(f"{what}: step not run: it needs ~{need / gib:.1f} GiB, {free / gib:.1f} GiB are free here")
        return
    seconds, metrics = run_step(low, steps)
    print(f"{what}: step {seconds:.3f} s (median of {steps}; loss {float(metrics['loss']):.3f})", flush=True)


def each_mode_alone(script, args, keys):
    """Run `script --mode=M` for each mode M of args.modes (comma-separated) in a process of its own, so that each
    mode's memory is its own; args' fields `keys` are passed on (`--remat` as a flag)."""
    rest = [f"--{k}={getattr(args, k)}" for k in keys] + ["--remat"] * args.remat
    for mode in args.modes.split(","):
        subprocess.run([sys.executable, os.path.abspath(script), f"--mode={mode}", *rest],
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(script))), check=True)

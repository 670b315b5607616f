"""Shared inputs and timing helpers of the benchmark (no framework imports)."""
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

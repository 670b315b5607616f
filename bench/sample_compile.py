"""Compile seconds of a first and a second `sample.py` run (jax's persistent compilation cache, a fresh folder),
and the sampling loop's time per step by how many iterations each compiled call runs (progress is shown
between calls).

    python bench/sample_compile.py [--models demo,sd15] [--steps 20] [--repeats 3]

demo: the bundled model at 64²; sd15: the SD 1.5 architecture with random weights (written once to
/tmp/sd15_random by bench/load_sd15.py) at 256². The per-step times run the same executable with the pipeline's
own number of iterations per call (adaptive), 1, 5, and the whole loop in one call; PYTHONPATH=<an older checkout> measures that checkout's per-step time
(its `generate` with a fixed sampler) for a before/after comparison.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = {"demo": 64, "sd15": 256}


def folder(model):
    if model == "demo":
        from sdjax.demo import DEMO_MODEL
        return DEMO_MODEL
    path = "/tmp/sd15_random"
    if not os.path.isdir(path):
        sys.path.insert(0, ROOT)
        from bench.load_sd15 import write_random_folder
        write_random_folder(path)
    return path


def cli_runs(model, steps):
    """(first, second) compile seconds as sample.py prints them, with one fresh cache folder."""
    out, cache = tempfile.mkdtemp(), tempfile.mkdtemp()
    size = SIZES[model]
    cmd = [sys.executable, os.path.join(ROOT, "sample.py"), "--model", folder(model), "--prompt", "a red circle",
           "--steps", str(steps), "--height", str(size), "--width", str(size), "--sampler", "dpmpp_2m",
           "--out", out, "--compilation-cache", cache]
    seconds = []
    for _ in range(2):
        t0 = time.perf_counter()
        text = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        compile_s, sample_s = map(float, re.search(r"compile ([\d.]+) s, sampling ([\d.]+) s", text).groups())
        seconds.append((compile_s, sample_s, time.perf_counter() - t0))
    return seconds


def per_step(model, steps, repeats, chunks):
    """{iterations per call: median seconds per step} of the sampling loop (one compile serves them all)."""
    import numpy as np
    from sdjax.pipeline import StableDiffusion
    sd = StableDiffusion.load(folder(model))
    size = SIZES[model]
    run = lambda: sd.generate("a red circle", num_steps=steps, sampler="dpmpp_2m", height=size, width=size,  # noqa: E731
                              progress=False, output_type="latent")
    run()
    if not chunks:
        return {"one call": float(np.median([run() is not None and sd.last_timings["sample"] / steps
                                             for _ in range(repeats)]))}
    from sdjax.pipeline import loop_calls
    out = {}
    for chunk in (None, 1, 5, steps):  # None: the pipeline's own choice
        loop_calls.CHUNK = chunk
        out[chunk] = float(np.median([run() is not None and sd.last_timings["sample"] / steps for _ in range(repeats)]))
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="demo,sd15")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-cli", action="store_true", help="only the per-step times")
    a = p.parse_args()
    import sdjax
    chunks = os.path.dirname(sdjax.__file__) == os.path.join(ROOT, "sdjax") and os.path.isdir(
        os.path.join(ROOT, "sdjax", "pipeline"))
    for model in a.models.split(","):
        if not a.no_cli and chunks:
            (c1, s1, w1), (c2, s2, w2) = cli_runs(model, a.steps)
            print(f"{model}: sample.py compile {c1:.1f} s then {c2:.1f} s ({c2 / c1:.0%}); sampling {s1:.2f} / "
                  f"{s2:.2f} s; wall {w1:.1f} / {w2:.1f} s")
        for chunk, seconds in per_step(model, a.steps, a.repeats, chunks).items():
            calls = {None: "adaptive", a.steps: "all"}.get(chunk, chunk)
            print(f"{model} {SIZES[model]}²: {seconds * 1e3:.1f} ms/step, {calls} iteration(s) per call")

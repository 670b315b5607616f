"""Seconds per sampling step of the SD 1.5 architecture (random weights), 512x512, batch 1, with guidance:
sdjax next to diffusers' PyTorch pipeline on the same machine.

    python bench/load_sd15.py            # writes /tmp/sd15_random once
    python bench/sample_sd15.py [--folder /tmp/sd15_random] [--steps 4] [--size 512] [--sampler ddim]
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def bench_sdjax(folder, steps, size, sampler, dtype):
    from sdjax.pipeline import StableDiffusion
    sd = StableDiffusion.load(folder, dtype=dtype)
    kw = dict(num_steps=steps, guidance_scale=7.5, sampler=sampler, height=size, width=size, progress=False)
    sd.generate("a photo of a cat", **kw)  # compile
    compile_s = sd.last_timings.get("compile_sample", 0.0)
    sd.generate("a photo of a cat", seed=1, **kw)
    return sd.last_timings["sample"] / steps, compile_s


def bench_diffusers(folder, steps, size, sampler):
    import diffusers
    import torch
    names = {"ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler"}
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    pipe.scheduler = getattr(diffusers, names[sampler]).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    times = {}
    with torch.inference_mode():
        for n in (1, 1 + steps):  # the difference removes text encoding and VAE decoding
            t0 = time.perf_counter()
            pipe("a photo of a cat", num_inference_steps=n, guidance_scale=7.5, height=size, width=size,
                 output_type="np")
            times[n] = time.perf_counter() - t0
    return (times[1 + steps] - times[1]) / steps


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--folder", default="/tmp/sd15_random")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--skip-torch", action="store_true")
    a = p.parse_args()
    import jax
    import torch
    print(f"machine: {os.cpu_count()} CPU cores; jax {jax.__version__} on {jax.devices()[0].platform}; "
          f"torch {torch.__version__} with {torch.get_num_threads()} threads")
    per_step, compile_s = bench_sdjax(a.folder, a.steps, a.size, a.sampler, a.dtype)
    print(f"sdjax    {a.dtype}: {per_step:.2f} s/step ({a.size}x{a.size}, batch 1, CFG), compile {compile_s:.1f} s")
    if not a.skip_torch:
        ref = bench_diffusers(a.folder, a.steps, a.size, a.sampler)
        print(f"diffusers float32: {ref:.2f} s/step; sdjax/diffusers = {per_step / ref:.2f}")

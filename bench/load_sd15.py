"""Wall time and peak memory of importing the full-size SD 1.5 architecture from a diffusers folder.

Writes random weights of the SD 1.5 shapes as a diffusers folder (once), then loads it in a fresh
process with `sdjax.weights.pretrained.load_pretrained` and prints the figures.
    python bench/load_sd15.py [--folder /tmp/sd15_random] [--dtype float32]
"""
import argparse
import os
import resource
import subprocess
import sys
import time


def write_random_folder(folder):
    import jax
    import numpy as np
    from configs.models import sd15
    from sdjax.text.clip_vocab import write_clip_tokenizer
    from sdjax.models import registry
    from sdjax.weights.diffusers import save_folder
    cfg = sd15.get_config().to_dict()
    rng = np.random.default_rng(0)
    modules, params = {}, {}
    for kind in ("unet", "vae", "text_encoder"):
        modules[kind] = registry.build(kind, cfg[kind])
        shapes = registry.param_shapes(kind, modules[kind])
        params[kind] = jax.tree.map(lambda s: rng.standard_normal(s.shape, np.float32) * 0.02, shapes)
    tok = write_clip_tokenizer(os.path.join(folder, "_tok"))
    save_folder(folder, modules, params, cfg["scheduler"], tokenizer_dirs={"tokenizer": tok})


def measure(folder, dtype):
    import jax
    from sdjax.weights.pretrained import load_pretrained
    t0 = time.perf_counter()
    sd = load_pretrained(folder, dtype=dtype)
    jax.block_until_ready(sd.params)
    seconds = time.perf_counter() - t0
    n = sum(x.size for x in jax.tree.leaves(sd.params))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"SD 1.5 import ({dtype}): {n / 1e6:.0f}M params, {seconds:.1f} s wall, peak RSS {peak:.2f} GiB")


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--folder", default="/tmp/sd15_random")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if a.measure:
        measure(a.folder, a.dtype)
    else:
        if not os.path.isfile(os.path.join(a.folder, "model_index.json")):
            write_random_folder(a.folder)
        subprocess.run([sys.executable, __file__, "--folder", a.folder, "--dtype", a.dtype, "--measure"], check=True)

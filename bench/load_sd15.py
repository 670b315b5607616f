"""Wall time and peak host memory of loading a full-size SD 1.5 or SDXL architecture from a diffusers folder.

Writes random weights of the model's shapes as a diffusers folder (once; float32 files, the SDXL U-Net in
2 GiB shards), then, in a fresh process, times `StableDiffusion.load` (files -> params in the dtype -> the
devices) and prints the peak RSS against the params' size in that dtype.
    python bench/load_sd15.py [--model sd15|sdxl] [--folder /tmp/{model}_random] [--dtype float32]
"""
import argparse
import importlib
import os
import resource
import subprocess
import sys
import time


def write_random_folder(folder, model="sd15"):
    import jax
    import numpy as np
    from sdjax.text.clip_vocab import write_clip_tokenizer
    from sdjax.models import registry
    from sdjax.weights.diffusers import save_folder
    cfg = importlib.import_module(f"configs.models.{model}").get_config().to_dict()
    rng = np.random.default_rng(0)
    modules, params = {}, {}
    for kind in [k for k in ("unet", "vae", "text_encoder", "text_encoder_2") if k in cfg]:
        modules[kind] = registry.build(kind, cfg[kind])
        shapes = registry.param_shapes(kind, modules[kind])  # float16 here (SDXL: 7 GB), float32 in the files
        params[kind] = jax.tree.map(lambda s: (rng.standard_normal(s.shape, np.float32) * 0.02).astype(np.float16),
                                    shapes)
    toks = {"tokenizer": write_clip_tokenizer(os.path.join(folder, "_tok"))}
    if "text_encoder_2" in cfg:
        toks["tokenizer_2"] = write_clip_tokenizer(os.path.join(folder, "_tok2"), "!")
    save_folder(folder, modules, params, cfg["scheduler"], tokenizer_dirs=toks, max_shard_size=2**31)


def measure(folder, dtype, model):
    import jax
    from sdjax.pipeline import StableDiffusion
    t0 = time.perf_counter()
    sd = StableDiffusion.load(folder, dtype=dtype)
    jax.block_until_ready(sd.params)
    seconds = time.perf_counter() - t0
    leaves = jax.tree.leaves(sd.params)
    n, size = sum(x.size for x in leaves), sum(x.nbytes for x in leaves) / 2**30
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"{model} load ({dtype}, {jax.default_backend()}): {n / 1e6:.0f}M params ({size:.2f} GiB), "
          f"{seconds:.1f} s wall, peak RSS {peak:.2f} GiB = {peak / size:.2f}x the params")


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="sd15", choices=["sd15", "sdxl"])
    p.add_argument("--folder")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    a.folder = a.folder or f"/tmp/{a.model}_random"
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if a.measure:
        measure(a.folder, a.dtype, a.model)
    else:
        if not os.path.isfile(os.path.join(a.folder, "model_index.json")):
            print(f"writing random {a.model} weights to {a.folder} (once)", flush=True)
            write_random_folder(a.folder, a.model)
        subprocess.run([sys.executable, __file__, "--folder", a.folder, "--dtype", a.dtype, "--model", a.model,
                        "--measure"], check=True)

"""The train step with and without the latent cache: the real LDM step (ldm_step.make_train_step: frozen VAE
encode + text tower + U-Net forward/backward + SGD + EMA) on images and token ids, against the same step on
cached posterior moments and text states (sdjax.data.cache), SD 1.5 architecture (random weights).

    python bench/cache_step.py [--size 256] [--batch 1] [--dtype float32] [--repeats 3]
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="float32", help="compute dtype (params stay float32)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--folder", default="/tmp/sd15_random")
    a = p.parse_args()
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from bench.load_sd15 import write_random_folder
    from configs.train import tiny
    from sdjax.diffusion import schedules
    from sdjax.train.ldm import ldm_stage, ldm_step
    from sdjax.train.state import create_state
    from sdjax.weights.pretrained import load_pretrained
    if not os.path.isfile(os.path.join(a.folder, "model_index.json")):
        write_random_folder(a.folder)
    config = tiny.get_config()
    config.precision.compute_dtype = a.dtype
    pre = load_pretrained(a.folder)
    pre = pre.__class__(**{**pre.__dict__, "modules": {k: m.clone(dtype=jnp.dtype(a.dtype), param_dtype=jnp.float32)
                                                        for k, m in pre.modules.items()}})
    _, schedule = ldm_stage.make_optimizer(config)
    tx = optax.sgd(1e-5)  # AdamW's two moments of the 860 M U-Net do not fit beside the rest in 24 GB
    abar = schedules.alphas_cumprod(schedules.scheduler_settings(pre.scheduler))
    empty_ids = ldm_stage.empty_prompt_ids(pre)
    frozen = jax.device_put({k: v for k, v in pre.params.items() if k != "unet"})
    b, s, f = a.batch, a.size, 8
    rng = np.random.default_rng(0)
    sizes = {"original_size": np.full((b, 2), s, np.int32), "crop_top_left": np.zeros((b, 2), np.int32)}
    batches = {
        "images": {"images": rng.uniform(-1, 1, (b, s, s, 3)).astype(np.float32),
                   "input_ids": np.tile(empty_ids["input_ids"], (b, 1)), **sizes},
        "cache": {"latent_mean": rng.standard_normal((b, s // f, s // f, 4), np.float32),
                  "latent_std": np.full((b, s // f, s // f, 4), 0.01, np.float32),
                  "encoder_hidden_states": rng.standard_normal((b, 77, 768), np.float32), **sizes}}
    empty_text = {"encoder_hidden_states": np.zeros((77, 768), np.float32)}
    results = {}
    for name, batch in batches.items():
        step = ldm_step.make_train_step(pre.modules, config, tx, schedule, abar, empty_ids,
                                        empty_text=empty_text if name == "cache" else None)
        state = jax.jit(lambda p: create_state(p, tx, 0))({"unet": pre.params["unet"]})  # buffers of its own
        t0 = time.perf_counter()
        compiled = jax.jit(step, donate_argnums=0).lower(state, frozen, batch).compile()
        compile_s = time.perf_counter() - t0
        state, _ = jax.block_until_ready(compiled(state, frozen, batch))  # warm-up
        times = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            state, _ = jax.block_until_ready(compiled(state, frozen, batch))
            times.append(time.perf_counter() - t0)
        results[name] = float(np.median(times))
        print(f"{name:6s}: {results[name]:.3f} s/step (median of {a.repeats}; compile {compile_s:.0f} s)", flush=True)
        del state, compiled
    print(f"SD 1.5 train step at {s}², batch {b}, {a.dtype}, {jax.default_backend()}: "
          f"cache {results['images'] / results['cache']:.2f}x the speed of the step from images")


if __name__ == "__main__":
    main()

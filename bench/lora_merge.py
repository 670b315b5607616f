"""Seconds to read and merge an SD 1.5-size LoRA, to rescale it and to unload it: the pipeline's own `Loras` on random
params of SD 1.5's U-Net and text tower. The LoRA: a kohya file of rank R on the layers kohya's default network
adapts (the U-Net's attention blocks: q/k/v/out, feed-forward, proj_in/out; the tower's every linear layer), with
--conv also LoCon's convolutions (resnets, samplers, conv_in/out).
    python bench/lora_merge.py [--rank 32] [--conv] [--dtype float32]
"""
import argparse
import os
import re
import resource
import sys
import tempfile
import time

ATTENTION = re.compile(r"(attentions_\d+|transformer_blocks_\d+)_")  # kohya's default: the Transformer2D modules
CONV = re.compile(r"(resnets_\d+_(conv1|conv2|conv_shortcut)|samplers_0_conv|conv_in|conv_out)$")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--conv", action="store_true")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    a = p.parse_args()
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import traverse_util
    from safetensors.numpy import save_file
    from configs.models import sd15
    from sdjax.models import registry
    from sdjax.pipeline.loras import Loras
    from sdjax.weights.lora_files import kohya_names

    cfg, rng, params, tensors = sd15.get_config().to_dict(), np.random.default_rng(0), {}, {}
    for kind in ("unet", "text_encoder"):
        shapes = registry.param_shapes(kind, registry.build(kind, cfg[kind]))
        params[kind] = jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape, np.float32) * 0.02, a.dtype),
                                    shapes)
        flat = traverse_util.flatten_dict(shapes)
        for path, name in kohya_names(kind, params[kind], xl=False).items():
            if kind == "unet" and not (ATTENTION.search(name) or (a.conv and CONV.search(name))):
                continue
            shape = flat[path].shape  # Flax layout: [in, out] or [kh, kw, in, out]
            down = (a.rank, shape[-2], *shape[:-2])  # PyTorch layout: [r, in] or [r, in, kh, kw]
            tensors[f"{name}.lora_down.weight"] = rng.standard_normal(down, np.float32) * 0.02
            up = (shape[-1], a.rank, 1, 1) if len(shape) == 4 else (shape[-1], a.rank)
            tensors[f"{name}.lora_up.weight"] = rng.standard_normal(up, np.float32) * 0.02
            tensors[f"{name}.alpha"] = np.asarray(a.rank / 2, np.float32)
    path = os.path.join(tempfile.mkdtemp(), "sd15_lora.safetensors")
    save_file({k: v.astype(np.float16) for k, v in tensors.items()}, path)  # as LoRAs are shared
    layers = sum(k.endswith(".alpha") for k in tensors)
    size = os.path.getsize(path) / 2**20
    jax.block_until_ready(params)

    loras = Loras(params)
    t0 = time.perf_counter()
    loras.load(path)
    jax.block_until_ready(params)
    t1 = time.perf_counter()
    loras.set_scale(0.5)
    jax.block_until_ready(params)
    t2 = time.perf_counter()
    loras.unload()
    jax.block_until_ready(params)
    t3 = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"SD 1.5 LoRA rank {a.rank}{' + LoCon' if a.conv else ''}: {layers} layers, {size:.0f} MiB file (fp16); "
          f"params {a.dtype} on {jax.default_backend()}: load + merge {t1 - t0:.2f} s, rescale {t2 - t1:.2f} s, "
          f"unload {t3 - t2:.2f} s; peak RSS {peak:.1f} GiB")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from sdjax import host_memory
    host_memory.keep_freed_memory()  # as sample.py: no page faults for every merged kernel (CPU)
    main()

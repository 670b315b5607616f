"""ControlNet training vs full fine-tuning of the U-Net: the real train step (`sdjax.train.memory.compile_step`: VAE
encode, text tower, AdamW, EMA; the ControlNet stage: the ControlNet forward and backward and the frozen U-Net's,
the ControlNet alone trained; full: the U-Net trained) of the tiny model (configs/train/tiny.py) or SD 1.5's
architecture, one device, random weights, batch B at S². Prints, per mode, what one step holds (XLA's account),
its FLOPs, the compile seconds and the median step time.
    python bench/controlnet_train.py [--model tiny|sd15] [--size 64] [--batch 4] [--steps 5] [--dtype float32]
Each mode runs in a process of its own.
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config(a):
    """The mode's train config (the ControlNet stage's or the LDM stage's) of the model at a.size, batch a.batch."""
    from configs.models import sd15
    from configs.train import controlnet, tiny
    c = controlnet.get_config() if a.mode == "controlnet" else tiny.get_config()
    if a.model == "sd15":
        c.model = sd15.get_config()
        if a.mode == "controlnet":
            c.controlnet.conditioning_embedding_out_channels = (16, 32, 96, 256)
    c.batch_size, c.data.image_size, c.mesh.data, c.mesh.fsdp = a.batch, a.size, 1, 1
    c.precision.compute_dtype, c.remat, c.estimate_attention = a.dtype, a.remat, "auto"
    c.sample.every = 0
    return c


def measure(a):
    from bench import common
    common.report_step(config(a), a.mode, f"{a.model} at {a.size}², batch {a.batch}, {a.dtype} compute, "
                                          f"remat={a.remat}", a.steps)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--modes", default="full,controlnet")
    p.add_argument("--mode", help=argparse.SUPPRESS)  # one mode, in this process
    p.add_argument("--model", default="tiny", choices=["tiny", "sd15"])
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--remat", action="store_true")
    p.add_argument("--steps", type=int, default=5)
    a = p.parse_args()
    if a.mode:
        return measure(a)
    from bench import common
    common.each_mode_alone(__file__, a, ("model", "size", "batch", "dtype", "steps"))


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    from sdjax import host_memory
    host_memory.keep_freed_memory()
    main()

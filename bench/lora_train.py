"""LoRA vs full fine-tuning: the real train step (`sdjax.train.memory.compile_step`: VAE encode, text tower, U-Net
forward and backward, AdamW, EMA) of SD 1.5's architecture on one device, random weights, batch B at S². Prints,
per mode, XLA's account of what one step holds (train state, frozen weights, temporaries), its FLOPs, the compile
seconds and, where the machine's free memory holds the step, the median step time.
    python bench/lora_train.py [--modes full,lora] [--size 256] [--batch 1] [--rank 16] [--dropout 0]
        [--dtype float32] [--base_dtype float32] [--remat] [--steps 3]
Each mode runs in a process of its own. lora: configs/train/finetune.py:sd15_lora's adapters (the U-Net's
attention projections), dropout > 0 adds the adapters' path to the layers' outputs instead of merging them.
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def measure(a):
    from configs.train import finetune
    from bench import common

    c = finetune.get_config(f"sd15{'_lora' if a.mode == 'lora' else ''},{'gpu24' if a.mode == 'lora' else 'h100x8'}")
    c.batch_size, c.data.image_size, c.mesh.data, c.mesh.fsdp = a.batch, a.size, 1, 1
    c.precision.compute_dtype, c.remat, c.estimate_attention = a.dtype, a.remat, "auto"
    if a.mode == "lora":
        c.lora.update(rank=a.rank, alpha=float(a.rank), dropout=a.dropout, base_dtype=a.base_dtype)
    what = (f"{a.mode}{f' rank {a.rank}' if a.mode == 'lora' else ''}"
            f"{f' dropout {a.dropout}' if a.mode == 'lora' and a.dropout else ''}")
    common.report_step(c, what, f"SD 1.5 at {a.size}², batch {a.batch}, {a.dtype} compute, remat={a.remat}", a.steps)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--modes", default="full,lora")
    p.add_argument("--mode", help=argparse.SUPPRESS)  # one mode, in this process
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--base_dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--remat", action="store_true")
    p.add_argument("--steps", type=int, default=3)
    a = p.parse_args()
    if a.mode:
        return measure(a)
    from bench import common
    common.each_mode_alone(__file__, a, ("size", "batch", "rank", "dropout", "dtype", "base_dtype", "steps"))


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    from sdjax import host_memory
    host_memory.keep_freed_memory()
    main()

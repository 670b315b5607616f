"""Subprocess entry for the training tests: sdjax.train.loop.train on a tiny config with in-memory data.

python tests/train_worker.py --workdir W --steps N [--devices K --data D --fsdp F] [--coordinator ...]
Metrics of every step land in W/metrics.jsonl (log_every=1).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny_config(steps, lora=False):
    """configs/train/tiny.py (lora: its LoRA variant, on the U-Net and text tower) at 16x16, batch 8, every step
    logged; small arrays are fsdp-sharded too."""
    from configs.train import tiny as train_tiny
    c = train_tiny.get_config("lora" if lora else "")
    if lora:
        c.lora.components = ("unet", "text_encoder")
    c.model.vae.sample_size, c.model.unet.sample_size, c.data.image_size = 16, 8, 16
    c.batch_size, c.total_steps, c.log_every, c.checkpoint_every = 8, steps, 1, 2
    c.optimizer.warmup_steps = 2
    c.mesh.min_shard_size = 256
    return c


def measure_sampling(loop, path):
    """After each loop.sample_images, write {step: {"live", "run", "params"}} to `path`.{process index}: the bytes
    of all live arrays and of the run's own (state + frozen) on this process's first device, and the params' whole
    size."""
    import json
    import jax
    sample, out, device = loop.sample_images, {}, jax.local_devices()[0]

    def on_device(arrays):
        return sum(s.data.nbytes for a in arrays for s in a.addressable_shards if s.device == device)

    def measured(pipe, run, step, logger):
        sample(pipe, run, step, logger)
        out[step] = dict(live=on_device(jax.live_arrays()), run=on_device(jax.tree.leaves((run.state, run.frozen))),
                         params=sum(x.nbytes for x in jax.tree.leaves({**run.frozen, **run.state.ema_params})))
        with open(f"{path}.{jax.process_index()}", "w") as f:
            json.dump(out, f)
    loop.sample_images = measured


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--devices", type=int, default=0, help="use the first K devices (0: all)")
    p.add_argument("--data", type=int, default=-1)
    p.add_argument("--fsdp", type=int, default=1)
    p.add_argument("--grad_accum", type=int, default=1)
    p.add_argument("--coordinator")
    p.add_argument("--num_processes", type=int)
    p.add_argument("--process_id", type=int)
    p.add_argument("--export_dir", help="after training, export (every process calls it, as train.py does)")
    p.add_argument("--sample_every", type=int, default=0, help="sample the config's 2 prompts (4 steps) this often")
    p.add_argument("--ema_decay", type=float, default=0.99)
    p.add_argument("--lora", action="store_true", help="train a LoRA of the U-Net and text tower (config.lora)")
    p.add_argument("--device_bytes", help="write here, as JSON, what device 0 holds after each sampling")
    p.add_argument("--shapes", help="train on 64 synthetic shapes built in this tfds folder (the real input "
                                    "pipeline) instead of in-memory data")
    a = p.parse_args()
    import jax
    if a.coordinator:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(a.coordinator, a.num_processes, a.process_id)
    from sdjax.train import loop
    from train_fakes import fake_data
    c = tiny_config(a.steps, a.lora)
    c.mesh.data, c.mesh.fsdp, c.optimizer.grad_accum_steps = a.data, a.fsdp, a.grad_accum
    c.sample.update(every=a.sample_every, num_steps=4)
    c.ema_decay = a.ema_decay
    if a.device_bytes:
        measure_sampling(loop, a.device_bytes)
    if a.shapes:
        c.data.update(source="shapes", data_dir=a.shapes, shapes=dict(num_train=64, num_test=8, num_heldout=8))
    data = loop.pipeline_iterator if a.shapes else fake_data()
    loop.train(c, a.workdir, data, devices=jax.devices()[:a.devices] if a.devices else None)
    if a.export_dir:
        from sdjax.train.export import export
        export(a.workdir, a.export_dir)


if __name__ == "__main__":
    main()

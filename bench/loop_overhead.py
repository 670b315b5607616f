"""The training loop's overhead: steps/s of `train()` on the tiny config against the bare compiled step.

    python bench/loop_overhead.py [--steps 60]

Both run the same compiled step on the same in-memory batches (`train()` with its prefetch thread,
metrics fetched only at log steps, checkpoints only at the end); the ratio is train()'s steps/s over
the bare step's. Goal: >= 0.97.
"""
import argparse
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Batches:
    """In-memory batches of the tiny config's shapes, with the iterator state a checkpoint records."""

    def __init__(self, batch_size, size):
        rng = np.random.default_rng(0)
        self.batch = {"images": rng.uniform(-1, 1, (batch_size, size, size, 3)).astype(np.float32),
                      "input_ids": np.full((batch_size, 77), 49407, np.int32)}
        self.step = 0

    def __next__(self):
        self.step += 1
        return self.batch

    def get_state(self):
        return {"step": self.step}

    def set_state(self, state):
        self.step = state["step"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    a = p.parse_args(argv)
    sys.path.insert(0, ROOT)
    import jax
    from configs.train import tiny
    from sdjax.train import loop
    from sdjax.train.sharding import global_batch
    c = tiny.get_config()
    c.total_steps, c.log_every, c.checkpoint_every = a.steps, 10, 10 ** 6
    make = lambda config, tokenizer, b, seed, i, n: Batches(b, config.data.image_size)  # noqa: E731
    with tempfile.TemporaryDirectory() as workdir:
        run = loop.setup(c, workdir, make)
        batch = global_batch(next(run.data), run.mesh)
        state = run.state
        for _ in range(3):  # compile and warm up
            state, metrics = run.step_fn(state, run.frozen, batch)
        jax.block_until_ready(state)
        t0 = time.perf_counter()
        for _ in range(a.steps):
            state, metrics = run.step_fn(state, run.frozen, batch)
        jax.block_until_ready(state)
        bare = a.steps / (time.perf_counter() - t0)
        run.checkpointer.close()
    with tempfile.TemporaryDirectory() as workdir:
        loop.train(c, workdir, make)
        import json
        rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
        rates = [r["steps_per_s"] for r in rows[1:] if "steps_per_s" in r]  # the first window holds the compile
        looped = float(np.median(rates))
    print(f"bare compiled step: {bare:.2f} steps/s; train(): {looped:.2f} steps/s; ratio {looped / bare:.3f}")


if __name__ == "__main__":
    main()

"""Where training metrics go: stdout, `workdir/metrics.jsonl`, TensorBoard events, sample PNGs (process 0 only)."""
import json
import logging
import os

import numpy as np
from PIL import Image

log = logging.getLogger("sdjax.train")


class MetricsLogger:
    """write(step, {name: float}), record(step, **facts) and images(step, uint8 [N, H, W, 3]); silent where
    enabled=False."""

    def __init__(self, workdir, enabled=True):
        self.workdir, self.enabled = workdir, enabled
        self._jsonl = self._tb = None
        if enabled:
            from tensorboardX import SummaryWriter  # needs no TensorFlow
            os.makedirs(workdir, exist_ok=True)
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step, metrics):
        if not self.enabled:
            return
        metrics = {k: float(v) for k, v in metrics.items()}
        log.info("step %d: %s", step, " ".join(f"{k}={v:.6g}" for k, v in metrics.items()))
        self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self._jsonl.flush()
        for k, v in metrics.items():
            self._tb.add_scalar(k, v, step)
        self._tb.flush()

    def record(self, step, **fields):
        """A row of other facts than metrics in metrics.jsonl (e.g. config_change={field: [old, new]}), and as
        TensorBoard text."""
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, **fields}) + "\n")
        self._jsonl.flush()
        for k, v in fields.items():
            self._tb.add_text(k, json.dumps(v), step)
        self._tb.flush()

    def images(self, step, images, captions=()):
        """Sample images uint8 [N, H, W, 3] to TensorBoard and `workdir/samples/step_{step}.png` (a row)."""
        if not self.enabled:
            return
        folder = os.path.join(self.workdir, "samples")
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(np.concatenate(list(images), axis=1)).save(os.path.join(folder, f"step_{step:07d}.png"))
        self._tb.add_images("samples", np.asarray(images), step, dataformats="NHWC")
        if captions:
            self._tb.add_text("captions", " | ".join(captions), step)
        self._tb.flush()

    def close(self):
        if self.enabled:
            self._jsonl.close()
            self._tb.close()

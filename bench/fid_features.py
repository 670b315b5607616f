"""FID Inception features per second: sdjax (`sdjax.eval.fid.load_inception(...).features`) against pytorch-fid's
InceptionV3 (as its get_activations calls it: uint8 -> / 255, the model, the average pool), both loading one
weight file of random values; uint8 images of --size² resized to 299² inside both.
    taskset -c 0 python bench/fid_features.py [--batch 16] [--size 512] [--dims 2048] [--repeats 3]
Pinned to one core here: on this shared 2-core machine PyTorch's two threads stall whenever the other core is busy
(4.2 s per batch of 8 instead of 0.96 s on one thread), which no figure should rest on.
"""
import argparse
import os
import sys
import tempfile
import time


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--dims", type=int, default=2048, choices=[64, 192, 768, 2048])
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    import jax
    import numpy as np
    import torch
    from tests.torchvision_ops import torchvision_without_ops
    torchvision_without_ops()  # before pytorch-fid imports torchvision
    from tests.test_fid import random_fid_inception
    from pytorch_fid.inception import InceptionV3
    from sdjax.eval.fid import load_inception
    from sdjax.models.inception import BLOCK_DIMS
    from sdjax.weights.inception import FILENAME
    from bench.common import median

    torch.set_num_threads(len(os.sched_getaffinity(0)))  # the cores given (taskset); tests.conftest sets 1
    home = tempfile.mkdtemp()
    path = os.path.join(home, "hub", "checkpoints", FILENAME)
    os.makedirs(os.path.dirname(path))
    torch.save(random_fid_inception().state_dict(), path)
    os.environ["TORCH_HOME"] = home
    images = np.random.default_rng(0).integers(0, 256, (a.batch, a.size, a.size, 3), np.uint8)

    ours = load_inception(path, a.dims)
    t0 = time.perf_counter()
    ours.features(images)
    compile_s = time.perf_counter() - t0
    reference = InceptionV3([BLOCK_DIMS.index(a.dims)]).eval()

    def theirs():
        with torch.no_grad():
            out = reference(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)[0]
            return torch.nn.functional.adaptive_avg_pool2d(out, (1, 1)).squeeze(3).squeeze(2).numpy()

    theirs()  # warm-up
    times = {"sdjax": [], "pytorch-fid": []}
    for _ in range(a.repeats):  # alternating, so that both see the same machine
        for name, fn in (("sdjax", lambda: ours.features(images)), ("pytorch-fid", theirs)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    s, t = median(times["sdjax"]), median(times["pytorch-fid"])
    print(f"FID Inception features, dims {a.dims}, batch {a.batch} of {a.size}², median of {a.repeats} "
          f"({jax.default_backend()}, {len(jax.devices())} device(s); torch {torch.get_num_threads()} threads):")
    print(f"  sdjax        {a.batch / s:7.1f} images/s ({s:.2f} s per batch; compile + first call {compile_s:.1f} s)")
    print(f"  pytorch-fid  {a.batch / t:7.1f} images/s ({t:.2f} s per batch)")
    print(f"  sdjax / pytorch-fid time: {s / t:.2f}")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()

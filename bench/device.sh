#!/usr/bin/env bash
# The GPU figures, on one H100/H200 in under 5 minutes (the device machine: jax 0.11 + CUDA 13, torch,
# transformers, no internet). SD 1.5 architecture with random weights, bfloat16:
#   sample      512², 50 DPM++ steps with guidance, batch 1 and 8 (s per call, compile, peak GPU memory)
#   train_step  U-Net forward + backward + AdamW at 512², batch 8 (images/s = 8 / s; % of the measured
#               bf16 matmul peak from XLA's FLOP count: the MFU)
# sdjax and diffusers/PyTorch (SDPA attention) alternate in one process on the same GPU. Wheels the image
# lacks (diffusers, ml_collections, grain, tensorflow-datasets, ...) come from ./.whl (pip download them
# there on a machine with internet: `pip download -d .whl diffusers ml_collections ...`).
#     bash bench/device.sh            # prints the table, writes bench/device_results.json (and $OUT/ if set)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
if [ -d .whl ]; then
  python -m pip install -q --no-index --find-links .whl diffusers ml_collections absl-py tensorboardX safetensors 2>&1 | tail -2 || true
fi
python -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2 || true
python - <<'PY'
import sys, jax
if jax.default_backend() != "gpu":
    sys.exit(f"bench/device.sh: needs a GPU; jax runs on {jax.default_backend()} ({jax.devices()})")
print(jax.devices())
PY
python -m bench --models sd15-device --dtypes bfloat16 --repeats 2 --json bench/device_results.json
if [ -n "${OUT:-}" ]; then cp bench/device_results.json "$OUT/"; fi

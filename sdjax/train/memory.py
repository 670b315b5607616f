"""Per-device memory of a training config's step on its target, from XLA's memory analysis, before paying for it.

    python -m sdjax.train.memory --config configs/train/finetune.py:sd15,v5e-16 [--devices 16]

Compiles the real train step (LDM or ControlNet stage) for `config.target.devices` fake CPU devices in the config's
mesh, from shapes alone (no weights read or initialised), and prints what one device holds: state, frozen
weights and batch (arguments), temporaries, and their sum against `config.target.hbm_gib`. The CPU
compile stands in for the accelerator's: the same program and shardings, with attention "chunked" (query
chunks: memory like the flash kernels') in place of the TPU/GPU kernels, which only lower there. Sampling during
training (`config.sample`, and `config.eval`'s) generates from the run's own shards of the weights: it keeps no copy
of them to count (tests/test_train_loop.py measures what a device holds after sampling), only its temporaries while
it runs. The evaluation's scoring networks (`config.eval`: FID's Inception, the CLIP model) stay whole on every
device for the run: their params are counted (`eval`, from their configurations), not their activations while they
score, which, as sampling's, come between steps.
"""
import dataclasses
import math

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "a configs/train/*.py file", lock_config=False)
_DEVICES = flags.DEFINE_integer("devices", None, "fake devices to compile for (default: config.target.devices)")
flags.mark_flags_as_required(["config"])

GIB = 2 ** 30


@dataclasses.dataclass
class Estimate:
    """Bytes one device holds while the step runs (XLA's memory analysis of the compiled step)."""
    devices: int
    state: int        # this device's shard of the train state (params, optimizer, EMA)
    frozen: int       # ... of the frozen weights (VAE, text tower)
    batch: int        # ... of the batch
    temp: int         # XLA's temporaries (activations kept for the backward pass, workspace)
    arguments: int    # XLA's count of the arguments: state + batch + the frozen weights the step reads
    flops: float      # XLA's FLOP count of one step on one device
    eval: int = 0     # the evaluation's scoring networks (config.eval: FID's Inception, CLIP), whole on every device

    @property
    def peak(self):
        """Everything held + temporaries (the donated state's outputs reuse its buffers; the frozen weights
        the step never reads, the VAE decoder, stay on the device though XLA does not count them)."""
        return self.state + self.frozen + self.batch + self.temp + self.eval


def _shard_bytes(tree, shardings):
    import jax
    import numpy as np
    sizes = jax.tree.map(lambda a, s: int(np.prod(s.shard_shape(a.shape), dtype=np.int64)) * a.dtype.itemsize,
                         tree, shardings)
    return sum(jax.tree.leaves(sizes))


@dataclasses.dataclass
class Lowered:
    """The train step of a config compiled from shapes alone, and what it takes."""
    compiled: object      # the executable: compiled(state, frozen, batch)
    plan: object          # loop.StepPlan (init, abstract state, shardings)
    frozen: dict          # the frozen params as ShapeDtypeStructs
    batch: dict           # the batch as ShapeDtypeStructs
    batch_sharding: object
    mesh: object


def compile_step(config, devices=None):
    """Lowered of the train step (LDM or ControlNet stage) of `config` over `devices` (default all: jax's, fake CPU
    ones here), attention `config.estimate_attention` (default "chunked")."""
    import jax

    from sdjax.train import config as config_lib, loop
    from sdjax.train.ldm import controlnet_stage, ldm_stage
    from sdjax.train.sharding import batch_sharding, make_mesh
    from sdjax.train.stages import stage_for

    stage = stage_for(config)
    module = {"ldm": ldm_stage, "controlnet": controlnet_stage}.get(config.get("stage", "ldm"))
    config_lib.require(module is not None, "the memory estimate covers the ldm and controlnet stages")
    stage.check(config)
    mesh = make_mesh(config.mesh.data, config.mesh.fsdp, devices)
    config_lib.check_batch(config, mesh.size, 1)
    with config.unlocked():
        config.attention = config.get("estimate_attention", "chunked")
    pre = module.load(config, abstract=ldm_stage.KINDS)
    config = stage.resolve(config, pre)
    plan = loop.plan_step(stage, config, pre, mesh)
    frozen = {k: v for k, v in pre.params.items() if k not in stage.trainable_names(config)}
    batch = module.batch_shapes(pre, config.batch_size, config.data.image_size)
    batch_sh = jax.tree.map(lambda _: batch_sharding(mesh), batch)
    with_sh = lambda t, s: jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), t, s)  # noqa: E731
    compiled = plan.step_fn.lower(with_sh(plan.abstract, plan.state_sharding),
                                  with_sh(frozen, plan.frozen_sharding), with_sh(batch, batch_sh)).compile()
    return Lowered(compiled, plan, frozen, batch, batch_sh, mesh)


def estimate(config, devices=None, lowered=None):
    """Estimate of the train step of `config` over `devices` (`compile_step`'s, or `lowered`)."""
    low = lowered or compile_step(config, devices)
    mem, cost = low.compiled.memory_analysis(), low.compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    import jax
    from sdjax.train.ldm import periodic_eval
    scoring = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(periodic_eval.scoring_params(config)))
    return Estimate(low.mesh.size, _shard_bytes(low.plan.abstract, low.plan.state_sharding),
                    _shard_bytes(low.frozen, low.plan.frozen_sharding), _shard_bytes(low.batch, low.batch_sharding),
                    mem.temp_size_in_bytes, mem.argument_size_in_bytes, float(cost.get("flops", math.nan)), scoring)


def report(config, est):
    """The lines the command prints."""
    target = config.get("target", {})
    hbm = target.get("hbm_gib")
    lines = [f"{target.get('name', 'this mesh')}: {est.devices} devices, mesh data={config.mesh.data} "
             f"fsdp={config.mesh.fsdp}, batch {config.batch_size} ({config.batch_size // est.devices} per device) "
             f"at {config.data.image_size}², {config.precision.compute_dtype}, remat={bool(config.get('remat'))}",
             "per device (GiB):"]
    for name in ("state", "frozen", "batch", "temp") + (("eval",) if est.eval else ()):
        lines.append(f"  {name:<7}{getattr(est, name) / GIB:9.3f}")
    lines.append(f"  {'peak':<7}{est.peak / GIB:9.3f}" + (f"   of {hbm} GiB: {100 * est.peak / (hbm * GIB):.0f}%"
                                                          f" ({'fits' if est.peak < 0.9 * hbm * GIB else 'too big'})"
                                                          if hbm else ""))
    lines.append(f"  step   {est.flops / 1e12:9.3f} TFLOP per device (XLA's count)")
    return "\n".join(lines)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    n = _DEVICES.value or config.get("target", {}).get("devices") or 1
    import jax
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", n)
    print(report(config, estimate(config)))


if __name__ == "__main__":
    app.run(main)

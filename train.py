"""Train Stable Diffusion in JAX (all logic lives in sdjax.train).

    python train.py --config=configs/train/tiny.py --workdir=/tmp/run [--config.total_steps=500 ...]
    python train.py ... --coordinator=host0:1234 --num_processes=2 --process_id=0   # one per host

A run resumes from the latest checkpoint in --workdir (a changed config: refused where the change defines the
run, unless --allow_config_change); SIGTERM saves and exits; --export_dir writes a diffusers folder of the EMA
weights at the end (usable as `sample.py --model`), replacing an earlier export there (--overwrite: any folder);
--export_embedding the embedding a textual-inversion run learned (`sample.py --embedding`; A1111 or diffusers);
a LoRA run's --export_lora writes its LoRA file (diffusers' format or --export_lora_format=kohya) the same way.
With several processes, a lost one stops the others, naming it: restart them all to resume.
"""
import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from sdjax import compile_cache, host_memory
from sdjax.weights.embedding_files import FORMATS

_CONFIG = config_flags.DEFINE_config_file("config", None, "a configs/train/*.py file", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "checkpoints, metrics.jsonl and TensorBoard events go here")
_EXPORT = flags.DEFINE_string("export_dir", None, "after training, write a diffusers folder here")
_EMBEDDING = flags.DEFINE_string("export_embedding", None, "after textual-inversion training, write the learned "
                                 "embedding to this .safetensors file")
_EMBEDDING_FORMAT = flags.DEFINE_enum("export_embedding_format", "a1111", FORMATS, "a1111: emb_params (SDXL: clip_l "
                                      "+ clip_g); diffusers: learned_embeds {placeholder: vectors} (SDXL: and _2)")
_EXPORT_LORA = flags.DEFINE_string("export_lora", None, "a LoRA run (config.lora): after training, write its LoRA "
                                   "(the EMA adapters) to this .safetensors file")
_LORA_FORMAT = flags.DEFINE_enum("export_lora_format", "diffusers", ["diffusers", "kohya"], "--export_lora's format: "
                                 "diffusers' (PEFT names, load_lora_weights) or kohya's (A1111, ComfyUI)")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "--export_dir may replace a non-empty folder that is not an "
                               "earlier export, --export_embedding / --export_lora a file that is not one")
_ALLOW_CHANGE = flags.DEFINE_bool("allow_config_change", False, "resume even with changes to what defines the run "
                                  "(model, data, seed, batch size, optimizer, loss, precision); recorded in "
                                  "metrics.jsonl")
_COORDINATOR = flags.DEFINE_string("coordinator", None, "multi-host: address:port of process 0")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "multi-host: number of processes")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "multi-host: this process's index")
_CPU_COLLECTIVES = flags.DEFINE_string("cpu_collectives", None, "multi-process on CPUs: 'gloo'")
_HEARTBEAT = flags.DEFINE_integer("heartbeat_timeout", None, "multi-process: seconds of silence after which a "
                                  "process is taken as lost and the others stop, naming it (default 30)",
                                  lower_bound=1)
flags.mark_flags_as_required(["config", "workdir"])


def _no_orbax_tracebacks(record):
    """orbax logs a failed checkpoint write with three tracebacks from its threads; the error's one line
    stays, and the exit message says what failed (sdjax.train.checkpoint)."""
    if f"{os.sep}orbax{os.sep}" in record.pathname:
        record.exc_info = record.exc_text = None
    return True


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.getLogger("sdjax").setLevel(logging.INFO)
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax's per-save chatter
    logging.getLogger("absl").addFilter(_no_orbax_tracebacks)
    config = _CONFIG.value
    if config.get("deterministic"):  # before jax starts its backends
        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_gpu_deterministic_ops=true"
    import jax
    compile_cache.enable()
    if _CPU_COLLECTIVES.value:
        jax.config.update("jax_cpu_collectives_implementation", _CPU_COLLECTIVES.value)
    from sdjax.train import config as config_lib, distributed, loop
    from sdjax.train.export import (check_embedding_export, check_export_dir, check_lora_file, export,
                                    export_embedding, export_lora)
    with distributed.joined(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, _HEARTBEAT.value):
        try:
            if config_lib.matmul_precision(config):
                jax.config.update("jax_default_matmul_precision", config.precision.matmul)
            if _EXPORT.value:  # refused now, not after the training
                check_export_dir(_EXPORT.value, config, _WORKDIR.value, _OVERWRITE.value)
            if _EMBEDDING.value:
                check_embedding_export(_EMBEDDING.value, config, _WORKDIR.value, _OVERWRITE.value)
            if _EXPORT_LORA.value:
                check_lora_file(_EXPORT_LORA.value, config, _WORKDIR.value, _LORA_FORMAT.value, _OVERWRITE.value)
            loop.train(config, _WORKDIR.value, allow_config_change=_ALLOW_CHANGE.value)
            if _EXPORT.value:  # every process takes part in the restore; process 0 writes
                export(_WORKDIR.value, _EXPORT.value, overwrite=_OVERWRITE.value)
                logging.getLogger("sdjax").info("exported to %s", _EXPORT.value)
            if _EMBEDDING.value:
                paths = export_embedding(_WORKDIR.value, _EMBEDDING.value, _EMBEDDING_FORMAT.value,
                                         overwrite=_OVERWRITE.value)
                logging.getLogger("sdjax").info("embedding written to %s", ", ".join(paths))
            if _EXPORT_LORA.value:
                export_lora(_WORKDIR.value, _EXPORT_LORA.value, _LORA_FORMAT.value, overwrite=_OVERWRITE.value)
                logging.getLogger("sdjax").info("exported the LoRA to %s", _EXPORT_LORA.value)
        except (ValueError, OSError, loop.TrainingDiverged) as e:  # bad config, data or weights; bugs trace back
            sys.exit(f"train.py: {e}")


if __name__ == "__main__":
    host_memory.keep_freed_memory()  # before jax starts threads: no page faults on every step (CPU)
    app.run(main)

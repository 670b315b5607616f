"""Compiled pieces of the pipeline: each function compiled once per (name, static arguments, context, argument
shapes) and kept, shared by the threads that call one pipeline.

Across processes (when jax's persistent compilation cache is on: sdjax.compile_cache) a piece is not traced again
either: its lowered program is kept beside jax's cache as a serialized `jax.export` artifact, named by a hash of
what defines it (the model's modules, the name, static arguments and context, the arguments' shapes, dtypes and
shardings, jax's version and sdjax's source). A second run deserializes it, and XLA's compilation of it is a
persistent-cache hit: tracing the U-Net loop (seconds: each lowering-time platform choice is traced for every
platform) and compiling it are both skipped. Nothing compiled here may hold a host callback (jax caches no such
executable).
"""
import functools
import hashlib
import logging
import os
import pathlib
import threading
import time

import flax
import jax
from jax import export

import sdjax

log = logging.getLogger("sdjax")
# Kernels of ours and XLA's that jax.export does not guarantee stable across versions: the artifacts are a cache
# for this machine and this jax version (both in their key), not an exchange format.
_CUSTOM_CALLS = ("tpu_custom_call", "triton_kernel_call", "mosaic_gpu", "mosaic_gpu_v2", "__gpu$xla.gpu.triton",
                 "__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward", "__cudnn$fmhaScaleBiasSoftmax",
                 "__cudnn$fmhaScaleBiasSoftmaxBackward", "__cudnn$fmhaSoftmaxDropout", "cu_threefry2x32")
# jax settings that change a traced program (train.py sets the matmul precision)
_CONFIG = ("jax_default_matmul_precision", "jax_enable_x64", "jax_numpy_rank_promotion")
_DISABLED = [export.DisabledSafetyCheck.custom_call(name) for name in _CUSTOM_CALLS]


@functools.lru_cache(maxsize=1)
def _source_hash():
    """A hash of sdjax's Python sources: a changed program is never served from an old artifact."""
    h = hashlib.sha256()
    root = pathlib.Path(sdjax.__file__).parent
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode() + path.read_bytes())
    return h.hexdigest()


def _artifact_dir():
    """Where exported programs are kept: beside jax's persistent cache, or None when that is off."""
    cache = jax.config.jax_compilation_cache_dir
    return os.path.join(cache, "sdjax_exports") if cache else None


def _describe(x):
    sharding = getattr(x, "sharding", None)
    return (tuple(x.shape), str(x.dtype), str(sharding) if sharding is not None else "host")


class ExecutableCache:
    """Compiled executables by signature; `count` compilations so far. identity: what defines the functions
    beyond their name and arguments (the model's modules), hashable and stable across processes."""

    def __init__(self, identity=""):
        self._compiled, self._lock, self.count, self.identity = {}, threading.Lock(), 0, identity

    def get(self, name, fn, args, static, context, scope, timings):
        """fn(*args, **static) compiled (once per name, static, context and the arguments' shapes/dtypes) under
        `scope()` (a context manager of trace-time settings that `context`, hashable, stands for); the compile
        seconds go to timings[f"compile_{name}"]. The static keyword arguments are what fn receives besides args."""
        sig = (name, tuple(sorted(static.items())), context, jax.tree.structure(args),
               tuple((x.shape, x.dtype) for x in jax.tree.leaves(args)))
        with self._lock:  # one compilation of a signature, whichever thread asks first
            if sig not in self._compiled:
                t0 = time.perf_counter()
                with scope():
                    self._compiled[sig] = self._build(name, functools.partial(fn, **static), args, sig)
                self.count += 1
                timings[f"compile_{name}"] = timings.get(f"compile_{name}", 0.0) + time.perf_counter() - t0
            return self._compiled[sig]

    def _build(self, name, fn, args, sig):
        """The compiled executable: from a kept artifact, else exported (and kept) then compiled; a function that
        cannot be exported is compiled directly."""
        folder = _artifact_dir()
        if folder is None:
            return jax.jit(fn).lower(*args).compile()
        key = hashlib.sha256(repr((self.identity, sig[:3], str(sig[3]), [_describe(x) for x in jax.tree.leaves(args)],
                                   jax.__version__, flax.__version__, jax.default_backend(), _source_hash(),
                                   [getattr(jax.config, k) for k in _CONFIG])).encode()).hexdigest()
        path = os.path.join(folder, f"{name}-{key[:32]}.jaxexport")
        if os.path.exists(path):
            try:
                with open(path, "rb") as f:
                    return self._compile_exported(f.read(), args)
            except Exception as e:  # noqa: BLE001 (an unreadable artifact is made anew)
                log.warning("%s: the kept program %s could not be used (%s); tracing anew", name, path, e)
        try:
            data = export.export(jax.jit(fn), disabled_checks=_DISABLED)(*args).serialize()
        except Exception as e:  # noqa: BLE001 (anything export does not support: compile as usual)
            log.debug("%s: not exported (%s); compiled directly", name, e)
            return jax.jit(fn).lower(*args).compile()
        os.makedirs(folder, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)  # whole or not at all, also with several processes writing
        return self._compile_exported(data, args)

    @staticmethod
    def _compile_exported(data, args):
        """A serialized export compiled for `args`: the program as every run compiles it, so that XLA's cache
        serves the later ones."""
        return jax.jit(export.deserialize(bytearray(data)).call).lower(*args).compile()

"""Host memory: reuse freed blocks instead of returning them to the kernel (glibc only).

XLA's CPU runtime allocates each call's temporary buffers with malloc and frees them at the end. For
large blocks glibc answers with fresh `mmap`s (and from its per-thread arenas always), so every call
faults in its memory page by page again: 478k minor faults (1.9 GB, ~1.2 s of system time) per
SD 1.5 U-Net call at 512^2. With one arena, no mmap and no trimming, the second call reuses the
first call's pages: no faults. The price: the process keeps its peak heap (`release_freed_memory`
hands back what is free now, e.g. after loading weights).
"""
import ctypes
import ctypes.util
import functools
import importlib.util
import os

_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


@functools.cache
def _glibc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 (raises AttributeError outside glibc)
        return libc
    except (OSError, AttributeError):
        return None


ACCELERATOR_PLUGINS = ("jax_cuda13_plugin", "jax_cuda12_plugin", "jax_rocm7_plugin", "jax_rocm60_plugin", "libtpu")


def runs_on_cpu():
    """Whether jax will compute on the CPU, judged without starting jax (JAX_PLATFORMS, installed plugins)."""
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    return not any(importlib.util.find_spec(name) for name in ACCELERATOR_PLUGINS)


def keep_freed_memory():
    """Make malloc keep and reuse freed memory when jax computes on the CPU; True when applied (glibc, CPU).

    Call it first thing in a process, before jax (or torch) starts threads: threads that have
    allocated already keep their own arenas, which still map large blocks afresh. On GPU/TPU the big
    buffers live on the device and one malloc arena would only serialise the host threads."""
    libc = _glibc()
    if libc is None or not runs_on_cpu():
        return False
    # -1: never trim (man mallopt); 0 mmaps: large blocks come from the heap, where they are reused
    return all(libc.mallopt(opt, value) == 1
               for opt, value in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))


def release_freed_memory():
    """Return the heap's free pages to the kernel now (after loading: the file buffers); False outside glibc."""
    libc = _glibc()
    return bool(libc and libc.malloc_trim(0))

"""jax's persistent compilation cache for the CLIs: a second `sample.py` / `train.py` run with the same
shapes loads its executables instead of compiling them again."""
import os

ENV = "SDJAX_COMPILATION_CACHE"  # a folder, or "off"
DEFAULT = os.path.join(os.path.expanduser("~"), ".cache", "sdjax", "xla")


def enable(path=None):
    """Turn the cache on (before the first compilation) in `path`, else $SDJAX_COMPILATION_CACHE, else
    ~/.cache/sdjax/xla; "off" leaves it off. Returns the folder, or None."""
    path = path or os.environ.get(ENV) or DEFAULT
    if path == "off":
        return None
    import jax
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    # Every executable: a threshold on compile time makes the set of files depend on the machine's load (one
    # near the threshold is written on one run and not the next).
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path

"""Training: `sdjax.train.loop.train(config, workdir)`; `load_params` / `export` read a run's workdir."""
from sdjax.train.export import export, load_params

__all__ = ["export", "load_params"]

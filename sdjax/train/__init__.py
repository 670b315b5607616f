"""Training: `sdjax.train.loop.train(config, workdir)`; `load_params` / `export` / `export_lora` read a run's
workdir."""
from sdjax.train.export import export, export_lora, load_params

__all__ = ["export", "export_lora", "load_params"]

"""The LoRAs merged into a pipeline's params: loaded, rescaled and unloaded outside the compiled pieces, which take
the params as arguments (nothing recompiles). The base values of the kernels that LoRAs change are kept on the host,
so unloading restores their exact bits, and on the devices a merged kernel replaces its base one, leaf by leaf:
device memory stays the model's."""
import math
import os

import jax
import numpy as np

from sdjax.adapters import lora
from sdjax.weights.lora_files import read_lora


def check_scale(scale):
    if isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating)) or not math.isfinite(scale):
        raise ValueError(f"a LoRA's scale must be a finite number, got {scale!r}")
    return float(scale)


class Loras:
    """The LoRAs of one params tree ({component: nested dicts of device arrays}), which it changes in place."""

    def __init__(self, params):
        self.params = params
        self.layers, self.scales = {}, {}  # by name: {component: {kernel path: LowRank}}, the scale
        self._base = {}  # (component, kernel path) -> the host copy of a kernel some LoRA changes

    def load(self, path, scale=1.0, name=None):
        """Merge the LoRA file at `path` at `scale`; its name: `name`, or the file's stem."""
        scale = check_scale(scale)
        name = os.path.splitext(os.path.basename(path))[0] if name is None else name
        if name in self.layers:
            raise ValueError(f"a LoRA named {name!r} is loaded already; unload it or give another name")
        self.layers[name], self.scales[name] = read_lora(path, self.params), scale
        self._merge(self._keys(name))
        return name

    def set_scale(self, scale, name=None):
        """Rescale the LoRA `name` (None: every loaded one) from the base kernels."""
        scale = check_scale(scale)
        if name is not None and name not in self.layers:
            raise ValueError(f"no LoRA named {name!r} is loaded; loaded: {sorted(self.layers)}")
        names = list(self.layers) if name is None else [name]
        self.scales.update(dict.fromkeys(names, scale))
        self._merge(set().union(*(self._keys(n) for n in names)))

    def unload(self):
        """Remove every LoRA: the base kernels' exact bits back on the devices."""
        self.layers, self.scales = {}, {}
        self._merge(set(self._base))

    def _keys(self, name):
        return {(c, p) for c, layers in self.layers[name].items() for p in layers}

    def _merge(self, keys):
        """Set each (component, kernel path) of `keys` to its base plus the loaded LoRAs' updates, one at a time."""
        for component, path in sorted(keys):
            *parents, leaf = path
            node = self.params[component]
            for p in parents:
                node = node[p]
            old = node[leaf]
            if (component, path) not in self._base:  # a copy: on the CPU np.asarray would keep the device buffer
                self._base[(component, path)] = np.array(old)
            base = self._base[(component, path)]
            updates = [(layers[component][path], self.scales[n]) for n, layers in self.layers.items()
                       if path in layers.get(component, {})]
            if not updates:
                del self._base[(component, path)]
            node[leaf] = jax.device_put(base, old.sharding)
            if updates:  # on the devices, where the kernel lives
                node[leaf] = lora.merged(node[leaf], updates)
            del old  # freed before the next kernel is merged

"""Building a model from a reference config dict, the same way for the three models.

A config key is a dataclass field of the module, or has one value we implement (`only`), or does not
change the forward pass (`ignored`); keys starting with "_" are bookkeeping. Anything else, and any
value the model cannot run, is an UnsupportedConfig naming the model and the key.
"""
from sdjax.errors import UnsupportedConfig
from sdjax.models.activations import ACTIVATIONS

NOT_CONFIG = {"parent", "name", "dtype", "param_dtype", "remat"}  # module fields that are not config keys


def unsupported(model, key, value, expected):
    """The error for `key = value` of `model` (a class name), saying what is implemented."""
    return UnsupportedConfig(f"{model}: unsupported config {key} = {value!r}; expected {expected}")


def build(cls, cfg, overrides, only=None, ignored=(), unknown="refuse"):
    """cls(**fields of cfg, **overrides), checked: `only` {key: the one value implemented}, `ignored` keys
    dropped, other unknown keys refused (unknown="refuse") or dropped ("ignore"); then cls.check_config()."""
    fields = set(cls.__dataclass_fields__) - NOT_CONFIG
    args = {}
    for key, value in dict(cfg).items():
        if key.startswith("_") or key in ignored:
            continue
        if only and key in only:
            if value != only[key]:
                raise unsupported(cls.__name__, key, value, repr(only[key]))
        elif key in fields:
            args[key] = tuple(value) if isinstance(value, list) else value
        elif unknown == "refuse":
            raise UnsupportedConfig(f"{cls.__name__}: unknown config key {key!r} = {value!r}")
    model = cls(**{**args, **overrides})
    model.check_config()
    return model


def check_activation(model, key, name):
    if name not in ACTIVATIONS:
        raise unsupported(model, key, name, f"one of {sorted(ACTIVATIONS)}")

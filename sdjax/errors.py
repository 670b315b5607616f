"""The exceptions sdjax raises for bad input; both are ValueErrors, so the CLIs print them on one line."""


class UnsupportedConfig(ValueError):
    """A model config (diffusers / transformers keys) asks for something sdjax does not implement; the
    message names the model and the key."""


class WeightLoadError(ValueError):
    """A checkpoint cannot be loaded; the message says what was expected and what was found."""

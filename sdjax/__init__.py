"""sdjax: Stable Diffusion in JAX/Flax."""


def __getattr__(name):
    # Lazy, so that `import sdjax.<light module>` does not import JAX.
    if name == "StableDiffusion":
        from sdjax.pipeline import StableDiffusion
        return StableDiffusion
    raise AttributeError(f"module 'sdjax' has no attribute {name!r}")

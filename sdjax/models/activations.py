"""Non-linearities by the names configs use (diffusers' `get_activation`, transformers' `ACT2FN`)."""
import jax


def quick_gelu(x):
    """OpenAI CLIP's sigmoid approximation of GELU."""
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # both libraries' "gelu" is the exact one
    "relu": jax.nn.relu,
    "mish": jax.nn.mish,
    "quick_gelu": quick_gelu,
}

"""Multi-head attention shared by the U-Net, the autoencoder and the CLIP text tower."""
import jax
import jax.numpy as jnp


def multi_head_attention(q, k, v, num_heads, *, causal=False, upcast=False):
    """Scaled dot-product attention over heads.

    q: [B, Lq, D], k/v: [B, Lk, D] -> [B, Lq, D]. D is split into `num_heads` heads.
    Goes through `jax.nn.dot_product_attention` so GPUs can use the cuDNN kernel.
    `upcast` computes the softmax(QK^T)V in float32 (SD 2.x `upcast_attention`).
    """
    b, lq, d = q.shape
    dtype = q.dtype
    split = lambda x: x.reshape(x.shape[0], x.shape[1], num_heads, d // num_heads)
    q, k, v = split(q), split(k), split(v)
    if upcast:
        q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    out = jax.nn.dot_product_attention(q, k, v, is_causal=causal)
    return out.reshape(b, lq, d).astype(dtype)

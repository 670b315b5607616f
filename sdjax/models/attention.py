"""Multi-head attention shared by the U-Net, the autoencoder and the CLIP text tower.

On GPU/TPU it is `jax.nn.dot_product_attention` (cuDNN flash attention where available). On CPU,
XLA materialises every head's score matrix at once, which is memory-bound (6x slower than PyTorch
at 4096 tokens), so there attention runs head by head over query chunks whose scores fit in cache.
"""
import jax
import jax.numpy as jnp

ALL_AT_ONCE_BYTES = 8 * 2 ** 20  # CPU: below this many bytes of one image's scores, all heads in one batched matmul
CHUNK_BYTES = 16 * 2 ** 20       # CPU: bytes of scores per query chunk otherwise


def multi_head_attention(q, k, v, num_heads, *, causal=False, upcast=False, impl=None):
    """Scaled dot-product attention over heads.

    q: [B, Lq, D], k/v: [B, Lk, D] -> [B, Lq, D]. D is split into `num_heads` heads.
    `upcast` computes the softmax(QK^T)V in float32 (SD 2.x `upcast_attention`).
    `impl`: "chunked" (the CPU default) or "xla" / "cudnn" / None for jax.nn.dot_product_attention.
    """
    b, lq, d = q.shape
    dtype = q.dtype
    split = lambda x: x.reshape(x.shape[0], x.shape[1], num_heads, d // num_heads)
    q, k, v = split(q), split(k), split(v)
    if upcast:
        q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    if impl is None and jax.default_backend() == "cpu":
        impl = "chunked"
    if impl == "chunked":
        out = chunked_attention(q, k, v, causal=causal)
    else:
        out = jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=impl)
    return out.reshape(b, lq, d).astype(dtype)


def _softmax_attend(q, k, v, causal, offset=0):
    """softmax(q k^T) v for q: [..., Tq, Dh] (already scaled), k/v: [..., S, Dh]; scores in float32.

    `offset`: the position of q's first row, for the causal mask of a query chunk."""
    s = jnp.einsum("...qd,...kd->...qk", q, k, preferred_element_type=jnp.float32)
    if causal:
        rows = offset + jnp.arange(q.shape[-2])[:, None]
        s = jnp.where(jnp.arange(k.shape[-2])[None, :] <= rows, s, -jnp.inf)
    p = jnp.exp(s - s.max(-1, keepdims=True))
    out = jnp.einsum("...qk,...kd->...qd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out * (1.0 / p.sum(-1, keepdims=True))


def chunked_attention(q, k, v, *, causal=False):
    """Attention for q: [B, T, H, Dh], k/v: [B, S, H, Dh] -> [B, T, H, Dh] (q's dtype).

    Small problems go in one batched matmul; larger ones loop (lax.map) over heads and, within a
    head, over query chunks of at most CHUNK_BYTES of float32 scores. Same math as
    jax.nn.dot_product_attention; the loop keeps the scores in cache instead of memory."""
    b, t, h, dh = q.shape
    s = k.shape[1]
    heads = lambda x: x.transpose(0, 2, 1, 3).reshape(b * h, x.shape[1], dh)  # noqa: E731
    q, k, v = heads(q * jnp.asarray(dh ** -0.5, q.dtype)), heads(k), heads(v)
    if h * t * s * 4 <= ALL_AT_ONCE_BYTES:  # per image: an image's bits do not depend on its batch
        out = _softmax_attend(q, k, v, causal)
    else:
        cq = query_chunk(t, s)

        def head(x):
            qh, kh, vh = x
            chunks = (qh.reshape(t // cq, cq, dh), jnp.arange(0, t, cq))
            return jax.lax.map(lambda c: _softmax_attend(c[0], kh, vh, causal, c[1]), chunks).reshape(t, dh)
        out = jax.lax.map(head, (q, k, v))
    return out.astype(q.dtype).reshape(b, h, t, dh).transpose(0, 2, 1, 3)


def query_chunk(t, s):
    """The largest divisor of t whose [chunk, s] float32 scores fit in CHUNK_BYTES (at least 1)."""
    limit = max(CHUNK_BYTES // (4 * s), 1)
    return max(c for c in range(1, min(t, limit) + 1) if t % c == 0)

"""The CPU attention (all heads at once, or head by head over query chunks) against jax.nn.dot_product_attention."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdjax.models import attention


def qkv(b, t, s, h, d, dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(0), 3)
    return [jax.random.normal(k, (b, n, h, d), dtype) for k, n in zip(ks, (t, s, s))]


@pytest.mark.parametrize("chunk_bytes", [attention.CHUNK_BYTES, 4 * 77 * 6])  # whole head / 6-row chunks
@pytest.mark.parametrize("all_at_once", [True, False])
@pytest.mark.parametrize("causal", [False, True])
def test_chunked_matches_dot_product_attention(monkeypatch, chunk_bytes, all_at_once, causal):
    monkeypatch.setattr(attention, "CHUNK_BYTES", chunk_bytes)
    monkeypatch.setattr(attention, "ALL_AT_ONCE_BYTES", 2 ** 30 if all_at_once else 0)
    q, k, v = qkv(2, 77, 77, 3, 8)
    want = jax.nn.dot_product_attention(q, k, v, is_causal=causal)
    got = attention.chunked_attention(q, k, v, causal=causal)
    np.testing.assert_allclose(got, want, atol=2e-6)


def test_cross_attention_chunks_and_grads(monkeypatch):
    monkeypatch.setattr(attention, "ALL_AT_ONCE_BYTES", 0)
    monkeypatch.setattr(attention, "CHUNK_BYTES", 4 * 7 * 10)  # query chunks of 10 of the 30 rows
    assert attention.query_chunk(30, 7) == 10 and attention.query_chunk(31, 7) == 1
    q, k, v = qkv(2, 30, 7, 2, 4)
    np.testing.assert_allclose(attention.chunked_attention(q, k, v), jax.nn.dot_product_attention(q, k, v),
                               atol=2e-6)
    loss = lambda f: lambda *a: (f(*a) ** 2).sum()  # noqa: E731
    got = jax.grad(loss(attention.chunked_attention), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss(jax.nn.dot_product_attention), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=2e-5)


def test_multi_head_attention_impls_agree():
    q, k, v = (x.reshape(2, x.shape[1], -1) for x in qkv(2, 16, 16, 4, 8))
    outs = {}
    for name in ("auto", "chunked", "xla"):
        with attention.implementation(name):
            outs[name] = attention.multi_head_attention(q, k, v, 4, causal=True)
    np.testing.assert_allclose(outs["chunked"], outs["xla"], atol=2e-6)
    np.testing.assert_array_equal(outs["auto"], outs["chunked"])  # on CPU
    with pytest.raises(ValueError, match="attention must be one of"):
        attention.implementation("flashy").__enter__()


def test_bfloat16_scores_in_float32():
    q, k, v = qkv(1, 64, 64, 2, 16, jnp.bfloat16)
    got = attention.chunked_attention(q, k, v)
    assert got.dtype == jnp.bfloat16
    want = jax.nn.dot_product_attention(*(x.astype(jnp.float32) for x in (q, k, v)))
    np.testing.assert_allclose(got.astype(jnp.float32), want, atol=2e-2)

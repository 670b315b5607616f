"""Multi-head attention shared by the U-Net, the autoencoder and the CLIP text tower.

The implementation is chosen for the platform the code is lowered for (`jax.lax.platform_dependent`), or
forced with `implementation(name)` around tracing:
- "flash" on TPU: the Pallas TPU flash-attention kernel (jax.experimental.pallas.ops.tpu); on CUDA: the
  Pallas GPU (Triton) flash kernel, for bfloat16/float16. Scores never reach memory (SD 2.1 at 768²,
  batch 8 with guidance, would need ~27 GB for one layer's float32 scores). Sequence lengths that are
  not multiples of 128 (77-token cross-attention keys, the 8x8 level) and float32 on CUDA fall back to
  "xla"; head dims are zero-padded to what the kernels take (40/80/160 -> 64/128/256 on CUDA, 160 -> 256
  on TPU). The kernels accumulate scores in float32, which is SD 2.x's `upcast_attention`.
- "chunked" on CPU: XLA materialises every head's score matrix at once, which is memory-bound (6x slower
  than PyTorch at 4096 tokens), so attention runs head by head over query chunks that fit in cache.
- "xla": `jax.nn.dot_product_attention` as XLA ops; "cudnn": its cuDNN kernel (needs a GPU to trace), for the
  inputs the kernel takes, XLA for the others (`cudnn_attention`).

Over a mesh (`implementation(name, mesh)`), a batch split over the mesh's devices is attended by each
device on its own rows (`jax.shard_map`): XLA cannot partition a kernel's custom call, nor see through the
chunked path's loop over batch x heads, and would otherwise gather the whole batch onto every device.
"""
import contextlib
import contextvars
import functools
import logging
import math

import jax
from jax.sharding import PartitionSpec as P
import jax.numpy as jnp

ALL_AT_ONCE_BYTES = 8 * 2 ** 20  # CPU: below this many bytes of one image's scores, all heads in one batched matmul
CHUNK_BYTES = 16 * 2 ** 20       # CPU: bytes of scores per query chunk otherwise
IMPLEMENTATIONS = ("auto", "flash", "chunked", "xla", "cudnn")
FLASH_MULTIPLE = 128             # the flash kernels take sequence lengths that are multiples of this
_IMPLEMENTATION = contextvars.ContextVar("attention_implementation", default=("auto", None))
log = logging.getLogger("sdjax")


def check_name(name, backend):
    """ValueError unless `name` is one of IMPLEMENTATIONS that runs on `backend` (jax.default_backend())."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"attention must be one of {IMPLEMENTATIONS}, got {name!r}")
    if name in ("flash", "cudnn") and backend == "cpu":
        raise ValueError(f"attention {name!r} is a GPU/TPU kernel and jax computes on the CPU here; "
                         "use 'auto', 'chunked' or 'xla'")


@contextlib.contextmanager
def implementation(name, mesh=None):
    """Attention traced inside uses `name` (one of IMPLEMENTATIONS; "auto": chosen per platform at lowering);
    with a mesh, batches that split evenly over its devices are attended device by device (shard_map).

    A trace-time setting: enter it around tracing (jit's lower / the first call)."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"attention must be one of {IMPLEMENTATIONS}, got {name!r}")
    token = _IMPLEMENTATION.set((name, mesh if mesh is not None and mesh.size > 1 else None))
    try:
        yield
    finally:
        _IMPLEMENTATION.reset(token)


def scoped(fn, name, mesh=None):
    """fn traced with `implementation(name, mesh)` (wrap a function before jax.jit)."""
    def traced(*args, **kwargs):
        with implementation(name, mesh):
            return fn(*args, **kwargs)
    return traced


def multi_head_attention(q, k, v, num_heads, *, causal=False, upcast=False):
    """Scaled dot-product attention over heads.

    q: [B, Lq, D], k/v: [B, Lk, D] -> [B, Lq, D]. D is split into `num_heads` heads.
    `upcast` computes the softmax(QK^T)V in float32 (SD 2.x `upcast_attention`).
    """
    b, lq, d = q.shape
    dtype = q.dtype
    split = lambda x: x.reshape(x.shape[0], x.shape[1], num_heads, d // num_heads)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    impl, mesh = _IMPLEMENTATION.get()
    flash_shapes = lq % FLASH_MULTIPLE == 0 and k.shape[1] % FLASH_MULTIPLE == 0
    # the kernels accumulate in float32 anyway (cuDNN's fallback upcasts by itself)
    if upcast and not (impl in ("auto", "flash") and flash_shapes or impl == "cudnn"):
        q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    xla = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="xla")  # noqa: E731
    chunked = lambda q, k, v: chunked_attention(q, k, v, causal=causal)  # noqa: E731
    gpu = lambda q, k, v: (gpu_flash(q, k, v, causal) if flash_shapes and q.dtype in (jnp.bfloat16, jnp.float16)  # noqa: E731
                           else xla(q, k, v))
    tpu = lambda q, k, v: tpu_flash(q, k, v, causal) if flash_shapes else xla(q, k, v)  # noqa: E731
    if impl == "auto":
        attend = lambda q, k, v: jax.lax.platform_dependent(q, k, v, cpu=chunked, cuda=gpu, tpu=tpu, default=xla)  # noqa: E731
    elif impl == "flash":
        attend = lambda q, k, v: jax.lax.platform_dependent(q, k, v, cuda=gpu, default=tpu)  # noqa: E731
    elif impl == "cudnn":
        attend = lambda q, k, v: cudnn_attention(q, k, v, causal, upcast)  # noqa: E731
    else:
        attend = {"chunked": chunked, "xla": xla}[impl]
    if mesh is not None and b % mesh.size == 0:  # each device attends its own rows
        rows = P(tuple(mesh.axis_names))
        attend = jax.shard_map(attend, mesh=mesh, in_specs=(rows, rows, rows), out_specs=rows, check_vma=False)
    return attend(q, k, v).reshape(b, lq, d).astype(dtype)


def cudnn_attention(q, k, v, causal=False, upcast=False):
    """cuDNN's fused kernel (jax.nn.dot_product_attention), [B, T, H, Dh] layout, for the inputs it takes:
    bfloat16/float16, head dims it supports (at most 128, a multiple of 8, before Hopper). Half inputs go as
    they are, `upcast` or not: the kernel computes scores and softmax in float32 and multiplies the
    probabilities with V in the inputs' dtype, which is what SD 2.x's upcast_attention does in diffusers, so
    casting them to float32 would only make the kernel refuse them. Other inputs (float32: a model computing in
    float32, whose numerics a silent cast to half would change by ~1e-2; the VAE's 512-wide head) go to XLA
    attention, in float32 with `upcast`, with one log line per reason."""
    try:
        return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")
    except NotImplementedError as e:  # jax's check of the dtypes and shapes, raised while tracing
        _cudnn_fallback(str(e))
    if upcast:
        q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="xla")


@functools.cache
def _cudnn_fallback(reason):
    log.warning("attention='cudnn': %s; XLA attention for these inputs", reason)


def _pad_head_dim(x, to):
    return x if x.shape[-1] == to else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, to - x.shape[-1])])


def tpu_flash(q, k, v, causal=False):
    """Pallas TPU flash attention: q: [B, T, H, Dh], k/v: [B, S, H, Dh] -> [B, T, H, Dh]; T, S multiples of 128.
    Head dims over 128 are zero-padded to a multiple of 128 (zeros change neither scores nor outputs)."""
    from jax.experimental.pallas.ops.tpu import flash_attention as fa
    dh = q.shape[-1]
    to = dh if dh <= 128 else -(-dh // 128) * 128
    t, s = q.shape[1], k.shape[1]
    heads_first = lambda x: _pad_head_dim(x, to).transpose(0, 2, 1, 3)  # noqa: E731 [B, H, L, Dh]
    block = lambda n: math.gcd(n, 512)  # noqa: E731
    sizes = fa.BlockSizes(block_q=block(t), block_k_major=block(s), block_k=block(s), block_b=1,
                          block_q_major_dkv=block(t), block_k_major_dkv=block(s), block_k_dkv=block(s),
                          block_q_dkv=block(t), block_k_major_dq=block(s), block_k_dq=block(s), block_q_dq=block(t))
    out = fa.flash_attention(heads_first(q), heads_first(k), heads_first(v), causal=causal, sm_scale=dh ** -0.5,
                             block_sizes=sizes)
    return out.transpose(0, 2, 1, 3)[..., :dh]


def gpu_flash(q, k, v, causal=False, interpret=False):
    """Pallas GPU (Triton) flash attention, [B, T, H, Dh] layout; head dims zero-padded to a power of 2 >= 16.
    interpret: run the kernel in Pallas' interpreter (any platform; tests)."""
    from jax.experimental.pallas.ops.gpu import attention as ga
    dh = q.shape[-1]
    to = max(16, 1 << (dh - 1).bit_length())
    q, k, v = (_pad_head_dim(x, to) for x in (q, k, v))
    out = ga.mha(q, k, v, segment_ids=None, sm_scale=dh ** -0.5, causal=causal, interpret=interpret)
    return out[..., :dh]


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
    jax.nn.dot_product_attention; the loop keeps the scores in cache instead of memory, and (as in the
    flash kernels) gradients recompute them chunk by chunk."""
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
            # checkpointed: the backward pass recomputes a chunk's scores instead of keeping them all
            chunk = jax.checkpoint(lambda c: _softmax_attend(c[0], kh, vh, causal, c[1]))
            return jax.lax.map(chunk, chunks).reshape(t, dh)
        out = jax.lax.map(head, (q, k, v))
    return out.astype(q.dtype).reshape(b, h, t, dh).transpose(0, 2, 1, 3)


def query_chunk(t, s):
    """The largest divisor of t whose [chunk, s] float32 scores fit in CHUNK_BYTES (at least 1)."""
    limit = max(CHUNK_BYTES // (4 * s), 1)
    return max(c for c in range(1, min(t, limit) + 1) if t % c == 0)

"""Ragged paged attention: the XLA backend, which is also the test oracle.

The contract, shared by every backend (see `pipelive_jax.kernels.paged_attention`):

  q            [num_tokens, q_heads, head_dim]   new query tokens of all sequences, packed
  k_pages      [kv_heads, num_pages, page_size, head_dim]   one layer's key pool
  v_pages      [kv_heads, num_pages, page_size, head_dim]   one layer's value pool
  kv_lens      [max_seqs] int32     tokens in the cache per sequence, *including* the new ones
  block_tables [max_seqs, max_pages_per_seq] int32   page ids; entries past a sequence's end
                                    must be valid ids (page 0, the reserved padding page)
  cu_q_lens    [max_seqs + 1] int32 cumulative query lengths; sequence i owns tokens
                                    cu_q_lens[i] : cu_q_lens[i+1]
  num_seqs     [] or [1] int32      sequences in use; rows past it are padding
  -> out       [num_tokens, q_heads, head_dim], zero for padding tokens

Query token j (0-based within its chunk) of sequence i sits at absolute position
`kv_lens[i] - q_len_i + j` and attends causally to cache positions up to and including it, so one
call serves prefill chunks and single-token decodes together. Query head h reads KV head
`h // (q_heads // kv_heads)` (grouped-query attention of any group size).

This backend gathers each sequence's pages into a padded `[seqs, max_q_len, ...]` layout: XLA on
CPU is fastest on dense batched matmuls, and `max_q_len` is a static bucket the scheduler picks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Finite "minus infinity": (-inf) - (-inf) is NaN, so masked scores use a large finite value.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def _token_to_seq(cu_q_lens: jax.Array, num_tokens: int) -> tuple[jax.Array, jax.Array]:
    """For each packed token, the sequence it belongs to and its index within that chunk.

    Returns (seq [num_tokens] int32, j [num_tokens] int32).
    """
    t = jnp.arange(num_tokens, dtype=jnp.int32)
    seq = jnp.searchsorted(cu_q_lens[1:], t, side="right").astype(jnp.int32)
    seq = jnp.minimum(seq, cu_q_lens.shape[0] - 2)
    return seq, t - cu_q_lens[seq]


def paged_attention_xla(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    kv_lens: jax.Array,
    block_tables: jax.Array,
    cu_q_lens: jax.Array,
    num_seqs: jax.Array,
    *,
    sm_scale: float,
    max_q_len: int,
    soft_cap: float | None = None,
) -> jax.Array:
    """XLA implementation of the ragged paged-attention contract (module docstring).

    `max_q_len` (static) bounds every sequence's query length in this batch.
    """
    num_tokens, q_heads, head_dim = q.shape
    kv_heads, _, page_size, _ = k_pages.shape
    max_seqs, pages_per_seq = block_tables.shape
    group = q_heads // kv_heads
    ctx = pages_per_seq * page_size

    num_seqs = jnp.reshape(num_seqs, ()).astype(jnp.int32)
    seq_ids = jnp.arange(max_seqs, dtype=jnp.int32)
    q_lens = jnp.where(seq_ids < num_seqs, cu_q_lens[1:] - cu_q_lens[:-1], 0)  # [S]

    # Packed tokens -> padded [seqs, max_q_len].
    j = jnp.arange(max_q_len, dtype=jnp.int32)
    tok = jnp.clip(cu_q_lens[:-1, None] + j[None, :], 0, num_tokens - 1)  # [S, Qm]
    q_valid = j[None, :] < q_lens[:, None]  # [S, Qm]
    qp = q[tok].astype(jnp.float32).reshape(max_seqs, max_q_len, kv_heads, group, head_dim)

    # Each sequence's cache, contiguous: [kv_heads, S, ctx, head_dim].
    k = k_pages[:, block_tables].reshape(kv_heads, max_seqs, ctx, head_dim).astype(jnp.float32)
    v = v_pages[:, block_tables].reshape(kv_heads, max_seqs, ctx, head_dim).astype(jnp.float32)

    scores = jnp.einsum("sqhgd,hskd->shgqk", qp, k) * sm_scale  # [S, Hkv, G, Qm, ctx]
    if soft_cap is not None:
        scores = soft_cap * jnp.tanh(scores / soft_cap)
    q_pos = kv_lens[:, None] - q_lens[:, None] + j[None, :]  # [S, Qm]
    kv_pos = jnp.arange(ctx, dtype=jnp.int32)
    mask = (
        (kv_pos[None, None, :] <= q_pos[:, :, None])
        & (kv_pos[None, None, :] < kv_lens[:, None, None])
        & q_valid[:, :, None]
    )  # [S, Qm, ctx]
    # Stale slots past a sequence's end may hold anything (a reused page); 0 * NaN is NaN, so
    # zero them in V rather than relying on a zero softmax weight.
    in_seq = kv_pos[None, :] < kv_lens[:, None]  # [S, ctx]
    v = jnp.where(in_seq[None, :, :, None], v, 0.0)
    mask = mask[:, None, None]  # broadcast over (Hkv, G)
    scores = jnp.where(mask, scores, MASK_VALUE)
    m = jnp.max(scores, axis=-1, keepdims=True)
    p = jnp.where(mask, jnp.exp(scores - m), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom == 0.0, 1.0, denom)
    out = jnp.einsum("shgqk,hskd->sqhgd", p, v).reshape(max_seqs, max_q_len, q_heads, head_dim)

    # Padded -> packed tokens.
    seq, jt = _token_to_seq(cu_q_lens, num_tokens)
    valid_tok = jnp.arange(num_tokens) < cu_q_lens[num_seqs]
    res = out[seq, jnp.clip(jt, 0, max_q_len - 1)]
    return jnp.where(valid_tok[:, None, None], res, 0.0).astype(q.dtype)


def paged_attention_dense_reference(
    q, k_pages, v_pages, kv_lens, block_tables, cu_q_lens, num_seqs, *, sm_scale, soft_cap=None
):
    """Slow per-sequence loop over the same contract, in numpy-like jnp: a second oracle for tests.

    Host values (python ints) drive the loop, so this is not jittable; it exists so that the
    XLA backend itself is checked against something written differently.
    """
    import numpy as np

    q = np.asarray(q, np.float32)
    kp = np.asarray(k_pages, np.float32)
    vp = np.asarray(v_pages, np.float32)
    kv_lens = np.asarray(kv_lens)
    bt = np.asarray(block_tables)
    cu = np.asarray(cu_q_lens)
    n = int(np.reshape(np.asarray(num_seqs), ()))
    kv_heads, _, page_size, head_dim = kp.shape
    group = q.shape[1] // kv_heads
    out = np.zeros_like(q)
    for i in range(n):
        lo, hi = int(cu[i]), int(cu[i + 1])
        length = int(kv_lens[i])
        pages = bt[i, : (length + page_size - 1) // page_size]
        k = kp[:, pages].reshape(kv_heads, -1, head_dim)[:, :length]
        v = vp[:, pages].reshape(kv_heads, -1, head_dim)[:, :length]
        for t in range(lo, hi):
            pos = length - (hi - lo) + (t - lo)
            for h in range(q.shape[1]):
                s = k[h // group, : pos + 1] @ q[t, h] * sm_scale
                if soft_cap is not None:
                    s = soft_cap * np.tanh(s / soft_cap)
                w = np.exp(s - s.max())
                out[t, h] = (w / w.sum()) @ v[h // group, : pos + 1]
    return out

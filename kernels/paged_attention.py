"""Ragged paged attention: the XLA backend (the CPU serving path and the oracle for the kernels).

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

How this backend computes it, and why: queries go to a padded `[kv_heads, seqs, group *
max_q_len, head_dim]` layout (XLA on CPU is fastest on dense batched matmuls; `max_q_len` is a
static bucket the scheduler picks), then a loop walks the caches a chunk of pages at a time with
an online softmax (running max and sum, as flash attention does). The loop's trip count is
dynamic, `ceil(longest kv_len / chunk)`, so the work follows the real context, not the width of
the block table, and each chunk's gathered keys and values stay small enough to live in cache.
The version it replaced gathered each sequence's whole padded cache at once; on the 2-core CI
machine it was about 1.7x slower per layer for decode at 32 sequences (4.8 vs 2.8 ms) and 3x
for a 2048-token prefill chunk (737 vs 238 ms). Batches of decodes only (`max_q_len == 1`) take
a path of their own with the same loop (`_decode_attention_xla`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

# Finite "minus infinity": (-inf) - (-inf) is NaN, so masked scores use a large finite value.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)

# Keys per loop iteration: 64 was fastest for prefill chunks on CPU; the decode path
# (one query token per sequence) was fastest at 32 (see `_decode_attention_xla`).
CHUNK_TOKENS = 64
DECODE_CHUNK_TOKENS = 32


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
    chunk_tokens: int | None = None,
    max_long_seqs: int | None = None,
) -> jax.Array:
    """XLA implementation of the ragged paged-attention contract (module docstring).

    `max_q_len` (static) bounds every sequence's query length in this batch; `chunk_tokens`
    (static, rounded to whole pages) is how many cache positions one loop iteration reads
    (None: DECODE_CHUNK_TOKENS for decode batches, CHUNK_TOKENS otherwise).

    `max_long_seqs` (static, optional) promises that at most that many sequences have more than
    one query token. A mixed step (a prefill chunk or two among many decodes) then runs the
    one-token sequences through the decode path and only the others through the padded
    `max_q_len` layout, instead of padding every decode to a prefill chunk's length. A broken
    promise gives wrong output for the long sequences past the bound (the engine asserts it).
    """
    decode_chunk = DECODE_CHUNK_TOKENS if chunk_tokens is None else chunk_tokens
    if max_q_len == 1:
        return _decode_attention_xla(
            q,
            k_pages,
            v_pages,
            kv_lens,
            block_tables,
            cu_q_lens,
            num_seqs,
            sm_scale=sm_scale,
            soft_cap=soft_cap,
            chunk_tokens=decode_chunk,
        )
    num_tokens = q.shape[0]
    max_seqs = block_tables.shape[0]
    chunk = CHUNK_TOKENS if chunk_tokens is None else chunk_tokens
    num_seqs = jnp.reshape(num_seqs, ()).astype(jnp.int32)
    seq_valid = jnp.arange(max_seqs, dtype=jnp.int32) < num_seqs
    q_lens = jnp.where(seq_valid, cu_q_lens[1:] - cu_q_lens[:-1], 0)  # [S]
    kv_lens = jnp.where(seq_valid, kv_lens, 0)
    valid_tok = jnp.arange(num_tokens) < cu_q_lens[num_seqs]

    if max_long_seqs is None or max_long_seqs >= max_seqs:
        out = _padded_rows_attention(
            q, k_pages, v_pages, cu_q_lens[:-1], q_lens, kv_lens, block_tables,
            sm_scale=sm_scale, max_q_len=max_q_len, soft_cap=soft_cap, chunk_tokens=chunk,
        )  # fmt: skip
        # Padded -> packed tokens.
        seq, jt = _token_to_seq(cu_q_lens, num_tokens)
        res = out[seq, jnp.clip(jt, 0, max_q_len - 1)]
        return jnp.where(valid_tok[:, None, None], res, 0.0).astype(q.dtype)

    # Split: the one-token sequences as decodes (the long ones get kv_len 0 there, so that the
    # decode loop stops at the longest decode's context), then the long sequences' chunks.
    long = q_lens > 1
    dec = _decode_attention_xla(
        q, k_pages, v_pages, jnp.where(long, 0, kv_lens), block_tables, cu_q_lens, num_seqs,
        sm_scale=sm_scale, soft_cap=soft_cap, chunk_tokens=decode_chunk,
    )  # fmt: skip
    r = max(1, max_long_seqs)
    (rows,) = jnp.nonzero(long, size=r, fill_value=0)
    row_ok = jnp.arange(r) < jnp.sum(long)
    starts = cu_q_lens[rows]
    lens = jnp.where(row_ok, q_lens[rows], 0)
    out = _padded_rows_attention(
        q, k_pages, v_pages, starts, lens, jnp.where(row_ok, kv_lens[rows], 0),
        block_tables[rows], sm_scale=sm_scale, max_q_len=max_q_len, soft_cap=soft_cap,
        chunk_tokens=chunk,
    )  # fmt: skip  # [R, Qm, Hq, D]
    j = jnp.arange(max_q_len, dtype=jnp.int32)
    dest = jnp.where(j[None, :] < lens[:, None], starts[:, None] + j[None, :], num_tokens)
    merged = dec.astype(jnp.float32).at[dest.reshape(-1)].set(
        out.reshape(-1, *out.shape[2:]), mode="drop"
    )
    return jnp.where(valid_tok[:, None, None], merged, 0.0).astype(q.dtype)


def _padded_rows_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    starts: jax.Array,
    q_lens: jax.Array,
    kv_lens: jax.Array,
    block_tables: jax.Array,
    *,
    sm_scale: float,
    max_q_len: int,
    soft_cap: float | None,
    chunk_tokens: int,
) -> jax.Array:
    """Attention for R rows (sequences), each's query chunk padded to `max_q_len`.

    starts [R] first packed token of each row; q_lens [R] its tokens (0: an empty row);
    kv_lens [R] cached tokens including the chunk (0 for empty rows); block_tables [R, M].
    Returns out [R, max_q_len, q_heads, head_dim] float32 (padding positions: zero or junk).
    """
    num_tokens, q_heads, head_dim = q.shape
    kv_heads, _, page_size, _ = k_pages.shape
    max_seqs, pages_per_seq = block_tables.shape
    group = q_heads // kv_heads
    gq = group * max_q_len
    chunk = max(1, min(chunk_tokens // page_size, pages_per_seq))  # pages per iteration
    n_max = -(-pages_per_seq // chunk)
    if n_max * chunk != pages_per_seq:  # pad with page 0, the reserved padding page
        block_tables = jnp.pad(block_tables, ((0, 0), (0, n_max * chunk - pages_per_seq)))
    ct = chunk * page_size  # cache positions per iteration

    # Packed tokens -> [Hkv, R, G * Qm, D], rows ordered (g, j).
    j = jnp.arange(max_q_len, dtype=jnp.int32)
    tok = jnp.clip(starts[:, None] + j[None, :], 0, num_tokens - 1)  # [R, Qm]
    q_valid = j[None, :] < q_lens[:, None]  # [R, Qm]
    qp = q[tok].astype(jnp.float32).reshape(max_seqs, max_q_len, kv_heads, group, head_dim)
    qp = qp.transpose(2, 0, 3, 1, 4).reshape(kv_heads, max_seqs, gq, head_dim)
    # Absolute position of each query row; -1 (sees nothing) for padding rows.
    q_pos = jnp.where(q_valid, kv_lens[:, None] - q_lens[:, None] + j[None, :], -1)  # [R, Qm]
    q_pos = jnp.broadcast_to(q_pos[:, None, :], (max_seqs, group, max_q_len)).reshape(
        max_seqs, gq
    )

    def body(i, carry):
        m, denom, acc = carry  # [Hkv, R, GQ, 1], [Hkv, R, GQ, 1], [Hkv, R, GQ, D]
        pages = lax.dynamic_slice_in_dim(block_tables, i * chunk, chunk, axis=1)  # [R, C]
        k = k_pages[:, pages].reshape(kv_heads, max_seqs, ct, head_dim).astype(jnp.float32)
        v = v_pages[:, pages].reshape(kv_heads, max_seqs, ct, head_dim).astype(jnp.float32)
        s = jnp.einsum("hsqd,hskd->hsqk", qp, k) * sm_scale  # [Hkv, R, GQ, ct]
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        kv_pos = i * ct + jnp.arange(ct, dtype=jnp.int32)
        in_seq = kv_pos[None, :] < kv_lens[:, None]  # [R, ct]
        mask = ((kv_pos[None, None, :] <= q_pos[:, :, None]) & in_seq[:, None, :])[None]
        s = jnp.where(mask, s, MASK_VALUE)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1, keepdims=True))
        alpha = jnp.exp(m - m_new)
        p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
        # Stale slots past a sequence's end may hold anything (a reused page); 0 * NaN is NaN,
        # so zero them in V rather than relying on a zero softmax weight.
        v = jnp.where(in_seq[None, :, :, None], v, 0.0)
        acc = acc * alpha + jnp.einsum("hsqk,hskd->hsqd", p, v)
        return m_new, denom * alpha + jnp.sum(p, axis=-1, keepdims=True), acc

    n_chunks = jnp.minimum((jnp.max(kv_lens) + ct - 1) // ct, n_max)
    init = (
        jnp.full((kv_heads, max_seqs, gq, 1), MASK_VALUE, jnp.float32),
        jnp.zeros((kv_heads, max_seqs, gq, 1), jnp.float32),
        jnp.zeros((kv_heads, max_seqs, gq, head_dim), jnp.float32),
    )
    _, denom, acc = lax.fori_loop(0, n_chunks, body, init)
    out = acc / jnp.where(denom == 0.0, 1.0, denom)
    out = out.reshape(kv_heads, max_seqs, group, max_q_len, head_dim)
    return out.transpose(1, 3, 0, 2, 4).reshape(max_seqs, max_q_len, q_heads, head_dim)


def _decode_attention_xla(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    kv_lens: jax.Array,
    block_tables: jax.Array,
    cu_q_lens: jax.Array,
    num_seqs: jax.Array,
    *,
    sm_scale: float,
    soft_cap: float | None,
    chunk_tokens: int,
) -> jax.Array:
    """The contract when every sequence has at most one new token (`max_q_len == 1`): decode.

    Why a path of its own: decode steps are most of serving, and with one query token per
    sequence there is no causal mask inside the chunk and no padded query layout. Queries stay
    `[S, kv_heads, group, head_dim]` and multiply the gathered pages as they come,
    `[kv_heads, S, pages, page_size, head_dim]`, without reshaping them into a new buffer, and
    a chunk is 32 keys rather than 64 (the gathered chunk stays in L1/L2 with the scores). On a
    2-core Xeon, a whole SmolLM2 decode step at 32 sequences (the model's 30 layers, weights
    and LM head included) took 0.72-0.80x the time it took on the general path, at contexts of
    160 to 500 tokens; at 8 sequences, where the weights dominate, about the same.

    Sequence i's token (if any) is packed token cu_q_lens[i + 1] - 1; its position is
    kv_lens[i] - 1. In the split of `paged_attention_xla` longer sequences come with kv_len 0
    (output zero) and the caller overwrites their tokens.
    """
    num_tokens, q_heads, head_dim = q.shape
    kv_heads, _, page_size, _ = k_pages.shape
    max_seqs, pages_per_seq = block_tables.shape
    group = q_heads // kv_heads
    chunk = max(1, min(chunk_tokens // page_size, pages_per_seq))  # pages per iteration
    n_max = -(-pages_per_seq // chunk)
    if n_max * chunk != pages_per_seq:  # pad with page 0, the reserved padding page
        block_tables = jnp.pad(block_tables, ((0, 0), (0, n_max * chunk - pages_per_seq)))
    ct = chunk * page_size

    num_seqs = jnp.reshape(num_seqs, ()).astype(jnp.int32)
    seq_valid = jnp.arange(max_seqs, dtype=jnp.int32) < num_seqs
    has_tok = seq_valid & (cu_q_lens[1:] > cu_q_lens[:-1])  # [S]
    kv_lens = jnp.where(has_tok, kv_lens, 0)
    tok = jnp.clip(cu_q_lens[1:] - 1, 0, num_tokens - 1)  # [S] each sequence's last token
    qp = q[tok].astype(jnp.float32).reshape(max_seqs, kv_heads, group, head_dim)
    if soft_cap is None:
        qp = qp * sm_scale  # scale the few queries once, not every chunk's scores

    def body(i, carry):
        m, denom, acc = carry  # [S, Hkv, G], [S, Hkv, G], [S, Hkv, G, D]
        pages = lax.dynamic_slice_in_dim(block_tables, i * chunk, chunk, axis=1)  # [S, C]
        k = k_pages[:, pages].astype(jnp.float32)  # [Hkv, S, C, ps, D]
        v = v_pages[:, pages].astype(jnp.float32)
        s = jnp.einsum("shgd,hscpd->shgcp", qp, k).reshape(max_seqs, kv_heads, group, ct)
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s * sm_scale / soft_cap)
        kv_pos = i * ct + jnp.arange(ct, dtype=jnp.int32)
        in_seq = kv_pos[None, :] < kv_lens[:, None]  # [S, ct]
        s = jnp.where(in_seq[:, None, None, :], s, MASK_VALUE)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        alpha = jnp.exp(m - m_new)
        p = jnp.where(in_seq[:, None, None, :], jnp.exp(s - m_new[..., None]), 0.0)
        # Stale slots past a sequence's end may hold anything (see the general path).
        v = jnp.where(in_seq.reshape(1, max_seqs, chunk, page_size, 1), v, 0.0)
        pv = jnp.einsum("shgcp,hscpd->shgd", p.reshape(max_seqs, kv_heads, group, chunk, page_size), v)
        return m_new, denom * alpha + jnp.sum(p, axis=-1), acc * alpha[..., None] + pv

    n_chunks = jnp.minimum((jnp.max(kv_lens) + ct - 1) // ct, n_max)
    init = (
        jnp.full((max_seqs, kv_heads, group), MASK_VALUE, jnp.float32),
        jnp.zeros((max_seqs, kv_heads, group), jnp.float32),
        jnp.zeros((max_seqs, kv_heads, group, head_dim), jnp.float32),
    )
    _, denom, acc = lax.fori_loop(0, n_chunks, body, init)
    out = acc / jnp.where(denom == 0.0, 1.0, denom)[..., None]  # [S, Hkv, G, D]
    out = out.reshape(max_seqs, q_heads, head_dim)

    # Per sequence -> packed tokens (a token past the last sequence's is padding: zero).
    seq, _ = _token_to_seq(cu_q_lens, num_tokens)
    valid_tok = jnp.arange(num_tokens) < cu_q_lens[num_seqs]
    return jnp.where(valid_tok[:, None, None], out[seq], 0.0).astype(q.dtype)


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

"""Ragged paged attention as a Pallas kernel for NVIDIA GPUs (Triton lowering).

Same contract as the XLA backend (`pipelive_jax.kernels.paged_attention`, module docstring):
packed queries of prefill chunks and decodes together, per-sequence `kv_lens`, a block table of
page ids, GQA of any group size, optional logit soft cap, zeros for padding tokens.

Layout inside the kernel. The wrapper regroups the packed queries per (sequence, KV head) into
blocks of `rows = block_q * group_p` query rows: `block_q` query tokens times the `group` query
heads that share one KV head, the group zero-padded to a power of two `group_p`. One program of
the grid `(max_seqs, kv_heads, q_blocks)` owns one such block; it walks the sequence's pages in
steps of `pages_per_step` pages (gathered from the pool through the block table with a vector
index, since scalar prefetch is TPU-only), with a flash-style online softmax over the steps.

Why this shape: every K/V page a program loads serves all `group` heads and `block_q` tokens at
once (a decode is memory-bound, so reuse of each loaded page is what counts), and Triton's dot
needs power-of-two operand dims of at least 16, which the padded row count provides even for a
single decode token with a group of 3.

Beyond the contract, cache slots outside a sequence (even NaN) and cu_q_lens entries past
num_seqs never affect the output. Not done yet: splitting one sequence's KV across programs
(flash-decoding); a decode grid of batch x kv_heads programs leaves SMs idle at small batch.

All GPU tiling numbers live in `BlockSizes`. The same kernel runs on CPU with `interpret=True`
(that is how the tests run it) with the same block sizes, so padding paths are exercised there.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pipelive_jax.errors import KernelInputError
from pipelive_jax.kernels import validate_attention_inputs
from pipelive_jax.kernels.paged_attention import MASK_VALUE  # finite: (-inf) - (-inf) is NaN

_LOG2E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """GPU tiling of the kernel: the one place these numbers live.

    block_kv:   KV tokens per inner step; a step gathers `max(1, block_kv // page_size)` pages.
    min_rows:   fewest query rows (tokens x padded group) per program; Triton dots need >= 16.
    max_rows:   most query rows per program (bounds registers: rows x head_dim f32 accumulator).
    num_warps, num_stages: Triton launch parameters.
    """

    block_kv: int = 64
    min_rows: int = 16
    max_rows: int = 64
    num_warps: int = 4
    num_stages: int = 2


DEFAULT_BLOCK_SIZES = BlockSizes()


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class _Tiling:
    """Static tiling derived from the shapes and `BlockSizes` (all Python ints)."""

    group: int  # query heads per KV head
    group_p: int  # group padded to a power of two
    block_q: int  # query tokens per program
    q_len_p: int  # max_q_len padded to a multiple of block_q
    pages_per_step: int
    pages_per_seq_p: int  # block-table width padded to a multiple of pages_per_step

    @property
    def rows(self) -> int:
        return self.block_q * self.group_p

    @property
    def q_blocks(self) -> int:
        return self.q_len_p // self.block_q


def _tiling(
    q_heads: int, kv_heads: int, page_size: int, pages_per_seq: int, max_q_len: int, bs: BlockSizes
) -> _Tiling:
    group = q_heads // kv_heads
    group_p = _next_pow2(group)
    lo = max(1, -(-bs.min_rows // group_p))
    hi = max(1, bs.max_rows // group_p)
    block_q = min(hi, max(lo, _next_pow2(max_q_len)))
    q_len_p = -(-max_q_len // block_q) * block_q
    pages_per_step = max(1, bs.block_kv // page_size)
    pages_per_seq_p = -(-pages_per_seq // pages_per_step) * pages_per_step
    return _Tiling(group, group_p, block_q, q_len_p, pages_per_step, pages_per_seq_p)


def ragged_paged_attention_kernel(
    # inputs
    kv_lens_ref,  # [max_seqs] int32, whole array
    q_lens_ref,  # [max_seqs] int32, whole array; 0 for padding sequences
    block_tables_ref,  # [max_seqs, pages_per_seq_p] int32, whole array
    q_ref,  # [rows, head_dim]   row r: token r // group_p of the block, head r % group_p
    k_pages_ref,  # [num_pages, page_size, head_dim]   this program's KV head
    v_pages_ref,  # [num_pages, page_size, head_dim]
    # outputs
    o_ref: Any,  # [rows, head_dim]
    *,
    sm_scale: float,
    soft_cap: float | None,
    block_q: int,
    group_p: int,
    pages_per_step: int,
):
    seq, q_block = pl.program_id(0), pl.program_id(2)
    rows, head_dim = q_ref.shape
    _, page_size, _ = k_pages_ref.shape
    block_k = pages_per_step * page_size
    max_steps = block_tables_ref.shape[1] // pages_per_step

    kv_len = kv_lens_ref[seq]
    q_len = q_lens_ref[seq]
    # Query token of each row within its chunk, and its absolute position in the sequence.
    q_tok = q_block * block_q + lax.div(jnp.arange(rows, dtype=jnp.int32), jnp.int32(group_p))
    q_pos = kv_len - q_len + q_tok  # [rows]
    row_valid = q_tok < q_len  # [rows]

    # Causality bounds the KV this block reads: up to its last valid row's position.
    last_tok = jnp.minimum(q_len, (q_block + 1) * block_q)  # exclusive
    kv_needed = jnp.where(q_block * block_q < q_len, kv_len - q_len + last_tok, 0)
    num_steps = jnp.minimum(lax.div(kv_needed + block_k - 1, block_k), max_steps)

    q = q_ref[...]
    compute_dtype = jnp.promote_types(q.dtype, k_pages_ref.dtype)
    q = q.astype(compute_dtype)
    kv_iota = jnp.arange(block_k, dtype=jnp.int32)

    def body(step, carry):
        o_prev, m_prev, l_prev = carry  # [rows, head_dim], [rows], [rows]; f32
        page_ids = block_tables_ref[seq, pl.ds(step * pages_per_step, pages_per_step)]
        k = k_pages_ref[page_ids].reshape(block_k, head_dim).astype(compute_dtype)
        v = v_pages_ref[page_ids].reshape(block_k, head_dim)

        s = plgpu.dot(q, k, trans_b=True) * sm_scale  # [rows, block_k] f32
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        kv_pos = step * block_k + kv_iota  # [block_k]
        mask = (kv_pos[None, :] <= q_pos[:, None]) & row_valid[:, None]  # [rows, block_k]
        s = jnp.where(mask, s * _LOG2E, MASK_VALUE)

        m_next = jnp.maximum(m_prev, s.max(axis=-1))
        correction = jnp.exp2(m_prev - m_next)
        p = jnp.where(mask, jnp.exp2(s - m_next[:, None]), 0.0)
        l_next = correction * l_prev + p.sum(axis=-1)
        # Slots past kv_len in the last page may hold anything, even NaN; 0 * NaN is NaN.
        kv_valid = (kv_pos < kv_len)[:, None]
        v = jnp.where(kv_valid, v, jnp.zeros_like(v))
        pv_dtype = v.dtype if v.dtype != jnp.float32 else compute_dtype
        o_next = correction[:, None] * o_prev + plgpu.dot(p.astype(pv_dtype), v.astype(pv_dtype))
        return o_next, m_next, l_next

    acc = jnp.zeros((rows, head_dim), jnp.float32)
    row_max = jnp.full((rows,), MASK_VALUE, jnp.float32)
    row_sum = jnp.zeros((rows,), jnp.float32)
    acc, row_max, row_sum = lax.fori_loop(0, num_steps, body, (acc, row_max, row_sum))
    # Rows with nothing to attend to (padding) have row_sum == 0 and acc == 0: they give zeros.
    o_ref[...] = (acc / jnp.where(row_sum > 0.0, row_sum, 1.0)[:, None]).astype(o_ref.dtype)


def _pack_queries(q, cu_q_lens, t: _Tiling, kv_heads: int):
    """Packed [num_tokens, q_heads, D] -> [max_seqs, kv_heads, q_blocks, rows, D]."""
    num_tokens, _, head_dim = q.shape
    max_seqs = cu_q_lens.shape[0] - 1
    j = jnp.arange(t.q_len_p, dtype=jnp.int32)
    tok = jnp.clip(cu_q_lens[:-1, None] + j[None, :], 0, num_tokens - 1)  # [S, Qp]
    # Rows past a chunk's end read whatever token follows; the kernel masks them out.
    qp = q[tok].reshape(max_seqs, t.q_len_p, kv_heads, t.group, head_dim)
    qp = jnp.pad(qp, ((0, 0), (0, 0), (0, 0), (0, t.group_p - t.group), (0, 0)))
    qp = qp.transpose(0, 2, 1, 3, 4)  # [S, Hkv, Qp, Gp, D]
    return qp.reshape(max_seqs, kv_heads, t.q_blocks, t.rows, head_dim)


def _unpack_outputs(o, cu_q_lens, num_seqs, t: _Tiling, num_tokens: int):
    """[max_seqs, kv_heads, q_blocks, rows, D] -> packed [num_tokens, q_heads, D], padding zero."""
    max_seqs, kv_heads, _, _, head_dim = o.shape
    o = o.reshape(max_seqs, kv_heads, t.q_len_p, t.group_p, head_dim)[:, :, :, : t.group]
    o = o.transpose(0, 2, 1, 3, 4).reshape(max_seqs, t.q_len_p, kv_heads * t.group, head_dim)
    tok = jnp.arange(num_tokens, dtype=jnp.int32)
    # Token t belongs to the number of live sequences that end at or before it. Counting (not
    # searchsorted) holds whatever cu_q_lens holds past num_seqs.
    live = jnp.arange(max_seqs) < num_seqs
    seq = jnp.sum((tok[:, None] >= cu_q_lens[None, 1:]) & live[None, :], axis=1, dtype=jnp.int32)
    seq = jnp.minimum(seq, max_seqs - 1)
    j = jnp.clip(tok - cu_q_lens[seq], 0, t.q_len_p - 1)
    valid = tok < cu_q_lens[num_seqs]
    return jnp.where(valid[:, None, None], o[seq, j], 0)


def _paged_attention_unbatched(
    q_blocks: jax.Array,  # [max_seqs, kv_heads, q_blocks, rows, head_dim]
    k_pages: jax.Array,  # [kv_heads, num_pages, page_size, head_dim]
    v_pages: jax.Array,  # [kv_heads, num_pages, page_size, head_dim]
    kv_lens: jax.Array,  # [max_seqs] int32
    q_lens: jax.Array,  # [max_seqs] int32
    block_tables: jax.Array,  # [max_seqs, pages_per_seq_p] int32
    *,
    t: _Tiling,
    sm_scale: float,
    soft_cap: float | None,
    block_sizes: BlockSizes,
    interpret: bool,
) -> jax.Array:
    """Builds the grid and BlockSpecs and calls the kernel; output shaped like `q_blocks`."""
    max_seqs, kv_heads, num_q_blocks, rows, head_dim = q_blocks.shape
    _, num_pages, page_size, _ = k_pages.shape
    kernel = functools.partial(
        ragged_paged_attention_kernel,
        sm_scale=sm_scale,
        soft_cap=soft_cap,
        block_q=t.block_q,
        group_p=t.group_p,
        pages_per_step=t.pages_per_step,
    )
    whole = lambda shape: pl.BlockSpec(shape, lambda s, h, i: (0,) * len(shape))  # noqa: E731
    q_spec = pl.BlockSpec((None, None, None, rows, head_dim), lambda s, h, i: (s, h, i, 0, 0))
    pool_spec = pl.BlockSpec((None, num_pages, page_size, head_dim), lambda s, h, i: (h, 0, 0, 0))
    return pl.pallas_call(
        kernel,
        grid=(max_seqs, kv_heads, num_q_blocks),
        in_specs=[
            whole(kv_lens.shape),
            whole(q_lens.shape),
            whole(block_tables.shape),
            q_spec,
            pool_spec,
            pool_spec,
        ],
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q_blocks.shape, q_blocks.dtype),
        compiler_params=plgpu.CompilerParams(
            num_warps=block_sizes.num_warps, num_stages=block_sizes.num_stages
        ),
        interpret=interpret,
        name=f"ragged_paged_attention_rows{rows}_kv{t.pages_per_step * page_size}",
    )(kv_lens, q_lens, block_tables, q_blocks, k_pages, v_pages)


def _check_gpu_shapes(head_dim: int, page_size: int, t: _Tiling) -> None:
    """Triton needs power-of-two tensor sizes and dot dims >= 16 (compiled mode only)."""
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise KernelInputError(
            f"the compiled Pallas kernel needs head_dim a power of two >= 16, got {head_dim};"
            " use backend='xla' or 'pallas_interpret'"
        )
    if page_size & (page_size - 1):
        raise KernelInputError(
            f"the compiled Pallas kernel needs page_size a power of two, got {page_size}"
        )
    if t.pages_per_step * page_size < 16:
        raise KernelInputError(
            f"KV block of {t.pages_per_step * page_size} tokens is under 16; raise"
            " BlockSizes.block_kv"
        )


@functools.partial(
    jax.jit,
    static_argnames=["sm_scale", "max_q_len", "soft_cap", "interpret", "block_sizes"],
)
def paged_attention_pallas(
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
    interpret: bool = False,
    block_sizes: BlockSizes = DEFAULT_BLOCK_SIZES,
) -> jax.Array:
    """Ragged paged attention (contract in `paged_attention.py`) as a Pallas kernel.

    Args:
      q: [num_tokens, q_heads, head_dim] float32 / bfloat16 / float16, packed query tokens.
      k_pages, v_pages: [kv_heads, num_pages, page_size, head_dim], one layer's pools.
      kv_lens: [max_seqs] int32, cached tokens per sequence including the new ones.
      block_tables: [max_seqs, max_pages_per_seq] int32 page ids (page 0 past a sequence's end).
      cu_q_lens: [max_seqs + 1] int32 cumulative query lengths.
      num_seqs: [] or [1] int32, sequences in use.
      sm_scale: softmax scale (static).
      max_q_len: static bound on every sequence's query length in this batch.
      soft_cap: optional logit soft cap, `soft_cap * tanh(s / soft_cap)` (static).
      interpret: run the kernel with the Pallas interpreter (CPU tests).
      block_sizes: GPU tiling (static); the default suits head_dim 64-128.

    Returns:
      [num_tokens, q_heads, head_dim] in q's dtype; rows of padding tokens are zero.
      Scores, softmax statistics and the output accumulate in float32.
    """
    validate_attention_inputs(q, k_pages, v_pages, kv_lens, block_tables, cu_q_lens)
    if max_q_len < 1:
        raise KernelInputError(f"max_q_len must be >= 1, got {max_q_len}")
    num_tokens, q_heads, head_dim = q.shape
    kv_heads, _, page_size, _ = k_pages.shape
    max_seqs, pages_per_seq = block_tables.shape
    t = _tiling(q_heads, kv_heads, page_size, pages_per_seq, max_q_len, block_sizes)
    if not interpret:
        _check_gpu_shapes(head_dim, page_size, t)

    num_seqs = jnp.reshape(num_seqs, ()).astype(jnp.int32)
    kv_lens = kv_lens.astype(jnp.int32)
    cu_q_lens = cu_q_lens.astype(jnp.int32)
    q_lens = jnp.where(jnp.arange(max_seqs) < num_seqs, cu_q_lens[1:] - cu_q_lens[:-1], 0).astype(
        jnp.int32
    )
    # Past a sequence's end the table holds page 0, so the padded columns do too.
    block_tables = jnp.pad(
        block_tables.astype(jnp.int32), ((0, 0), (0, t.pages_per_seq_p - pages_per_seq))
    )

    q_blocks = _pack_queries(q, cu_q_lens, t, kv_heads)
    o = _paged_attention_unbatched(
        q_blocks,
        k_pages,
        v_pages,
        kv_lens,
        q_lens,
        block_tables,
        t=t,
        sm_scale=sm_scale,
        soft_cap=soft_cap,
        block_sizes=block_sizes,
        interpret=interpret,
    )
    return _unpack_outputs(o, cu_q_lens, num_seqs, t, num_tokens).astype(q.dtype)

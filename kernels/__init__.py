"""Paged-attention kernels and KV write, with backend selection in one place.

Backends (all over the same layout and contract, see `paged_attention.py`):
  "xla"               the XLA reference backend: the CPU serving path and the test oracle;
  "pallas"            our Pallas kernel compiled for the GPU;
  "pallas_interpret"  the same kernel under `interpret=True`: how tests run it on CPU.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from pipelive_jax.errors import KernelInputError
from pipelive_jax.kernels.kv_write import write_kv
from pipelive_jax.kernels.paged_attention import (
    paged_attention_dense_reference,
    paged_attention_xla,
)

Backend = Literal["xla", "pallas", "pallas_interpret"]
BACKENDS: tuple[str, ...] = ("xla", "pallas", "pallas_interpret")

__all__ = [
    "BACKENDS",
    "Backend",
    "default_backend",
    "paged_attention",
    "paged_attention_dense_reference",
    "paged_attention_xla",
    "validate_attention_inputs",
    "write_kv",
]


def default_backend() -> str:
    """`pallas` where JAX runs on a GPU, `xla` elsewhere (CPU serving path)."""
    return "pallas" if jax.default_backend() == "gpu" else "xla"


def validate_attention_inputs(q, k_pages, v_pages, kv_lens, block_tables, cu_q_lens) -> None:
    """Static checks of the contract (shapes and dtypes), done before tracing.

    Raises KernelInputError naming the argument and what was expected.
    """
    if q.ndim != 3:
        raise KernelInputError(f"q must be [num_tokens, q_heads, head_dim], got shape {q.shape}")
    if k_pages.ndim != 4:
        raise KernelInputError(
            f"k_pages must be [kv_heads, num_pages, page_size, head_dim], got shape {k_pages.shape}"
        )
    if v_pages.shape != k_pages.shape:
        raise KernelInputError(
            f"v_pages shape {v_pages.shape} differs from k_pages shape {k_pages.shape}"
        )
    kv_heads, _, _, head_dim = k_pages.shape
    if q.shape[2] != head_dim:
        raise KernelInputError(f"q head_dim {q.shape[2]} != k_pages head_dim {head_dim}")
    if q.shape[1] % kv_heads:
        raise KernelInputError(
            f"q_heads {q.shape[1]} must be a multiple of kv_heads {kv_heads} (grouped-query attention)"
        )
    if block_tables.ndim != 2:
        raise KernelInputError(
            f"block_tables must be [max_seqs, max_pages_per_seq], got shape {block_tables.shape}"
        )
    max_seqs = block_tables.shape[0]
    if kv_lens.shape != (max_seqs,):
        raise KernelInputError(f"kv_lens must have shape ({max_seqs},), got {kv_lens.shape}")
    if cu_q_lens.shape != (max_seqs + 1,):
        raise KernelInputError(
            f"cu_q_lens must have shape ({max_seqs + 1},), got {cu_q_lens.shape}"
        )
    for name, a in (("kv_lens", kv_lens), ("block_tables", block_tables), ("cu_q_lens", cu_q_lens)):
        if not jnp.issubdtype(a.dtype, jnp.integer):
            raise KernelInputError(f"{name} must be an integer array, got {a.dtype}")
    floats = (jnp.float32, jnp.bfloat16, jnp.float16)
    if q.dtype not in floats:
        raise KernelInputError(f"q dtype must be float32, bfloat16 or float16, got {q.dtype}")
    # q may differ from the pages (a bf16 cache under float32 activations); K and V may not.
    if k_pages.dtype not in floats:
        raise KernelInputError(
            f"k_pages dtype must be float32, bfloat16 or float16, got {k_pages.dtype}"
        )
    if v_pages.dtype != k_pages.dtype:
        raise KernelInputError(
            f"v_pages dtype {v_pages.dtype} differs from k_pages dtype {k_pages.dtype}"
        )


def paged_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    kv_lens: jax.Array,
    block_tables: jax.Array,
    cu_q_lens: jax.Array,
    num_seqs: jax.Array,
    *,
    sm_scale: float | None = None,
    max_q_len: int | None = None,
    soft_cap: float | None = None,
    backend: str = "xla",
    max_long_seqs: int | None = None,
) -> jax.Array:
    """Ragged paged attention (contract in `paged_attention.py`), on the chosen backend.

    `max_q_len` (static) bounds the query length of every sequence; None means num_tokens.
    `max_long_seqs` (static, optional) bounds how many sequences have more than one query
    token: the XLA backend then pads only those to `max_q_len` (the Pallas kernel needs no hint).
    Works traced (inside a stage's jit) and eagerly.
    """
    if backend not in BACKENDS:
        raise KernelInputError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
    validate_attention_inputs(q, k_pages, v_pages, kv_lens, block_tables, cu_q_lens)
    if sm_scale is None:
        sm_scale = float(1.0 / np.sqrt(q.shape[-1]))
    if max_q_len is None:
        max_q_len = q.shape[0]
    if backend == "xla":
        return paged_attention_xla(
            q,
            k_pages,
            v_pages,
            kv_lens,
            block_tables,
            cu_q_lens,
            num_seqs,
            sm_scale=sm_scale,
            max_q_len=max_q_len,
            soft_cap=soft_cap,
            max_long_seqs=max_long_seqs,
        )
    from pipelive_jax.kernels.pallas_attention import paged_attention_pallas

    return paged_attention_pallas(
        q,
        k_pages,
        v_pages,
        kv_lens,
        block_tables,
        cu_q_lens,
        num_seqs,
        sm_scale=sm_scale,
        max_q_len=max_q_len,
        soft_cap=soft_cap,
        interpret=(backend == "pallas_interpret"),
    )

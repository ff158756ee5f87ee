"""KV write by slot mapping: scatter new tokens' K/V into one layer's page pools.

  k_pages, v_pages [kv_heads, num_pages, page_size, head_dim]
  k, v             [num_tokens, kv_heads, head_dim]
  slot_mapping     [num_tokens] int32, slot = page_id * page_size + offset; -1 = padding, dropped

Called inside the stage's jitted step with the pools donated, so XLA updates them in place.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def write_kv(
    k_pages: jax.Array,
    v_pages: jax.Array,
    k: jax.Array,
    v: jax.Array,
    slot_mapping: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Returns the pools with tokens written at their slots (shapes as in the module docstring)."""
    kv_heads, num_pages, page_size, head_dim = k_pages.shape
    total = num_pages * page_size
    # Padding slots point one past the end, which mode="drop" discards.
    slots = jnp.where(slot_mapping < 0, total, slot_mapping)

    def put(pages: jax.Array, new: jax.Array) -> jax.Array:
        flat = pages.reshape(kv_heads, total, head_dim)
        flat = flat.at[:, slots].set(jnp.swapaxes(new, 0, 1).astype(pages.dtype), mode="drop")
        return flat.reshape(kv_heads, num_pages, page_size, head_dim)

    return put(k_pages, k), put(v_pages, v)

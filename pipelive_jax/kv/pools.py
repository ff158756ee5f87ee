"""Device-side KV pools of one pipeline stage (DESIGN.md §4).

Every layer the stage holds owns a K and a V pool, each

    [kv_heads, num_pages, page_size, head_dim]   dtype = KVSpec.dtype

on the stage's device (or sharding). All layers of a stage share one page-id space (one block
table, kept on the host by kv/pages.py); page 0 is the reserved padding page.

The pools change size while serving. Every operation here works one layer at a time, so the
memory on top of the pools themselves is one layer's pool at most:

- `StagePools.add_layer` / `remove_layer`: gain or lose a layer's pool pair, others untouched;
- `StagePools.remap_pages`: move page contents (compaction), in place, layer by layer;
- `StagePools.resize`: re-allocate every layer's pools at a new capacity, layer by layer,
  deleting the old arrays before the next layer.

`compaction_plan` (pure, numpy) says which pages to move so that the live pages fit a smaller
capacity; the host page table applies the same mapping to its block tables.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pipelive_jax.errors import AdmissionError
from pipelive_jax.memory import RESERVED_PAGES, round_capacity

__all__ = [
    "RESERVED_PAGES",
    "KVSpec",
    "StagePools",
    "capacity_bucket",
    "compaction_plan",
    "round_capacity",
]

KVPair = tuple[jax.Array, jax.Array]


@dataclass(frozen=True)
class KVSpec:
    """Shape and dtype of one layer's pools, without the capacity."""

    kv_heads: int
    head_dim: int
    page_size: int
    dtype: Any = jnp.float32

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
        for name in ("kv_heads", "head_dim", "page_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"KVSpec.{name} must be a positive integer, got {v!r}")

    def pool_shape(self, num_pages: int) -> tuple[int, int, int, int]:
        """[kv_heads, num_pages, page_size, head_dim]."""
        return (self.kv_heads, num_pages, self.page_size, self.head_dim)

    def page_bytes(self) -> int:
        """One page of one layer, K and V together (`P` of the admission rule)."""
        return 2 * self.kv_heads * self.page_size * self.head_dim * self.dtype.itemsize

    def pool_bytes(self, num_pages: int) -> int:
        """One layer's K and V pools at capacity `num_pages`."""
        return num_pages * self.page_bytes()


def capacity_bucket(
    pages: int, buckets: Sequence[int] | None = None, *, granule: int = 64, up: bool = False
) -> int:
    """The pool capacity bucket for `pages`.

    With explicit `buckets`: the largest bucket `<= pages` (a budget: what fits), or with
    `up=True` the smallest bucket `>= pages` (a need). Without: `round_capacity(pages, granule)`
    down, or up with `up=True`. Raises ValueError when no bucket qualifies.
    """
    if buckets is None:
        return round_capacity(pages, granule, mode="up" if up else "down")
    ordered = sorted(set(buckets))
    if up:
        fit = [b for b in ordered if b >= pages]
        if not fit:
            raise ValueError(f"no capacity bucket holds {pages} pages; largest is {ordered[-1]}")
        return fit[0]
    fit = [b for b in ordered if b <= pages]
    if not fit:
        raise ValueError(f"no capacity bucket fits within {pages} pages; smallest is {ordered[0]}")
    return fit[-1]


# --------------------------------------------------------------------------------------------
# Compiled pieces, one per (shape, dtype, sharding); cached so repeated resizes reuse them.


def _as_sharding(device: jax.Device | jax.sharding.Sharding) -> jax.sharding.Sharding:
    if isinstance(device, jax.sharding.Sharding):
        return device
    return jax.sharding.SingleDeviceSharding(device)


@functools.cache
def _zeros_pair_fn(shape: tuple[int, ...], dtype: np.dtype, sharding: jax.sharding.Sharding):
    """A jitted allocator of a zeroed (K, V) pair, created on the device (no host array)."""
    return jax.jit(
        lambda: (jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)),
        out_shardings=(sharding, sharding),
    )


@functools.cache
def _resize_fn(
    shape: tuple[int, ...], dtype: np.dtype, new_pages: int, sharding: jax.sharding.Sharding
):
    """Jitted copy of one pool into a new capacity: pages [0, min(old, new)), zeros after."""
    old_pages = shape[1]
    new_shape = (shape[0], new_pages, *shape[2:])

    def resize(pool: jax.Array) -> jax.Array:
        if new_pages <= old_pages:
            return pool[:, :new_pages]
        return jnp.zeros(new_shape, dtype).at[:, :old_pages].set(pool)

    return jax.jit(resize, out_shardings=sharding)


@functools.cache
def _remap_fn(sharding: jax.sharding.Sharding):
    """Jitted in-place page move for one layer: pool[:, dst[i]] = pool[:, src[i]].

    K and V are donated, so XLA updates them in place; the only temporary is the gathered pages.
    Shapes are static per call signature, so jit caches one executable per (pool shape, number
    of moves bucket).
    """

    def remap(k: jax.Array, v: jax.Array, src: jax.Array, dst: jax.Array) -> KVPair:
        return k.at[:, dst].set(k[:, src]), v.at[:, dst].set(v[:, src])

    return jax.jit(remap, donate_argnums=(0, 1), out_shardings=(sharding, sharding))


def _pad_moves(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pad the move lists to a power of two with (0 -> 0), a no-op, to bound recompiles."""
    n = len(src)
    size = 1 << max(0, (n - 1).bit_length())
    pad = size - n
    return (
        np.concatenate([src, np.zeros(pad, np.int32)]),
        np.concatenate([dst, np.zeros(pad, np.int32)]),
    )


# --------------------------------------------------------------------------------------------


class StagePools:
    """The K and V pools of every layer one stage holds.

    Invariants (checked by `check_invariants`, kept by every method):
      - `layers` is the sorted tuple of the global layer ids in `pools`, without duplicates;
      - `pools[layer]` is `(k, v)`, each of shape `spec.pool_shape(num_pages)`, dtype
        `spec.dtype`, placed on `sharding`, and not deleted;
      - `num_pages >= RESERVED_PAGES + 1`; page 0 is the padding page and no method here
        moves data into or out of it.

    Not thread-safe: the engine loop calls it at step boundaries only. Arrays handed out
    (`as_list`, `remove_layer`) may be donated by the caller, who then hands the results back
    with `set_layer` / `set_all`.
    """

    def __init__(
        self,
        spec: KVSpec,
        num_pages: int,
        device: jax.Device | jax.sharding.Sharding,
        layers: Iterable[int] = (),
    ) -> None:
        _check_capacity(num_pages)
        self.spec = spec
        self.num_pages = int(num_pages)
        self.sharding = _as_sharding(device)
        self.pools: dict[int, KVPair] = {}
        for layer in layers:
            self.add_layer(layer)

    # -- introspection ------------------------------------------------------------------------

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted(self.pools))

    def pool_shape(self) -> tuple[int, int, int, int]:
        return self.spec.pool_shape(self.num_pages)

    def bytes_per_layer(self) -> int:
        """One layer's K and V pools."""
        return self.spec.pool_bytes(self.num_pages)

    def total_bytes(self) -> int:
        return len(self.pools) * self.bytes_per_layer()

    def check_invariants(self) -> None:
        """Raise AssertionError if an invariant of the class docstring does not hold."""
        assert self.num_pages >= RESERVED_PAGES + 1, self.num_pages
        shape = self.pool_shape()
        for layer, pair in self.pools.items():
            for a in pair:
                assert not a.is_deleted(), f"layer {layer}: deleted pool"
                assert a.shape == shape, f"layer {layer}: shape {a.shape} != {shape}"
                assert a.dtype == self.spec.dtype, f"layer {layer}: dtype {a.dtype}"
                assert a.sharding.is_equivalent_to(self.sharding, a.ndim), (
                    f"layer {layer}: placed on {a.sharding}, expected {self.sharding}"
                )

    # -- layers -------------------------------------------------------------------------------

    def _zeros(self) -> KVPair:
        fn = _zeros_pair_fn(self.pool_shape(), self.spec.dtype, self.sharding)
        return fn()

    def add_layer(self, layer: int) -> None:
        """Allocate a zeroed pool pair for `layer` (the caller then copies pages in)."""
        if layer in self.pools:
            raise ValueError(f"layer {layer} already has pools on this stage")
        self.pools[layer] = self._zeros()

    def remove_layer(self, layer: int) -> KVPair:
        """Forget `layer`'s pools and return them (to delete, or to move to another stage)."""
        try:
            return self.pools.pop(layer)
        except KeyError:
            raise ValueError(
                f"layer {layer} has no pools on this stage (layers {self.layers})"
            ) from None

    def set_layer(self, layer: int, k: jax.Array, v: jax.Array) -> None:
        """Set (or replace) `layer`'s pools; k and v: `pool_shape()`, `spec.dtype`, on `sharding`."""
        shape = self.pool_shape()
        for name, a in (("k", k), ("v", v)):
            if a.shape != shape or a.dtype != self.spec.dtype:
                raise ValueError(
                    f"layer {layer}: {name} pool is {a.dtype}{list(a.shape)}, "
                    f"expected {self.spec.dtype}{list(shape)}"
                )
            if not a.sharding.is_equivalent_to(self.sharding, a.ndim):
                raise ValueError(
                    f"layer {layer}: {name} pool is placed on {a.sharding}, "
                    f"expected {self.sharding}"
                )
        self.pools[layer] = (k, v)

    def as_list(self, layer_ids: Sequence[int] | None = None) -> list[KVPair]:
        """The (k, v) pairs of `layer_ids` (default: `layers`), in that order."""
        ids = self.layers if layer_ids is None else layer_ids
        return [self.pools[i] for i in ids]

    def set_all(self, pairs: Sequence[KVPair], layer_ids: Sequence[int] | None = None) -> None:
        """Store the pools a step returned (after donating `as_list(layer_ids)`), in order."""
        ids = self.layers if layer_ids is None else tuple(layer_ids)
        if len(pairs) != len(ids):
            raise ValueError(f"{len(pairs)} pool pairs for {len(ids)} layers {ids}")
        for layer, (k, v) in zip(ids, pairs, strict=True):
            self.set_layer(layer, k, v)

    def delete(self) -> None:
        """Free every pool now (the stage leaves this device)."""
        for k, v in self.pools.values():
            k.delete()
            v.delete()
        self.pools.clear()

    # -- moving pages ------------------------------------------------------------------------

    def remap_pages(self, src: np.ndarray, dst: np.ndarray) -> None:
        """Copy page `src[i]` to page `dst[i]` in every layer's K and V pools.

        Args:
          src, dst: int [n] page ids in `[1, num_pages)`; `dst` without duplicates. Pages
            are read before any is written, so `src` and `dst` may overlap.

        One jitted gather/scatter per layer, pools donated (in place); the extra memory is the
        gathered pages of one layer. Source pages keep their (now stale) contents.
        """
        src = np.asarray(src, dtype=np.int32).reshape(-1)
        dst = np.asarray(dst, dtype=np.int32).reshape(-1)
        if src.shape != dst.shape:
            raise ValueError(f"src has {src.size} pages but dst has {dst.size}")
        if src.size == 0:
            return
        for name, ids in (("src", src), ("dst", dst)):
            bad = ids[(ids < RESERVED_PAGES) | (ids >= self.num_pages)]
            if bad.size:
                raise ValueError(
                    f"{name} page ids must be in [{RESERVED_PAGES}, {self.num_pages}), "
                    f"got {bad[:8].tolist()}"
                )
        if np.unique(dst).size != dst.size:
            raise ValueError("dst page ids must be distinct")
        src_p, dst_p = _pad_moves(src, dst)
        fn = _remap_fn(self.sharding)
        for layer in self.layers:
            k, v = self.pools.pop(layer)  # donated below: never keep the old references
            self.pools[layer] = fn(k, v, src_p, dst_p)

    def warm_resize(self, new_num_pages: int) -> None:
        """Compiles the copy `resize(new_num_pages)` will use, so that it does not compile at the
        step boundary where it runs (callable from a background thread)."""
        fn = _resize_fn(self.pool_shape(), self.spec.dtype, int(new_num_pages), self.sharding)
        abstract = jax.ShapeDtypeStruct(self.pool_shape(), self.spec.dtype, sharding=self.sharding)
        fn.lower(abstract).compile()

    def resize(
        self,
        new_num_pages: int,
        *,
        live_max_page: int | None = None,
        on_layer_step: Callable[[int], None] | None = None,
    ) -> None:
        """Re-allocate every layer's pools at capacity `new_num_pages`, one layer at a time.

        Pages `[0, min(old, new))` keep their contents; new pages are zero. For each layer the
        new pair is created, completed (blocked on), and the old pair deleted before the next
        layer starts, so the peak memory is the pools plus one layer's pool.
        `on_layer_step(layer)` is called after each layer's old pair is freed.

        Args:
          new_num_pages: the new capacity, page 0 included.
          live_max_page: the highest page id in use (0 if none); required to shrink. The caller
            compacts first (`compaction_plan` + `remap_pages`).

        Raises:
          AdmissionError: shrinking below a live page (or without `live_max_page`); nothing
            changes.
        """
        _check_capacity(new_num_pages)
        old = self.num_pages
        if new_num_pages == old:
            return
        if new_num_pages < old:
            if live_max_page is None:
                raise AdmissionError(
                    f"shrinking pools from {old} to {new_num_pages} pages needs the highest "
                    "live page id (live_max_page); compact first",
                    num_pages=old,
                    new_num_pages=new_num_pages,
                )
            if live_max_page >= new_num_pages:
                raise AdmissionError(
                    f"cannot shrink pools to {new_num_pages} pages: page {live_max_page} is in "
                    f"use and would be cut off (the new capacity keeps pages 0.."
                    f"{new_num_pages - 1}); compact live pages below {new_num_pages} first",
                    num_pages=old,
                    new_num_pages=new_num_pages,
                    live_max_page=live_max_page,
                )
        fn = _resize_fn(self.pool_shape(), self.spec.dtype, int(new_num_pages), self.sharding)
        # Between layers `pools` holds both capacities (what `on_layer_step` sees);
        # `num_pages` changes once every layer is converted.
        for layer in self.layers:
            k_old, v_old = self.pools[layer]
            k_new, v_new = fn(k_old), fn(v_old)
            # Block before deleting so the allocator really has the old pair back before the
            # next layer allocates; otherwise async dispatch could stack several layers' pools.
            jax.block_until_ready((k_new, v_new))
            k_old.delete()
            v_old.delete()
            self.pools[layer] = (k_new, v_new)
            if on_layer_step is not None:
                on_layer_step(layer)
        self.num_pages = int(new_num_pages)


def _check_capacity(num_pages: int) -> None:
    if not isinstance(num_pages, int | np.integer) or num_pages < RESERVED_PAGES + 1:
        raise ValueError(
            f"a pool needs at least {RESERVED_PAGES + 1} pages (page 0 is reserved), "
            f"got {num_pages!r}"
        )


def compaction_plan(
    live_pages: np.ndarray, target: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Moves that bring every live page below `target`.

    Args:
      live_pages: int [n] distinct live page ids, all >= 1 (page 0 is never live).
      target: the capacity to fit (pages `0 .. target-1`); default `n + 1`, the tightest.

    Returns:
      (src, dst): int32 [m]. Each live page `>= target`, in ascending order, goes to the
      lowest free id in `[1, target)`. Pages already below `target` stay. Pure function; apply
      it with `StagePools.remap_pages(src, dst)` and to the block tables.

    Raises:
      AdmissionError: the live pages cannot fit `target` (`n + 1 > target`).
    """
    live = np.asarray(live_pages, dtype=np.int64).reshape(-1)
    n = live.size
    if target is None:
        target = n + RESERVED_PAGES
    if n and live.min() < RESERVED_PAGES:
        raise ValueError(f"page {int(live.min())} cannot be live: page 0 is the padding page")
    if np.unique(live).size != n:
        raise ValueError("live page ids must be distinct")
    if n + RESERVED_PAGES > target:
        raise AdmissionError(
            f"{n} live pages cannot fit a capacity of {target} pages "
            f"({target - RESERVED_PAGES} usable, page 0 reserved)",
            pages_in_use=n,
            capacity=target,
        )
    movers = np.sort(live[live >= target])
    taken = np.zeros(target, dtype=bool)
    taken[:RESERVED_PAGES] = True
    taken[live[live < target]] = True
    free = np.flatnonzero(~taken)[: movers.size]
    return movers.astype(np.int32), free.astype(np.int32)

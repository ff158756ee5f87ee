"""Copy mechanics of a migration: moving KV pages of several layers between devices, fused.

A `Route` is every moved layer that goes from one source stage to one target stage. Copying a
set of pages along a route is three dispatches, whatever the number of layers (dispatch
overhead dominates small patches on CPU, see NOTES.md): one jitted gather on the source device
over all the route's layers, one `device_put` of the gathered pages, one jitted scatter on the
target device with the target pools donated (in place). The page count is padded to a power of
two (padding reads page 0 and writes past the end, which the scatter drops) and each padded size
is compiled ahead of time (`Route.prepare`), so no copy compiles inside the switch pause.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import jax
import numpy as np

from pipelive_jax.kv.pages import PageTable

KVPair = tuple[jax.Array, jax.Array]


def pad_pow2(n: int, minimum: int = 8) -> int:
    b = minimum
    while b < n:
        b *= 2
    return b


@jax.jit
def _gather(pools: list[KVPair], ids: jax.Array) -> list[KVPair]:
    """pools: per layer (k, v) [kv_heads, pages, page_size, head_dim]; ids [n] -> per layer
    (k, v) [kv_heads, n, page_size, head_dim]."""
    return [(k[:, ids], v[:, ids]) for k, v in pools]


@partial(jax.jit, donate_argnums=(0,))
def _scatter(pools: list[KVPair], ids: jax.Array, pages: list[KVPair]) -> list[KVPair]:
    """Writes pages[l] at ids [n] of pools[l]; ids past the end are dropped (padding)."""
    return [
        (k.at[:, ids].set(pk, mode="drop"), v.at[:, ids].set(pv, mode="drop"))
        for (k, v), (pk, pv) in zip(pools, pages, strict=True)
    ]


def page_moves(
    src: PageTable, dst: PageTable, src_pages: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(src ids [n], dst ids [n]): for every block of every sequence the two tables share, the
    page holding it on each side; restricted to source pages in `src_pages` when given.

    A sequence's block b lives at src.pages[seq][b] and moves to dst.pages[seq][b]: the target
    keeps its own page ids, so the migrated layers reuse the target's block table unchanged.
    """
    wanted = None if src_pages is None else set(np.asarray(src_pages).tolist())
    s_ids: list[int] = []
    d_ids: list[int] = []
    for seq, s_pages in src.pages.items():
        d_pages = dst.pages.get(seq)
        if d_pages is None:
            continue
        for sp, dp in zip(s_pages, d_pages, strict=False):
            if wanted is None or sp in wanted:
                s_ids.append(sp)
                d_ids.append(dp)
    return np.array(s_ids, np.int32), np.array(d_ids, np.int32)


@dataclass
class Route:
    """Moved layers from one source stage's pools to one target's (pending) pools.

    src_pools/dst_pools: per layer of `layers`, (k, v) [kv_heads, pages, page_size, head_dim];
    the source ones are read (never donated: the old plan keeps serving with them), the target
    ones are updated in place and replaced in `dst_pools`.
    """

    layers: tuple[int, ...]
    src_device: jax.Device
    dst_device: jax.Device
    src_table: PageTable
    dst_table: PageTable
    get_src_pools: Any  # () -> list[KVPair] of the current source arrays (they change each step)
    dst_pools: list[KVPair]
    page_bytes: int  # one page of one layer, K and V
    _compiled: dict[int, tuple[Any, Any]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def prepare(self, max_pages: int) -> None:
        """Compiles gather and scatter for every padded size up to `max_pages` (background-safe)."""
        n = 8
        while True:
            self._fns(n)
            if n >= max_pages:
                break
            n *= 2

    def _fns(self, n: int) -> tuple[Any, Any]:
        got = self._compiled.get(n)
        if got is not None:
            return got
        src = [
            (jax.ShapeDtypeStruct(k.shape, k.dtype, sharding=k.sharding),) * 2
            for k, _ in self.get_src_pools()
        ]
        dst = [
            (jax.ShapeDtypeStruct(k.shape, k.dtype, sharding=k.sharding),) * 2
            for k, _ in self.dst_pools
        ]
        s_sh = jax.sharding.SingleDeviceSharding(self.src_device)
        d_sh = jax.sharding.SingleDeviceSharding(self.dst_device)
        ids_s = jax.ShapeDtypeStruct((n,), np.int32, sharding=s_sh)
        ids_d = jax.ShapeDtypeStruct((n,), np.int32, sharding=d_sh)
        k0 = src[0][0] if src else None
        if k0 is None:
            raise ValueError("a route needs at least one layer")
        page_shape = (k0.shape[0], n, k0.shape[2], k0.shape[3])
        pages = [(jax.ShapeDtypeStruct(page_shape, k0.dtype, sharding=d_sh),) * 2 for _ in src]
        g = _gather.lower(src, ids_s).compile()
        s = _scatter.lower(dst, ids_d, pages).compile()
        with self._lock:
            self._compiled.setdefault(n, (g, s))
        return self._compiled[n]

    def copy(self, src_ids: np.ndarray, dst_ids: np.ndarray) -> int:
        """Dispatches the copy of pages src_ids -> dst_ids in every layer; returns bytes moved."""
        count = int(len(src_ids))
        if count == 0:
            return 0
        n = pad_pow2(count)
        s = np.zeros(n, np.int32)
        s[:count] = src_ids
        d = np.full(n, self.dst_pools[0][0].shape[1], np.int32)  # past the end: dropped
        d[:count] = dst_ids
        gather, scatter = self._fns(n)
        pages = gather(self.get_src_pools(), jax.device_put(s, self.src_device))
        pages = jax.device_put(pages, self.dst_device)
        self.dst_pools = scatter(self.dst_pools, jax.device_put(d, self.dst_device), pages)
        return count * self.page_bytes * len(self.layers)

    def block(self) -> None:
        jax.block_until_ready(self.dst_pools)

"""Copy mechanics of a migration: moving KV pages of several layers between devices, fused.

A `Route` is every moved layer that goes from one source stage to one target stage. Copying a
set of pages along a route is three dispatches, whatever the number of layers (dispatch
overhead dominates small patches on CPU, see NOTES.md): one jitted gather on the source device
over all the route's layers, one `device_put` of the gathered pages, one jitted scatter on the
target device with the target pools donated (in place). The page count is padded to a power of
two (padding reads page 0 and writes past the end, which the scatter drops) and each padded size
is compiled ahead of time (`Route.prepare`), so no copy compiles inside the switch pause.

Patch rounds copy slots, not pages (`Route.copy_slots`): a decode step writes one slot of one
page per sequence, so the slots written since the last round are page_size times fewer bytes
than their pages. Slot copies use the same three dispatches over pools viewed as
[kv_heads, num_pages * page_size, head_dim]; rounds with more slots than `SLOT_COPY_MAX` (long
prefill chunks) copy whole dirty pages instead.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pipelive_jax.kv.pages import PageTable

KVPair = tuple[jax.Array, jax.Array]


# Largest slot copy compiled ahead of time; beyond it a round copies the dirty pages.
SLOT_COPY_MAX = 512
SLOT_COPY_MIN = 32

# Page copies go in pieces of at most this many pages: copy time grows faster than the size
# (fresh buffers of tens of MB fault their pages in): 256 pages of 10 SmolLM2 layers took
# ~155 ms in one piece and 33-72 ms in pieces of 32 on the 2-core CI machine.
COPY_PIECE_PAGES = 32


# Compiled gather/scatter pairs shared by every route (see Route._compiled_pair).
_PROGRAMS: dict[tuple, tuple[Any, Any]] = {}
_PROGRAMS_LOCK = threading.Lock()


def pad_pow2(n: int, minimum: int = 8) -> int:
    b = minimum
    while b < n:
        b *= 2
    return b


# Gathers return one stacked array [layers, 2 (K, V), kv_heads, n, ...] rather than a list per
# layer: the transfer between devices is then one array, not 2 x layers (each costs a dispatch).


@jax.jit
def _gather(pools: list[KVPair], ids: jax.Array) -> jax.Array:
    """pools: per layer (k, v) [kv_heads, pages, page_size, head_dim]; ids [n] ->
    [layers, 2, kv_heads, n, page_size, head_dim]."""
    return jnp.stack([jnp.stack([k[:, ids], v[:, ids]]) for k, v in pools])


@partial(jax.jit, donate_argnums=(0,))
def _scatter(pools: list[KVPair], ids: jax.Array, pages: jax.Array) -> list[KVPair]:
    """Writes pages[l] (as `_gather` returns them) at ids [n] of pools[l]; ids past the end are
    dropped (padding)."""
    return [
        (k.at[:, ids].set(pages[i, 0], mode="drop"), v.at[:, ids].set(pages[i, 1], mode="drop"))
        for i, (k, v) in enumerate(pools)
    ]


def _flat(a: jax.Array) -> jax.Array:
    h, p, ps, d = a.shape
    return a.reshape(h, p * ps, d)


@jax.jit
def _gather_slots(pools: list[KVPair], ids: jax.Array) -> jax.Array:
    """pools: per layer (k, v) [kv_heads, pages, page_size, head_dim]; ids [n] slot ids ->
    [layers, 2, kv_heads, n, head_dim]."""
    return jnp.stack([jnp.stack([_flat(k)[:, ids], _flat(v)[:, ids]]) for k, v in pools])


@partial(jax.jit, donate_argnums=(0,))
def _scatter_slots(pools: list[KVPair], ids: jax.Array, rows: jax.Array) -> list[KVPair]:
    """Writes rows[l] (as `_gather_slots` returns them) at slot ids [n] of pools[l]; ids past the
    end are dropped (padding)."""
    out = []
    for i, (k, v) in enumerate(pools):
        out.append(
            (
                _flat(k).at[:, ids].set(rows[i, 0], mode="drop").reshape(k.shape),
                _flat(v).at[:, ids].set(rows[i, 1], mode="drop").reshape(v.shape),
            )
        )
    return out


def slot_moves(
    src: PageTable, dst: PageTable, src_slots: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(src slots [n], dst slots [n]): where each written source slot lives on the target.

    A slot keeps its offset within the page; its page maps as in `page_moves`. Slots of pages
    the two tables do not share (freed since they were written) are left out.
    """
    s_pages, d_pages = page_moves(src, dst)
    ps = src.page_size
    page_map = np.full(src.num_pages, -1, np.int64)
    page_map[s_pages] = d_pages
    src_slots = np.asarray(src_slots, np.int64)
    dst_page = page_map[src_slots // ps]
    keep = dst_page >= 0
    return (
        src_slots[keep].astype(np.int32),
        (dst_page[keep] * ps + src_slots[keep] % ps).astype(np.int32),
    )


def page_moves(
    src: PageTable, dst: PageTable, src_pages: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(src ids [n], dst ids [n]): for every block of every sequence the two tables share, the
    page holding it on each side; restricted to source pages in `src_pages` when given.

    A sequence's block b lives at src.pages[seq][b] and moves to dst.pages[seq][b]: the target
    keeps its own page ids, so the migrated layers reuse the target's block table unchanged.
    """
    s_parts: list[np.ndarray] = []
    d_parts: list[np.ndarray] = []
    for seq, s_pages in src.pages.items():
        d_pages = dst.pages.get(seq)
        if d_pages is None:
            continue
        n = min(len(s_pages), len(d_pages))
        s_parts.append(np.asarray(s_pages[:n], np.int32))
        d_parts.append(np.asarray(d_pages[:n], np.int32))
    if not s_parts:
        return np.zeros(0, np.int32), np.zeros(0, np.int32)
    s_ids, d_ids = np.concatenate(s_parts), np.concatenate(d_parts)
    if src_pages is not None:
        keep = np.isin(s_ids, np.asarray(src_pages))
        s_ids, d_ids = s_ids[keep], d_ids[keep]
    return s_ids, d_ids


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
    _compiled_slots: dict[int, tuple[Any, Any]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def prepare(self, max_pages: int) -> None:
        """Compiles page gather/scatter for every padded size a copy of up to `max_pages` pages
        uses (pieces of at most COPY_PIECE_PAGES), and slot gather/scatter up to SLOT_COPY_MAX
        (background-safe)."""
        n = 8
        while True:
            self._fns(n)
            if n >= min(max_pages, COPY_PIECE_PAGES):
                break
            n *= 2
        n = SLOT_COPY_MIN
        while n <= SLOT_COPY_MAX:
            self._slot_fns(n)
            n *= 2

    def _abstract(self) -> tuple[list[Any], list[Any]]:
        src = [
            (jax.ShapeDtypeStruct(k.shape, k.dtype, sharding=k.sharding),) * 2
            for k, _ in self.get_src_pools()
        ]
        dst = [
            (jax.ShapeDtypeStruct(k.shape, k.dtype, sharding=k.sharding),) * 2
            for k, _ in self.dst_pools
        ]
        if not src:
            raise ValueError("a route needs at least one layer")
        return src, dst

    def _compiled_pair(
        self, cache: dict[int, tuple[Any, Any]], gather: Any, scatter: Any, n: int, unit: tuple
    ) -> tuple[Any, Any]:
        """Gather and scatter compiled for `n` ids; `unit` is the trailing shape of one copied
        id in one head (page_size, head_dim) for pages, (head_dim,) for slots."""
        got = cache.get(n)
        if got is not None:
            return got
        src, dst = self._abstract()
        # Routes are rebuilt by every reconfiguration, the programs are not: a route between the
        # same devices with the same pool shapes reuses them (no compile, no cold first run).
        key = (
            gather,
            n,
            tuple((a.shape, str(a.dtype)) for a, _ in src),
            tuple((a.shape, str(a.dtype)) for a, _ in dst),
            self.src_device.id,
            self.dst_device.id,
        )
        fns = _PROGRAMS.get(key)
        if fns is None:
            s_sh = jax.sharding.SingleDeviceSharding(self.src_device)
            d_sh = jax.sharding.SingleDeviceSharding(self.dst_device)
            k0 = src[0][0]
            moved = jax.ShapeDtypeStruct(
                (len(src), 2, k0.shape[0], n, *unit), k0.dtype, sharding=d_sh
            )
            g = gather.lower(src, jax.ShapeDtypeStruct((n,), np.int32, sharding=s_sh))
            sc = scatter.lower(dst, jax.ShapeDtypeStruct((n,), np.int32, sharding=d_sh), moved)
            fns = (g.compile(), sc.compile())
            with _PROGRAMS_LOCK:
                fns = _PROGRAMS.setdefault(key, fns)
        with self._lock:
            cache.setdefault(n, fns)
        return cache[n]

    def _slot_fns(self, n: int) -> tuple[Any, Any]:
        k0 = self.dst_pools[0][0]
        return self._compiled_pair(
            self._compiled_slots, _gather_slots, _scatter_slots, n, (k0.shape[3],)
        )

    def copy_slots(self, src_slots: np.ndarray, dst_slots: np.ndarray) -> int:
        """Dispatches the copy of slots src_slots -> dst_slots in every layer (at most
        SLOT_COPY_MAX); returns bytes moved."""
        count = int(len(src_slots))
        if count == 0:
            return 0
        if count > SLOT_COPY_MAX:
            raise ValueError(f"{count} slots > SLOT_COPY_MAX {SLOT_COPY_MAX}; copy pages")
        n = pad_pow2(count, SLOT_COPY_MIN)
        k0 = self.dst_pools[0][0]
        s = np.zeros(n, np.int32)
        s[:count] = src_slots
        d = np.full(n, k0.shape[1] * k0.shape[2], np.int32)  # past the end: dropped
        d[:count] = dst_slots
        gather, scatter = self._slot_fns(n)
        s_dev, d_dev = jax.device_put((s, d), (self.src_device, self.dst_device))
        rows = jax.device_put(gather(self.get_src_pools(), s_dev), self.dst_device)
        self.dst_pools = scatter(self.dst_pools, d_dev, rows)
        return count * (self.page_bytes // k0.shape[2]) * len(self.layers)

    def _fns(self, n: int) -> tuple[Any, Any]:
        k0 = self.dst_pools[0][0]
        return self._compiled_pair(self._compiled, _gather, _scatter, n, k0.shape[2:])

    def copy(self, src_ids: np.ndarray, dst_ids: np.ndarray) -> int:
        """Dispatches the copy of pages src_ids -> dst_ids in every layer, in pieces of at most
        COPY_PIECE_PAGES; returns bytes moved."""
        total = 0
        for i in range(0, len(src_ids), COPY_PIECE_PAGES):
            total += self._copy_piece(
                src_ids[i : i + COPY_PIECE_PAGES], dst_ids[i : i + COPY_PIECE_PAGES]
            )
        return total

    def _copy_piece(self, src_ids: np.ndarray, dst_ids: np.ndarray) -> int:
        count = int(len(src_ids))
        if count == 0:
            return 0
        n = pad_pow2(count)
        s = np.zeros(n, np.int32)
        s[:count] = src_ids
        d = np.full(n, self.dst_pools[0][0].shape[1], np.int32)  # past the end: dropped
        d[:count] = dst_ids
        gather, scatter = self._fns(n)
        s_dev, d_dev = jax.device_put((s, d), (self.src_device, self.dst_device))
        pages = jax.device_put(gather(self.get_src_pools(), s_dev), self.dst_device)
        self.dst_pools = scatter(self.dst_pools, d_dev, pages)
        return count * self.page_bytes * len(self.layers)

    def block(self) -> None:
        jax.block_until_ready(self.dst_pools)

"""The copy mechanics of a migration (`reconfig/migrate.py`), checked byte for byte.

Two page tables hold the same sequences under different page ids, on two devices; a `Route`
copies pages (pre-copy) and then slots (patch rounds) from one to the other. After each copy
the target's KV of every written token must equal the source's, and nothing else on the
target may change.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from pipelive_jax.kv.pages import PageTable
from pipelive_jax.reconfig.migrate import SLOT_COPY_MAX, Route, page_moves, slot_moves

H, PS, D = 2, 4, 8  # kv heads, page size, head dim
LAYERS = (3, 4)


def _tables() -> tuple[PageTable, PageTable]:
    src, dst = PageTable(24, PS), PageTable(20, PS)
    dst.reserve("pad", 6)  # shifts the target's ids so the two tables disagree
    for seq, n in (("a", 9), ("b", 3), ("c", 14)):
        src.reserve(seq, n)
        dst.reserve(seq, n)
    dst.free("pad")
    return src, dst


def _pool(num_pages: int, seed: int, device: jax.Device) -> tuple[jax.Array, jax.Array]:
    rng = np.random.default_rng(seed)
    shape = (H, num_pages, PS, D)
    return (
        jax.device_put(rng.standard_normal(shape).astype(np.float32), device),
        jax.device_put(rng.standard_normal(shape).astype(np.float32), device),
    )


def _token_rows(pool: jax.Array, table: PageTable) -> dict[str, np.ndarray]:
    flat = np.asarray(pool).reshape(H, -1, D)
    return {s: flat[:, table.slots(s, 0, n, mark_dirty=False)] for s, n in table.tokens.items()}


@pytest.fixture(scope="module")
def devices() -> tuple[jax.Device, jax.Device]:
    return jax.devices()[0], jax.devices()[1]


def _route(devices, src: PageTable, dst: PageTable):
    src_pools = {lay: _pool(src.num_pages, lay, devices[0]) for lay in LAYERS}
    dst_pools = [_pool(dst.num_pages, 100 + lay, devices[1]) for lay in LAYERS]
    r = Route(
        layers=LAYERS,
        src_device=devices[0],
        dst_device=devices[1],
        src_table=src,
        dst_table=dst,
        get_src_pools=lambda: [src_pools[lay] for lay in LAYERS],
        dst_pools=dst_pools,
        page_bytes=2 * H * PS * D * 4,
    )
    return r, src_pools


def test_slot_moves_keep_offsets_and_drop_unshared_pages():
    src, dst = _tables()
    s_pages, d_pages = page_moves(src, dst)
    page_map = dict(zip(s_pages.tolist(), d_pages.tolist(), strict=True))
    written = src.slots("a", 5, 3)  # positions 5..7 of "a"
    s, d = slot_moves(src, dst, written)
    assert s.tolist() == written.tolist()
    assert d.tolist() == [page_map[x // PS] * PS + x % PS for x in written.tolist()]
    assert d.tolist() == dst.slots("a", 5, 3, mark_dirty=False).tolist()
    # A page the target does not share (its sequence is gone there) is skipped.
    dst.free("b")
    s, d = slot_moves(src, dst, src.slots("b", 0, 3))
    assert len(s) == len(d) == 0


def test_precopy_then_slot_patches_make_the_target_equal(devices):
    src, dst = _tables()
    r, src_pools = _route(devices, src, dst)
    r.prepare(max_pages=32)
    before = [np.asarray(k).copy() for k, _ in r.dst_pools]
    src.clear_dirty()
    moved = r.copy(*page_moves(src, dst))
    r.block()
    assert moved == len(page_moves(src, dst)[0]) * r.page_bytes * len(LAYERS)
    for lay, (k, v) in zip(LAYERS, r.dst_pools, strict=True):
        for a, b in ((src_pools[lay][0], k), (src_pools[lay][1], v)):
            want, got = _token_rows(a, src), _token_rows(b, dst)
            for seq in want:
                np.testing.assert_array_equal(got[seq], want[seq])
    # Pages no sequence owns on the target are untouched.
    free = sorted(set(range(1, dst.num_pages)) - {p for ps in dst.pages.values() for p in ps})
    for (k, _), k0 in zip(r.dst_pools, before, strict=True):
        np.testing.assert_array_equal(np.asarray(k)[:, free], k0[:, free])

    # A "step" writes one new token of each sequence on the source; a patch copies exactly those.
    rng = np.random.default_rng(7)
    for seq in ("a", "c"):
        pos = src.tokens[seq]
        src.reserve(seq, pos + 1)
        dst.reserve(seq, pos + 1)
        slot = src.slots(seq, pos, 1)
        for lay in LAYERS:
            k, v = src_pools[lay]
            row = rng.standard_normal((H, D)).astype(np.float32)
            flat_k = k.reshape(H, -1, D).at[:, slot[0]].set(row)
            flat_v = v.reshape(H, -1, D).at[:, slot[0]].set(-row)
            src_pools[lay] = (flat_k.reshape(k.shape), flat_v.reshape(v.shape))
    slots = src.take_dirty_slots()
    assert len(slots) == 2
    s, d = slot_moves(src, dst, slots)
    moved = r.copy_slots(s, d)
    r.block()
    assert moved == 2 * (r.page_bytes // PS) * len(LAYERS)
    for lay, (k, v) in zip(LAYERS, r.dst_pools, strict=True):
        for a, b in ((src_pools[lay][0], k), (src_pools[lay][1], v)):
            want, got = _token_rows(a, src), _token_rows(b, dst)
            for seq in want:
                np.testing.assert_array_equal(got[seq], want[seq])


def test_slot_copy_refuses_more_than_it_was_compiled_for(devices):
    src, dst = _tables()
    r, _ = _route(devices, src, dst)
    many = np.zeros(SLOT_COPY_MAX + 1, np.int32)
    with pytest.raises(ValueError, match="SLOT_COPY_MAX"):
        r.copy_slots(many, many)


def test_a_large_page_copy_goes_in_pieces_and_lands_whole(devices, monkeypatch):
    """Copies of many pages run in pieces of COPY_PIECE_PAGES (large copies are slower per
    byte); every piece lands: the target equals the source for every token."""
    import pipelive_jax.reconfig.migrate as migrate

    monkeypatch.setattr(migrate, "COPY_PIECE_PAGES", 3)
    pieces: list[int] = []
    one_piece = Route._copy_piece

    def counted(self, s, d):
        pieces.append(len(s))
        return one_piece(self, s, d)

    monkeypatch.setattr(Route, "_copy_piece", counted)
    src, dst = _tables()
    r, src_pools = _route(devices, src, dst)
    s, d = page_moves(src, dst)
    moved = r.copy(s, d)
    r.block()
    assert pieces == [3, 3, 2] and len(s) == 8
    assert moved == len(s) * r.page_bytes * len(LAYERS)
    for lay, (k, v) in zip(LAYERS, r.dst_pools, strict=True):
        for a, b in ((src_pools[lay][0], k), (src_pools[lay][1], v)):
            want, got = _token_rows(a, src), _token_rows(b, dst)
            for seq in want:
                np.testing.assert_array_equal(got[seq], want[seq])

"""PageTable: allocation and free, its invariants, block tables, slot values, compaction and
resize that keep every sequence's token -> page mapping, and a dirty bitmap that marks exactly
the pages written (checked against a model of the table built from the slots it hands out)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from pipelive_jax.errors import AdmissionError
from pipelive_jax.kv.pages import PageTable


def _snapshot(pt: PageTable) -> tuple:
    """Everything observable of a table, to assert that a refusal changed nothing."""
    return (
        pt.num_pages,
        {s: list(p) for s, p in pt.pages.items()},
        dict(pt.tokens),
        sorted(pt._free),
        pt.dirty.copy().tolist(),
    )


# ------------------------------------------------------------------ construction and allocation


@pytest.mark.parametrize(("num_pages", "page_size"), [(1, 4), (0, 4), (8, 0)])
def test_rejects_bad_sizes(num_pages, page_size):
    with pytest.raises(ValueError, match="must be >="):
        PageTable(num_pages, page_size)


def test_fresh_table_reserves_page_zero():
    pt = PageTable(10, 4)
    assert pt.num_free == 9
    assert pt.num_used == 0
    assert pt.live_pages().tolist() == []
    assert pt.max_live_page() == 0
    pt.check()


def test_reserve_allocates_low_ids_first_and_grows_by_pages():
    pt = PageTable(10, 4)
    pt.reserve("a", 5)  # ceil(5 / 4) = 2 pages
    assert pt.pages["a"] == [1, 2]
    assert pt.pages_needed("a", 8) == 0
    assert pt.pages_needed("a", 9) == 1
    pt.reserve("b", 1)
    assert pt.pages["b"] == [3]
    pt.reserve("a", 9)  # grows by one page, the lowest free
    assert pt.pages["a"] == [1, 2, 4]
    assert pt.tokens == {"a": 9, "b": 1}
    pt.reserve("a", 3)  # never shrinks
    assert pt.pages["a"] == [1, 2, 4]
    assert pt.tokens["a"] == 9
    assert (pt.num_used, pt.num_free) == (4, 5)
    pt.check()


def test_free_returns_pages_to_the_pool_and_they_are_reused_low_first():
    pt = PageTable(10, 4)
    pt.reserve("a", 8)
    pt.reserve("b", 8)
    assert pt.free("a") == 2
    assert pt.free("a") == 0  # unknown or already freed: nothing
    assert pt.free("never") == 0
    assert "a" not in pt.pages and "a" not in pt.tokens
    pt.check()
    pt.reserve("c", 12)
    assert pt.pages["c"] == [1, 2, 5]
    pt.check()


def test_reserve_beyond_capacity_refuses_and_changes_nothing():
    pt = PageTable(5, 4)  # 4 usable pages
    pt.reserve("a", 12)
    assert not pt.can_reserve("b", 5)
    assert pt.can_reserve("b", 4)
    before = _snapshot(pt)
    with pytest.raises(
        AdmissionError, match="KV pages exhausted: sequence needs 2 more pages, 1 free of 4"
    ) as e:
        pt.reserve("b", 5)
    assert e.value.numbers == {"needed": 2, "free": 1}
    assert _snapshot(pt) == before
    pt.check()


def test_check_catches_a_corrupted_table():
    pt = PageTable(6, 4)
    pt.reserve("a", 8)
    pt.pages["a"].append(pt.pages["a"][0])  # owned twice
    with pytest.raises(AssertionError, match="owned twice"):
        pt.check()
    pt = PageTable(6, 4)
    pt.reserve("a", 8)
    pt.tokens["a"] = 12  # says 3 pages but owns 2
    with pytest.raises(AssertionError, match="page count"):
        pt.check()


# ------------------------------------------------------------------ block tables and slots


def test_block_table_pads_with_page_zero():
    pt = PageTable(16, 4)
    pt.reserve("a", 9)  # pages 1, 2, 3
    pt.reserve("b", 1)  # page 4
    bt = pt.block_table(["b", None, "a", "gone"], width=4)
    assert bt.dtype == np.int32
    np.testing.assert_array_equal(bt, [[4, 0, 0, 0], [0, 0, 0, 0], [1, 2, 3, 0], [0, 0, 0, 0]])
    assert pt.block_table([], width=3).shape == (0, 3)
    with pytest.raises(ValueError, match="owns 3 pages > block table width 2"):
        pt.block_table(["a"], width=2)


def test_slot_values_are_page_times_size_plus_offset():
    pt = PageTable(16, 4)
    pt.reserve("x", 3)  # page 1, so the next sequence's pages are not contiguous with it
    pt.reserve("a", 6)  # pages 2, 3
    pt.reserve("x", 5)  # page 4
    pt.reserve("a", 10)  # page 5
    assert pt.pages["a"] == [2, 3, 5]
    s = pt.slots("a", 0, 10)
    assert s.dtype == np.int32
    np.testing.assert_array_equal(s, [8, 9, 10, 11, 12, 13, 14, 15, 20, 21])
    np.testing.assert_array_equal(pt.slots("a", 7, 2), [15, 20])
    assert pt.slots("a", 3, 0).tolist() == []
    with pytest.raises(IndexError, match="position 12 has no page reserved"):
        pt.slots("a", 10, 3)


def test_slots_mark_dirty_only_when_asked():
    pt = PageTable(16, 4)
    pt.reserve("a", 16)  # pages 1..4
    pt.slots("a", 0, 4, mark_dirty=False)
    assert pt.take_dirty().tolist() == []
    pt.slots("a", 3, 2)  # positions 3, 4: pages 1 and 2
    assert pt.take_dirty().tolist() == [1, 2]
    assert pt.take_dirty().tolist() == []  # take clears
    pt.slots("a", 15, 1)
    pt.clear_dirty()
    assert pt.take_dirty().tolist() == []


def test_dirty_record_is_per_slot():
    """Migration patches the slots a step wrote: the record keeps slots, not only pages, and
    taking either view consumes the record."""
    pt = PageTable(16, 4)
    pt.reserve("a", 16)  # pages 1..4: slots 4..19
    pt.reserve("b", 5)  # pages 5, 6: slots 20..27
    written = np.concatenate([pt.slots("a", 3, 2), pt.slots("b", 4, 1)])
    assert sorted(written.tolist()) == [7, 8, 24]
    assert pt.take_dirty_slots().tolist() == [7, 8, 24]
    assert pt.take_dirty_slots().tolist() == []
    pt.slots("a", 0, 1)
    assert pt.take_dirty().tolist() == [1]
    assert pt.take_dirty_slots().tolist() == []  # the page view consumed it
    pt.slots("b", 0, 1)
    pt.clear_dirty()
    assert pt.take_dirty_slots().tolist() == []


def test_apply_moves_carries_dirty_slots_with_their_offsets():
    pt = PageTable(10, 4)
    pt.reserve("a", 4)  # page 1
    pt.reserve("b", 8)  # pages 2, 3
    pt.free("a")
    pt.slots("b", 6, 1)  # page 3, offset 2: slot 14
    pt.apply_moves(*pt.compaction_moves(3))  # page 3 -> page 1
    assert pt.take_dirty_slots().tolist() == [1 * 4 + 2]


# ------------------------------------------------------------------ compaction and resize


def _fragmented() -> PageTable:
    """Three live sequences with holes below and pages far above (ids 1..19 of 20)."""
    pt = PageTable(20, 2)
    for i in range(8):
        pt.reserve(f"f{i}", 4)  # 2 pages each: ids 1..16
    pt.reserve("a", 3)  # 17, 18
    for i in (0, 2, 3, 6):
        pt.free(f"f{i}")  # holes: 1, 2, 5, 6, 7, 8, 13, 14
    pt.reserve("a", 6)  # takes 1
    return pt


def test_compaction_moves_bring_live_pages_below_target_and_keep_mappings():
    pt = _fragmented()
    seqs = list(pt.pages)
    slots_before = {s: pt.slots(s, 0, pt.tokens[s], mark_dirty=False) for s in seqs}
    # A device stand-in: every slot holds (sequence, position) of the token written there.
    device = {int(slot): (s, pos) for s in seqs for pos, slot in enumerate(slots_before[s])}
    live = pt.live_pages()
    target = len(live) + 1
    src, dst = pt.compaction_moves(target)
    assert _snapshot(pt)[1] == {s: list(p) for s, p in pt.pages.items()}  # pure planning
    assert src.dtype == np.int32 and dst.dtype == np.int32
    assert set(src.tolist()) == {p for p in live.tolist() if p >= target}
    assert len(set(dst.tolist())) == len(dst) and all(0 < d < target for d in dst)
    assert not set(dst.tolist()) & set(live.tolist())
    # the device copies page src[i] to dst[i] before the table renames
    ps = pt.page_size
    moved = {}
    for slot, val in device.items():
        page, off = divmod(slot, ps)
        if page in src:
            page = int(dst[src.tolist().index(page)])
        moved[page * ps + off] = val
    pt.apply_moves(src, dst)
    pt.check()
    assert pt.max_live_page() < target
    for s in seqs:
        for pos, slot in enumerate(pt.slots(s, 0, pt.tokens[s], mark_dirty=False)):
            assert moved[int(slot)] == (s, pos)
    pt.resize(target)
    pt.check()
    assert pt.num_pages == target and pt.num_free == 0


def test_compaction_with_nothing_above_target_moves_nothing():
    pt = PageTable(10, 4)
    pt.reserve("a", 8)
    src, dst = pt.compaction_moves(6)
    assert src.tolist() == [] and dst.tolist() == []
    before = _snapshot(pt)
    pt.apply_moves(src, dst)
    assert _snapshot(pt) == before


def test_compaction_refusal_changes_nothing():
    pt = _fragmented()
    live = len(pt.live_pages())
    before = _snapshot(pt)
    with pytest.raises(
        AdmissionError, match=f"cannot shrink KV to {live} pages: {live} pages in use"
    ) as e:
        pt.compaction_moves(live)
    assert e.value.numbers == {"pages_in_use": live, "fit": live - 1}
    assert _snapshot(pt) == before


def test_apply_moves_carries_dirty_bits_with_the_pages():
    pt = PageTable(10, 4)
    pt.reserve("a", 4)  # page 1
    pt.reserve("b", 8)  # pages 2, 3
    pt.free("a")
    pt.slots("b", 4, 1)  # dirty page 3
    src, dst = pt.compaction_moves(3)
    assert (src.tolist(), dst.tolist()) == ([3], [1])
    pt.apply_moves(src, dst)
    assert pt.pages["b"] == [2, 1]
    assert pt.take_dirty().tolist() == [1]


def test_resize_grows_and_shrinks_and_refuses_when_pages_sit_above():
    pt = PageTable(6, 4)
    pt.reserve("a", 8)  # 1, 2
    pt.slots("a", 0, 8)
    pt.resize(12)
    assert (pt.num_pages, pt.num_free) == (12, 9)
    assert len(pt.dirty) == 12
    pt.check()
    pt.reserve("b", 4 * 8)  # 3..10
    pt.free("a")
    before = _snapshot(pt)
    with pytest.raises(AdmissionError, match="cannot resize to 8 pages: page 10 is in use"):
        pt.resize(8)
    assert _snapshot(pt) == before
    with pytest.raises(ValueError, match="num_pages must be >= 2"):
        pt.resize(1)
    assert _snapshot(pt) == before
    pt.free("b")
    pt.reserve("c", 4)  # 1
    pt.resize(3)
    assert (pt.num_pages, pt.num_free, len(pt.dirty)) == (3, 1, 3)
    assert pt.take_dirty().tolist() == [1, 2]  # written before, kept through both resizes
    pt.check()


def test_copy_allocation_mirrors_tokens_with_own_page_ids():
    src = PageTable(20, 4)
    src.reserve("x", 2)
    src.reserve("a", 9)
    src.reserve("b", 4)
    src.free("x")
    dst = PageTable(8, 4)
    dst.copy_allocation(src)
    assert dst.tokens == src.tokens
    assert {s: len(p) for s, p in dst.pages.items()} == {s: len(p) for s, p in src.pages.items()}
    assert dst.pages["a"] == [1, 2, 3]
    dst.check()


# ------------------------------------------------------------------ the model-based property

SEQS = st.integers(0, 5)


class PageTableMachine(RuleBasedStateMachine):
    """Random reserve / write / free / compact / take_dirty against an independent model.

    The model keeps, per sequence, how many tokens were written; a stand-in device memory
    {slot: (seq, position)} written through the slots the table hands out; and the set of pages
    those slots fall in since the last `take_dirty` (computed from slot values alone).
    """

    @initialize(num_pages=st.integers(2, 40), page_size=st.sampled_from([1, 2, 4]))
    def setup(self, num_pages, page_size):
        self.pt = PageTable(num_pages, page_size)
        self.written: dict[int, int] = {}
        self.device: dict[int, tuple[int, int]] = {}
        self.expected_dirty: set[int] = set()

    @rule(seq=SEQS, extra=st.integers(0, 10))
    def reserve(self, seq, extra):
        pt = self.pt
        total = pt.tokens.get(seq, 0) + extra
        if pt.can_reserve(seq, total):
            pt.reserve(seq, total)
            self.written.setdefault(seq, 0)
            assert len(pt.pages[seq]) == -(-total // pt.page_size)
        else:
            before = _snapshot(pt)
            with pytest.raises(AdmissionError):
                pt.reserve(seq, total)
            assert _snapshot(pt) == before

    @rule(seq=SEQS, count=st.integers(0, 12))
    def write(self, seq, count):
        pt = self.pt
        if seq not in pt.pages:
            return
        start = self.written[seq]
        count = min(count, pt.tokens[seq] - start)
        slots = pt.slots(seq, start, count)
        assert slots.shape == (count,)
        ps = pt.page_size
        for pos, slot in zip(range(start, start + count), slots.tolist(), strict=True):
            page, off = divmod(slot, ps)
            assert page == pt.pages[seq][pos // ps] and off == pos % ps
            self.device[slot] = (seq, pos)
            self.expected_dirty.add(page)
        self.written[seq] = start + count

    @rule(seq=SEQS)
    def free(self, seq):
        owned = len(self.pt.pages.get(seq, []))
        assert self.pt.free(seq) == owned
        self.written.pop(seq, None)
        self.device = {k: v for k, v in self.device.items() if v[0] != seq}

    @rule()
    def take_dirty(self):
        got = self.pt.take_dirty()
        assert got.tolist() == sorted(self.expected_dirty)
        self.expected_dirty = set()
        assert not self.pt.dirty.any()

    @precondition(lambda self: len(self.pt.live_pages()) < self.pt.max_live_page())
    @rule(extra=st.integers(0, 2))
    def compact_and_resize(self, extra):
        """Shrinks to the live pages plus `extra` when a hole sits below a live page."""
        pt = self.pt
        target = len(pt.live_pages()) + 1 + extra
        src, dst = pt.compaction_moves(target)
        rename = dict(zip(src.tolist(), dst.tolist(), strict=True))
        ps = pt.page_size
        self.device = {
            rename.get(slot // ps, slot // ps) * ps + slot % ps: v
            for slot, v in self.device.items()
        }
        dirty = {rename.get(p, p) for p in self.expected_dirty}
        # a free page that was written and is a move's target stays dirty (bits are or-ed)
        pt.apply_moves(src, dst)
        pt.resize(target)
        self.expected_dirty = {p for p in dirty if p < target}

    @rule(more=st.integers(1, 8))
    def grow(self, more):
        self.pt.resize(self.pt.num_pages + more)
        assert self.pt.num_free == self.pt.num_pages - 1 - len(self.pt.live_pages())

    @precondition(lambda self: len(self.pt.live_pages()) >= 1)
    @rule(short=st.integers(1, 3))
    def refused_compaction(self, short):
        pt = self.pt
        target = len(pt.live_pages()) + 1 - short
        before = _snapshot(pt)
        with pytest.raises(AdmissionError, match="cannot shrink KV"):
            pt.compaction_moves(target)
        assert _snapshot(pt) == before

    @invariant()
    def table_is_consistent(self):
        pt = self.pt
        pt.check()
        dirty = pt.dirty.copy()
        for seq, n in self.written.items():
            for pos, slot in enumerate(pt.slots(seq, 0, n, mark_dirty=False).tolist()):
                assert self.device[slot] == (seq, pos)
        np.testing.assert_array_equal(pt.dirty, dirty)
        assert set(np.flatnonzero(pt.dirty).tolist()) == self.expected_dirty


PageTableMachine.TestCase.settings = settings(
    max_examples=200, stateful_step_count=40, suppress_health_check=[HealthCheck.too_slow]
)
test_page_table_model = PageTableMachine.TestCase

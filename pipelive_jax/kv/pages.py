"""Host-side book-keeping of one stage's paged KV: allocator, block tables, slots, dirty bitmap.

One `PageTable` per pipeline stage: every layer of the stage shares its page-id space, since
every layer holds the same tokens (DESIGN.md §4). Page 0 is reserved as the padding page that
block tables point at past a sequence's end.

Writes are recorded per slot (a bitmap of num_pages * page_size bools): a decode step writes one
slot per sequence, so patching a migration by slot moves page_size times fewer bytes than by
page. `dirty` is the page-level view of the same record.

Invariants (checked by `check()` in tests):
  - every page id in [1, num_pages) is either free or owned by exactly one sequence;
  - a sequence owns exactly ceil(tokens_reserved / page_size) pages;
  - the dirty bitmap only marks slots handed out by `slots()` since it was last cleared.
"""

from __future__ import annotations

import heapq
from collections.abc import Hashable, Iterable

import numpy as np

from pipelive_jax.errors import AdmissionError

SeqId = Hashable


class PageTable:
    """Page allocation for the sequences one stage serves."""

    def __init__(self, num_pages: int, page_size: int) -> None:
        if num_pages < 2:
            raise ValueError(f"num_pages must be >= 2 (page 0 is reserved), got {num_pages}")
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.num_pages = num_pages
        self.page_size = page_size
        self._free: list[int] = list(range(1, num_pages))  # min-heap: low ids first
        heapq.heapify(self._free)
        self.pages: dict[SeqId, list[int]] = {}
        self.tokens: dict[SeqId, int] = {}  # tokens reserved (written or about to be)
        self.dirty_slots = np.zeros(num_pages * page_size, dtype=bool)

    # ------------------------------------------------------------------ queries

    @property
    def dirty(self) -> np.ndarray:
        """[num_pages] bool: pages with a slot written since the dirty record was last cleared."""
        return np.asarray(self.dirty_slots.reshape(self.num_pages, self.page_size).any(axis=1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_pages - 1 - len(self._free)

    def pages_needed(self, seq: SeqId, total_tokens: int) -> int:
        """Extra pages `seq` needs to hold `total_tokens` tokens."""
        have = len(self.pages.get(seq, ()))
        return max(0, -(-total_tokens // self.page_size) - have)

    def can_reserve(self, seq: SeqId, total_tokens: int) -> bool:
        return self.pages_needed(seq, total_tokens) <= len(self._free)

    def live_pages(self) -> np.ndarray:
        """Sorted ids of every owned page."""
        ids = [p for ps in self.pages.values() for p in ps]
        return np.array(sorted(ids), dtype=np.int32)

    def max_live_page(self) -> int:
        return max((max(ps) for ps in self.pages.values() if ps), default=0)

    # ------------------------------------------------------------------ updates

    def reserve(self, seq: SeqId, total_tokens: int) -> None:
        """Makes `seq` own enough pages for `total_tokens` tokens (allocating low ids first)."""
        need = self.pages_needed(seq, total_tokens)
        if need > len(self._free):
            raise AdmissionError(
                f"KV pages exhausted: sequence needs {need} more pages, {len(self._free)} free "
                f"of {self.num_pages - 1}",
                needed=need,
                free=len(self._free),
            )
        owned = self.pages.setdefault(seq, [])
        owned.extend(heapq.heappop(self._free) for _ in range(need))
        self.tokens[seq] = max(self.tokens.get(seq, 0), total_tokens)

    def free(self, seq: SeqId) -> int:
        """Releases every page of `seq`; returns how many."""
        owned = self.pages.pop(seq, [])
        self.tokens.pop(seq, None)
        for p in owned:
            heapq.heappush(self._free, p)
        return len(owned)

    def slots(self, seq: SeqId, start: int, count: int, *, mark_dirty: bool = True) -> np.ndarray:
        """Slot ids [count] for positions start..start+count of `seq` (pages must be reserved).

        The slots are marked dirty: this is the host's record of what a step writes, so
        migration knows what to patch without reading the device.
        """
        pos = np.arange(start, start + count)
        owned = np.asarray(self.pages[seq], dtype=np.int64)
        page_idx = pos // self.page_size
        if count and page_idx[-1] >= len(owned):
            raise IndexError(f"sequence {seq!r}: position {start + count - 1} has no page reserved")
        slots = (owned[page_idx] * self.page_size + pos % self.page_size).astype(np.int32)
        if mark_dirty:
            self.dirty_slots[slots] = True
        return slots

    def block_table(self, seqs: Iterable[SeqId | None], width: int) -> np.ndarray:
        """[len(seqs), width] int32 page ids, padded with page 0; None rows are padding."""
        seqs = list(seqs)
        out = np.zeros((len(seqs), width), dtype=np.int32)
        for i, s in enumerate(seqs):
            if s is None:
                continue
            owned = self.pages.get(s, [])
            if len(owned) > width:
                raise ValueError(
                    f"sequence {s!r} owns {len(owned)} pages > block table width {width}"
                )
            out[i, : len(owned)] = owned
        return out

    def take_dirty(self) -> np.ndarray:
        """Ids of pages with a slot written since the last take, and clears the record."""
        ids = np.flatnonzero(self.dirty).astype(np.int32)
        self.dirty_slots[:] = False
        return ids

    def take_dirty_slots(self) -> np.ndarray:
        """Slot ids (page * page_size + offset) written since the last take; clears the record."""
        ids = np.flatnonzero(self.dirty_slots).astype(np.int32)
        self.dirty_slots[:] = False
        return ids

    def clear_dirty(self) -> None:
        self.dirty_slots[:] = False

    # ------------------------------------------------------------------ layout changes

    def compaction_moves(self, target_pages: int) -> tuple[np.ndarray, np.ndarray]:
        """Moves (src [k], dst [k]) that bring every live page below `target_pages`.

        Pure planning: nothing changes until `apply_moves`. Refuses (AdmissionError) when the
        live pages cannot fit.
        """
        live = self.live_pages()
        if len(live) > target_pages - 1:
            raise AdmissionError(
                f"cannot shrink KV to {target_pages} pages: {len(live)} pages in use "
                f"(at most {target_pages - 1} fit, page 0 is reserved)",
                pages_in_use=int(len(live)),
                fit=target_pages - 1,
            )
        src = live[live >= target_pages]
        free_low = np.setdiff1d(np.arange(1, target_pages, dtype=np.int32), live)
        return src.astype(np.int32), free_low[: len(src)].astype(np.int32)

    def apply_moves(self, src: np.ndarray, dst: np.ndarray) -> None:
        """Renames pages src[i] -> dst[i] in every sequence's list (after the device copied them)."""
        rename = dict(zip(src.tolist(), dst.tolist(), strict=True))
        for owned in self.pages.values():
            owned[:] = [rename.get(p, p) for p in owned]
        if len(src):
            by_page = self.dirty_slots.reshape(self.num_pages, self.page_size)
            moved_dirty = by_page[src].copy()
            by_page[src] = False
            by_page[dst] |= moved_dirty
        live = set(self.live_pages().tolist())
        self._free = [p for p in range(1, self.num_pages) if p not in live]
        heapq.heapify(self._free)

    def resize(self, num_pages: int) -> None:
        """Changes capacity; live pages must already sit below `num_pages`."""
        if num_pages < 2:
            raise ValueError(f"num_pages must be >= 2, got {num_pages}")
        if self.max_live_page() >= num_pages:
            raise AdmissionError(
                f"cannot resize to {num_pages} pages: page {self.max_live_page()} is in use "
                "(compact first)",
                max_live_page=self.max_live_page(),
            )
        live = set(self.live_pages().tolist())
        self.num_pages = num_pages
        self._free = [p for p in range(1, num_pages) if p not in live]
        heapq.heapify(self._free)
        dirty = np.zeros(num_pages * self.page_size, dtype=bool)
        k = min(len(dirty), len(self.dirty_slots))
        dirty[:k] = self.dirty_slots[:k]
        self.dirty_slots = dirty

    def copy_allocation(self, other: PageTable) -> None:
        """Mirrors another table's sequences (same tokens, own page ids) into this empty one.

        Used when a new stage appears: it must serve the sequences already running.
        """
        for seq, tokens in other.tokens.items():
            self.reserve(seq, tokens)

    def check(self) -> None:
        """Asserts the invariants in the module docstring."""
        owned = [p for ps in self.pages.values() for p in ps]
        assert len(owned) == len(set(owned)), "a page is owned twice"
        assert not set(owned) & set(self._free), "a page is both owned and free"
        assert 0 not in owned and 0 not in self._free, "page 0 is reserved"
        assert len(owned) + len(self._free) == self.num_pages - 1, "pages leaked"
        for seq, ps in self.pages.items():
            assert len(ps) == -(-self.tokens[seq] // self.page_size), f"{seq!r} page count"

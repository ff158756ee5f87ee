"""Continuous batching: which requests run in the next step, and how many tokens each.

Each step the scheduler fills a token budget: first the running requests in arrival order
(a decode is one token, an unfinished prefill the next chunk), then waiting requests, first
come first served, as long as every stage has the KV pages for them. When a running request
cannot get a page, the most recently arrived running request is preempted by recompute: its
pages are freed and it waits again at the head of the queue with the tokens it already has, so
it later produces exactly what it would have (nothing is lost, nothing is sampled twice).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from pipelive_jax.errors import ConfigError
from pipelive_jax.kv.pages import PageTable
from pipelive_jax.serving.request import Request, RequestState


@dataclass(frozen=True)
class SchedulerConfig:
    """Limits of one step. `max_num_batched_tokens` bounds prefill chunks and the step's size."""

    max_num_seqs: int = 32
    max_num_batched_tokens: int = 512
    max_model_len: int = 2048

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")


@dataclass
class ScheduledSeq:
    request: Request
    start: int  # first position fed this step (== request.num_computed)
    num_tokens: int  # tokens fed this step

    @property
    def completes_prompt(self) -> bool:
        """Whether, after this step, every token the request has is in the cache (so it samples)."""
        return self.start + self.num_tokens == self.request.num_tokens


class Scheduler:
    """FCFS continuous batching over the page tables of all stages (host state).

    Invariants: a request is in exactly one of `waiting`, `running`, or neither (finished);
    a running request owns pages for `num_computed` tokens (plus this step's) in every stage.
    """

    def __init__(self, config: SchedulerConfig, page_tables: Sequence[PageTable]) -> None:
        self.config = config
        self.page_tables = list(page_tables)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def set_page_tables(self, page_tables: Sequence[PageTable]) -> None:
        """Swaps the stages' tables (a reconfiguration's switch)."""
        self.page_tables = list(page_tables)

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ------------------------------------------------------------------ pages over all stages

    def _can_reserve(self, req: Request, total: int) -> bool:
        return all(pt.can_reserve(req.request_id, total) for pt in self.page_tables)

    def _reserve(self, req: Request, total: int) -> None:
        for pt in self.page_tables:
            pt.reserve(req.request_id, total)

    def free(self, req: Request) -> None:
        for pt in self.page_tables:
            pt.free(req.request_id)

    def _preempt(self, req: Request) -> None:
        self.free(req)
        self.running.remove(req)
        req.state = RequestState.WAITING
        req.num_computed = 0
        req.metrics.preemptions += 1
        self.num_preemptions += 1
        # back to the head of the queue, keeping arrival order among the preempted
        items = list(self.waiting)
        idx = 0
        while idx < len(items) and items[idx].metrics.arrival_time <= req.metrics.arrival_time:
            idx += 1
        items.insert(idx, req)
        self.waiting = deque(items)

    # ------------------------------------------------------------------ one step

    def schedule(self) -> list[ScheduledSeq]:
        """Picks this step's sequences and reserves their pages; [] when nothing can run."""
        budget = self.config.max_num_batched_tokens
        out: list[ScheduledSeq] = []
        for req in list(self.running):
            if req not in self.running:  # preempted below for an earlier request
                continue
            if budget == 0 or len(out) >= self.config.max_num_seqs:
                break
            n = min(req.num_tokens - req.num_computed, budget)
            total = req.num_computed + n
            while not self._can_reserve(req, total):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is req:
                    break
            if req.state is not RequestState.RUNNING:
                continue
            self._reserve(req, total)
            out.append(ScheduledSeq(req, req.num_computed, n))
            budget -= n
        while self.waiting and budget > 0 and len(out) < self.config.max_num_seqs:
            req = self.waiting[0]
            n = min(req.num_tokens - req.num_computed, budget)
            if not self._can_reserve(req, req.num_computed + n):
                break
            self.waiting.popleft()
            self._reserve(req, req.num_computed + n)
            req.state = RequestState.RUNNING
            if req.metrics.first_scheduled_time is None:
                req.metrics.first_scheduled_time = time.perf_counter()
            self.running.append(req)
            out.append(ScheduledSeq(req, req.num_computed, n))
            budget -= n
        return out

    def finish(self, req: Request, reason: str) -> None:
        """Ends a request and frees its pages at once (also used by abort)."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.free(req)
        req.state = RequestState.FINISHED
        req.finish_reason = reason
        req.metrics.finished_time = time.perf_counter()

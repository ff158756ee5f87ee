"""The live reconfiguration controller: a state machine advanced at the engine's step boundaries.

    VALIDATE -> PREPARE -> STAGE_WEIGHTS -> PRECOPY -> PATCH (rounds) -> SWITCH -> RESIZE -> DONE
                                                                     \\-> ABORTED (rollback)

`Engine.step()` calls `before_step()` and `after_step()`; every copy is dispatched between two
steps, so it sees a consistent state, and serving goes on between phases. The new plan's stage
functions are compiled ahead of time on a background thread (PREPARE), so the switch itself is
a final patch of the slots written by the last old step and a swap of references. In live mode
that patch is dispatched right behind the last old step's stage functions (`after_dispatch`) and
not waited on: the new plan's stage functions take the patched pools as inputs, so XLA orders
them, and the pause holds neither the copy nor its dispatch.

New stages are built beside the old ones ("pending"): a stage on a device that already serves
reuses that device's page table (same page ids, so migrated pages land at the target's id for
the same block) and the pools and weights of the layers that stay; a stage on a new device gets a
page table that mirrors the running sequences. Until the switch the old stages are untouched
(except a shrink of their capacity where admission needs it), which is what makes abort a
matter of dropping the pending objects.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from pipelive_jax.errors import AdmissionError, PipeliveError, ReconfigError
from pipelive_jax.kv.pages import PageTable
from pipelive_jax.kv.pools import StagePools
from pipelive_jax.memory import DeviceBudget, check_admission
from pipelive_jax.models.llama import StageParams
from pipelive_jax.plan import parse_plan, plan_diff
from pipelive_jax.reconfig.migrate import SLOT_COPY_MAX, Route, page_moves, slot_moves
from pipelive_jax.serving.pipeline import shape_order, start_compile_thread

if TYPE_CHECKING:
    from pipelive_jax.serving.engine import Engine
    from pipelive_jax.serving.pipeline import BatchShape, StageRuntime

log = logging.getLogger("pipelive.reconfig")

PHASES = ("VALIDATE", "PREPARE", "STAGE_WEIGHTS", "PRECOPY", "PATCH", "SWITCH", "RESIZE", "DONE")
MODES = ("live", "stop_and_copy", "restart")


@dataclass
class ReconfigReport:
    """What a reconfiguration did. Times in milliseconds, bytes as counted by the copies.

    pause_ms: end of the last old-plan step to the start of the first new-plan step.
    forced_stop_and_copy: the patch rounds ran out (max_rounds) before a round fit half the pause
    budget, so the last patch (inside the pause) was as large as it was.
    round_ms: wall time of each patch round (copy dispatched and finished); the last one ran
    inside the pause.
    precopy_chunks: (pages, ms) of each pre-copy chunk, in order (how the pacing went).
    """

    ok: bool
    mode: str
    source: str
    target: str
    pause_ms: float | None = None
    rounds: int = 0
    bytes_weights: int = 0
    bytes_kv_precopy: int = 0
    bytes_kv_patched: int = 0
    bytes_kv_final: int = 0
    phase_ms: dict[str, float] = field(default_factory=dict)
    reason: str | None = None
    aborted_in: str | None = None
    forced_stop_and_copy: bool = False
    compiled_in_pause: int = 0
    recomputed_tokens: int = 0
    resize_ms: float | None = None
    verified_pages: int | None = None
    round_dirty_bytes: list[int] = field(default_factory=list)
    round_ms: list[float] = field(default_factory=list)
    precopy_chunks: list[tuple[int, float]] = field(default_factory=list)
    total_ms: float | None = None
    error_traceback: str | None = None

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


class ReconfigHandle:
    """What `Engine.reconfigure` returns: watch, wait for, or abort one reconfiguration."""

    def __init__(self, ctl: ReconfigController) -> None:
        self._ctl = ctl
        self._done = threading.Event()

    def done(self) -> bool:
        return self._done.is_set()

    def status(self) -> dict[str, Any]:
        c = self._ctl
        return {
            "phase": c.phase,
            "mode": c.mode,
            "target": str(c.target),
            "round": c.report.rounds,
            "dirty_bytes_left": c.dirty_bytes_left,
            "elapsed_ms": (time.perf_counter() - c.t_start) * 1e3,
            "done": self.done(),
            "ok": c.report.ok if self.done() else None,
        }

    def report(self) -> ReconfigReport:
        return self._ctl.report

    def wait(self, timeout: float | None = None) -> ReconfigReport:
        """Blocks until done (the engine loop must be running on its own thread, or someone
        else must call `step()`); raises TimeoutError."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"reconfiguration still in phase {self._ctl.phase}")
        return self._ctl.report

    def abort(self, reason: str = "aborted by user") -> None:
        """Requests a rollback at the next step boundary (no effect once switched)."""
        self._ctl.abort_requested = reason


@dataclass
class _Pending:
    """The new plan's stages, built beside the old ones until the switch."""

    stages: list[StageRuntime]
    new_tables: list[PageTable]  # tables created for new devices (mirrors)
    routes: list[Route]
    weight_moves: list[tuple[Any, Any, Any]]  # (container, slot, device) still to move
    weight_arrays: list[Any]  # what was moved (to wait on)


# Pre-copy at step boundaries, paced by a time credit: each boundary earns PRECOPY_STEP_FRACTION
# of the last step's duration (kept up to PRECOPY_BURST boundaries' worth), and chunks of pages
# (one route's at a time, each finished before the next) run while the credit covers one as long
# as the last; their time is spent from it, so over the pre-copy the boundaries cost that
# fraction of the steps on average whatever a chunk takes. Why this shape:
# - Copies left running under the next step cost that step several times their own time on these
#   two shared cores (the step's threads wait on a core busy copying), so each chunk is waited for.
# - The boundary work is the whole cost: with every other boundary's copy skipped, steps after a
#   copy and steps after none computed alike (176 vs 175 ms at 8 x 1024 on SmolLM2, 150 steps
#   each), so the fraction is what the migration steps pay, under the 10% target with room for
#   the machine's drift (+-8% over a migration's seconds).
# - A budget spent at every boundary copies slowly when it is small: the first chunk after a step
#   pays a fixed cost (2% at every boundary moved 0.5 GB/s against 1.3 GB/s at 4%, and the
#   pre-copy took 80 steps instead of 18 at 32 x 256). A long pre-copy is not free either: the
#   first patch round copies everything the steps wrote meanwhile.
# The chunk adapts to the burst (PRECOPY_BURST x the per-step budget): halved (down to
# PRECOPY_MIN_CHUNK_PAGES, the smallest compiled copy) when one chunk overran it, doubled (up to
# PRECOPY_MAX_CHUNK_PAGES: bigger copies run slower per byte, see migrate.COPY_PIECE_PAGES) when
# it took under a quarter of it. When the credit is full and still short of one chunk, one chunk
# runs anyway (progress; the credit goes below zero and the next boundaries repay it).
PRECOPY_CHUNK_PAGES = 16
PRECOPY_MIN_CHUNK_PAGES = 8
PRECOPY_MAX_CHUNK_PAGES = 32
PRECOPY_STEP_FRACTION = 0.03
PRECOPY_BURST = 4.0


@dataclass
class PrecopyPacer:
    """The pre-copy's pacing (host state; see the comment above): the time credit in seconds,
    the size of the next chunk and how long it is expected to take."""

    credit_s: float = 0.0
    budget_s: float = 0.0  # earned per boundary
    cap_s: float = 0.0
    copied_here: bool = False  # a chunk ran at this boundary
    chunk_pages: int = field(default_factory=lambda: PRECOPY_CHUNK_PAGES)
    chunk_s: float = 0.0  # expected time of the next chunk (0: none ran yet)

    def boundary(self, step_s: float) -> None:
        """A step ended after `step_s` seconds: earn its share."""
        self.budget_s = PRECOPY_STEP_FRACTION * step_s
        self.cap_s = PRECOPY_BURST * self.budget_s
        self.credit_s = min(self.credit_s + self.budget_s, self.cap_s)
        self.copied_here = False

    def may_copy(self) -> bool:
        """Whether the next chunk runs now: the credit covers its expected time, or it cannot
        grow to (full, or nothing earned) and no chunk ran at this boundary yet."""
        if self.chunk_s <= self.credit_s:
            return True
        stuck = self.credit_s >= self.cap_s or self.budget_s <= 0.0
        return stuck and not self.copied_here

    def spent(self, pages: int, took_s: float) -> None:
        """A chunk of `pages` pages took `took_s`: pay for it and size the next one (expected
        to take proportionally as long)."""
        self.credit_s -= took_s
        self.copied_here = True
        self.chunk_pages = next_chunk_pages(pages, took_s, self.cap_s)
        self.chunk_s = took_s * self.chunk_pages / pages


# The PREPARE thread's memory-bound work (zeroed pools for incoming layers, weight copies between
# host devices) competes with the serving steps for the same cores and memory bandwidth: done
# flat out it made those steps ~2x slower. Each piece is waited for and followed by an idle
# spell STAGING_IDLE_RATIO times as long, so it takes at most 1/(1 + ratio) of the time.
STAGING_IDLE_RATIO = 3.0


@contextlib.contextmanager
def _paced() -> Iterator[None]:
    t0 = time.perf_counter()
    yield
    time.sleep((time.perf_counter() - t0) * STAGING_IDLE_RATIO)


def next_chunk_pages(pages: int, took_s: float, budget_s: float) -> int:
    """The pre-copy chunk after a chunk of `pages` pages took `took_s` against `budget_s` (the
    pacer's burst): halved when it overran (not below PRECOPY_MIN_CHUNK_PAGES, nor above `pages`),
    doubled when it took under a quarter (not above PRECOPY_MAX_CHUNK_PAGES), else kept."""
    if took_s > budget_s:
        return max(pages // 2, min(pages, PRECOPY_MIN_CHUNK_PAGES))
    if took_s < budget_s / 4:
        return max(pages, min(pages * 2, PRECOPY_MAX_CHUNK_PAGES))
    return pages


class ReconfigController:
    """Drives one reconfiguration of `engine` to `plan` (host state; engine lock held by caller)."""

    def __init__(
        self,
        engine: Engine,
        plan: Any,
        *,
        mode: str = "live",
        pause_budget_ms: float = 10.0,
        max_rounds: int = 8,
        timeout_s: float = 600.0,
        hooks: dict[str, Callable[[ReconfigController], None]] | None = None,
        verify: bool = False,
        on_full: str = "refuse",
    ) -> None:
        if mode not in MODES:
            raise ReconfigError(f"unknown mode {mode!r}; choose one of {MODES}")
        if not (isinstance(max_rounds, int) and max_rounds >= 1):
            raise ReconfigError(f"max_rounds must be an integer >= 1, got {max_rounds!r}")
        if not pause_budget_ms > 0:
            raise ReconfigError(f"pause_budget_ms must be > 0, got {pause_budget_ms!r}")
        self.engine = engine
        self.mode = mode
        self.pause_budget_ms = float(pause_budget_ms)
        self.max_rounds = max_rounds
        # The timeout leaves out the time PREPARE's background thread works (weights, pools,
        # compiles): it compiles every shape the old plan serves, ~4 s per shape and stage for
        # SmolLM2 on a 2-core CPU, so a server that met many shapes would time out in a
        # PREPARE that is making progress. The timeout is for a reconfiguration that stops
        # converging; a background thread that never ends is for `abort`.
        self.timeout_s = timeout_s
        self._bg_s = 0.0  # seconds a background thread of this reconfiguration was running
        self._bg_since: float | None = None
        self.hooks = hooks or {}
        self.verify = verify
        self.source = engine.plan
        # VALIDATE happens here, synchronously, so a bad plan is refused at the call.
        self.target = parse_plan(
            plan, num_layers=engine.defs.cfg.num_layers, num_devices=len(engine.devices)
        )
        self.diff = plan_diff(self.source, self.target)
        self.report = ReconfigReport(
            ok=False, mode=mode, source=str(self.source), target=str(self.target)
        )
        self.handle = ReconfigHandle(self)
        self.phase = "VALIDATE"
        self.t_start = time.perf_counter()
        self._t_phase = self.t_start
        self.abort_requested: str | None = None
        self.dirty_bytes_left: int | None = None
        self._pending: _Pending | None = None
        self._compile_thread: threading.Thread | None = None
        self._compile_error: BaseException | None = None
        self._shrunk: list[tuple[StageRuntime, int]] = []
        self._shrink_to: list[tuple[StageRuntime, int]] | None = None
        self._resize_started = False
        self._final_step_done = False  # live: the old-plan step after the last timed round ran
        self._precopied: dict[int, np.ndarray] | None = None  # route -> source pages copied
        self._pacer = PrecopyPacer()
        self._precopy_next = 0  # the route the next pre-copy chunk is for (round robin)
        self._step_t0: float | None = None  # when the current engine step began
        self._last_step_s = 0.0  # how long the last engine step took (the pre-copy budget)
        self._old_stages = list(engine.executor.stages)
        self._transition_pages: int | None = None
        self._grow: list[tuple[StageRuntime, int]] = []
        self._run_hook("VALIDATE")
        self._admission()
        if self.diff.is_noop:
            self._finish_ok()
            return
        self._enter("PREPARE")
        try:
            self._start_prepare()
        except Exception as e:  # noqa: BLE001 - a failed PREPARE rolls back like any other
            self._abort(e)

    # ------------------------------------------------------------------ helpers

    def _run_hook(self, phase: str) -> None:
        hook = self.hooks.get(phase)
        if hook is not None:
            hook(self)

    def _enter(self, phase: str) -> None:
        now = time.perf_counter()
        self.report.phase_ms[self.phase] = (
            self.report.phase_ms.get(self.phase, 0.0) + (now - self._t_phase) * 1e3
        )
        log.info("reconfiguration %s -> %s: %s done in %.1f ms, entering %s",
                 self.report.source, self.report.target, self.phase,
                 (now - self._t_phase) * 1e3, phase)  # fmt: skip
        self.phase = phase
        self._t_phase = now

    def _budgets(self) -> dict[int, DeviceBudget] | None:
        c = self.engine.config
        if c.device_memory_bytes is None:
            return None
        devs = set(self.source.devices) | set(self.target.devices)
        return {d: b for d in devs if (b := c.budget(d)) is not None}

    def _admission(self) -> None:
        """Refuses (AdmissionError, nothing changed) a plan whose transition does not fit."""
        eng = self.engine
        budgets = self._budgets()
        used = {st.spec.devices[0]: st.pages.num_used for st in eng.executor.stages}
        if budgets is None:
            # Fixed capacities: every stage of the target gets `pages_for_stage`; the running
            # sequences must fit each of them.
            need = max(used.values(), default=0)
            for i, spec in enumerate(self.target.stages):
                cap = eng.pages_for_stage(self.target, i)
                if need > cap - 1:
                    raise AdmissionError(
                        f"device {spec.devices[0]}: {need} KV pages in use but the new stage "
                        f"holds {cap - 1}",
                        device=spec.devices[0],
                        pages_in_use=need,
                        pages_that_fit=cap - 1,
                    )
            return
        adm = check_admission(
            self.source,
            self.target,
            budgets,
            eng.shape,
            eng.config.page_size,
            used,
            granule=eng.config.page_granule,
        )
        # No stage needs more than the engine's useful capacity, during the transition either.
        self._transition_pages = min(adm.b_shrink, eng.config.useful_pages)
        self._admission_numbers = adm.numbers()

    def _stage_capacity(self, target_index: int | None, existing: int | None) -> int:
        """Capacity of a stage during the transition: an existing stage keeps its pools unless
        admission needs them shrunk to B_shrink; a new stage gets B_shrink (or, with fixed
        capacities or without KV resizing, what the engine gives that stage of the target)."""
        eng = self.engine
        if self._transition_pages is None or not eng.config.kv_resize:
            if existing is not None:
                return existing
            assert target_index is not None
            return eng.pages_for_stage(self.target, target_index)
        if existing is not None:
            return min(existing, self._transition_pages)
        return self._transition_pages

    # ------------------------------------------------------------------ engine hooks

    def before_step(self) -> None:
        self._step_t0 = time.perf_counter()
        try:
            self._check_abort()
            if self.phase == "SWITCH":
                if self.mode == "live" and not self._final_step_done:
                    # One more old-plan step: what it writes is the final round, dispatched
                    # right behind it (after_dispatch), so the pause holds no copy at all.
                    self._final_step_done = True
                elif self.mode == "live" and self._new_stages_compiling():
                    # That step met a shape the new plan lacks: back to the patch rounds
                    # (its writes are copied; the dirty record goes on) while it compiles.
                    # What went behind it was a patch, not the pause's copy.
                    self.report.bytes_kv_patched += self.report.bytes_kv_final
                    self.report.bytes_kv_final = 0
                    self._final_step_done = False
                    self._enter("PATCH")
                else:
                    self._switch()
            elif self.phase == "RESIZE" and self._resize_started:
                self._resize_step()
        except Exception as e:  # noqa: BLE001 - any failure rolls back
            self._abort(e)

    def after_dispatch(self) -> None:
        """Called by the engine once a step's stage functions are dispatched, before it waits
        for them. On the live path's final old-plan step this dispatches the final patch: the
        slots this step writes (marked dirty when its batch was built) are copied by programs
        that take the pools the step returns, so each copy runs as soon as its source stage has
        written them (while later stages still compute), and the host dispatches them while it
        would otherwise wait for the step's results."""
        if self.phase != "SWITCH" or self.mode != "live" or not self._final_step_done:
            return
        try:
            self._check_abort()
            self.report.bytes_kv_final += self._copy_pages(only_dirty=True)
        except Exception as e:  # noqa: BLE001 - any failure rolls back
            self._abort(e)

    def after_step(self) -> None:
        end = self.engine.last_step_end
        if self._step_t0 is not None and end is not None:
            self._last_step_s = max(end - self._step_t0, 0.0)
        try:
            self._check_abort()
            if self.phase == "PREPARE":
                self._prepare_step()
            elif self.phase == "STAGE_WEIGHTS":
                self._stage_weights_step()
            elif self.phase == "PRECOPY":
                self._precopy()
            elif self.phase == "PATCH":
                self._patch_round()
            elif self.phase == "RESIZE" and not self._resize_started:
                self._resize_started = True
                self._resize_prepare()
        except Exception as e:  # noqa: BLE001
            self._abort(e)

    def _check_abort(self) -> None:
        if self.abort_requested and self.phase not in ("RESIZE", "DONE", "ABORTED"):
            raise ReconfigError(self.abort_requested)
        now = time.perf_counter()
        if self._bg_since is not None:
            self._bg_s += now - self._bg_since
            t = self._compile_thread
            self._bg_since = now if t is not None and t.is_alive() else None
        if now - self.t_start - self._bg_s > self.timeout_s and self.phase not in (
            "RESIZE",
            "DONE",
        ):
            raise ReconfigError(
                f"timed out after {self.timeout_s:.0f} s (not counting {self._bg_s:.0f} s of "
                f"background compiling and staging) in phase {self.phase}"
            )

    def _start_background(self, target: Callable[[], None]) -> None:
        """Runs PREPARE's (or RESIZE's) work on a compile thread; its time is off the timeout."""
        self._compile_thread = start_compile_thread(target)
        self._bg_since = time.perf_counter()

    # ------------------------------------------------------------------ PREPARE

    def _start_prepare(self) -> None:
        """Builds the pending stages and starts compiling for them in the background."""
        self._run_hook("PREPARE")
        eng = self.engine
        if self.mode == "restart":
            self._enter("SWITCH")  # the restart baseline rebuilds everything in the pause
            return
        shrink = []
        for st in self._old_stages:
            cap = self._stage_capacity(None, st.pages.num_pages)
            if cap < st.pages.num_pages:
                shrink.append((st, cap))
        if not shrink:
            self._build_pending()
            return
        # The old stages must go on serving at the smaller capacity, which is a new compile key:
        # compile them for it first (in the background) and shrink at a later boundary, so the
        # steps in between do not compile inline.
        self._shrink_to = shrink
        shapes = list(eng.executor_shapes())

        def compile_shrunk() -> None:
            try:
                for st, cap in shrink:
                    for shape in shapes:
                        eng.cache.get(st, shape, cap)
                    st.pools.warm_resize(cap)
            except BaseException as e:  # noqa: BLE001 - reported by the engine thread
                self._compile_error = e

        self._start_background(compile_shrunk)

    def _build_pending(self) -> None:
        """Builds the pending stages and page tables (host bookkeeping, at this boundary), then
        starts a background thread that dispatches the weight moves, allocates the incoming
        layers' pools, builds the copy routes and compiles the new plan.

        Allocating hundreds of MB of zeroed pools and copying the moved weights between host
        devices run on the calling thread on CPU (0.1-0.6 s at 32 sequences), so done here they
        stalled serving under the engine lock; nothing reads the pools, routes or moved weights
        before PREPARE ends, which waits for the thread.
        """
        eng = self.engine
        old_by_dev = {st.spec.devices[0]: st for st in self._old_stages}
        any_table = self._old_stages[0].pages
        stages: list[StageRuntime] = []
        new_tables: list[PageTable] = []
        routes: list[Route] = []
        weight_moves: list[tuple[Any, Any, Any]] = []  # (container, slot, device)
        incoming_pools: list[tuple[StagePools, int]] = []  # (pools, layer) to allocate
        route_specs: list[tuple[StageRuntime, StageRuntime, tuple[int, ...]]] = []
        from pipelive_jax.serving.pipeline import StageRuntime

        for j, spec in enumerate(self.target.stages):
            dev_id = spec.devices[0]
            dev = eng.devices[dev_id]
            old = old_by_dev.get(dev_id)
            if old is not None:
                table = old.pages
            else:
                table = PageTable(self._stage_capacity(j, None), eng.config.page_size)
                table.copy_allocation(any_table)
                new_tables.append(table)
            pools = StagePools(eng.kv_spec, table.num_pages, dev)
            layer_states: list[Any] = []
            incoming: dict[int, list[int]] = {}  # source stage index -> layers
            for layer in spec.layers:
                src_stage = self._old_stages[self.source.stage_of_layer(layer)]
                if old is not None and src_stage is old:
                    k, v = old.pools.pools[layer]
                    pools.pools[layer] = (k, v)  # shared with the old stage until the switch
                    layer_states.append(old.params.layers[layer - old.spec.start])
                else:
                    incoming_pools.append((pools, layer))
                    state = src_stage.params.layers[layer - src_stage.spec.start]
                    layer_states.append(state)
                    weight_moves.append((layer_states, len(layer_states) - 1, dev))
                    incoming.setdefault(src_stage.index, []).append(layer)
            params = StageParams(embed=None, layers=layer_states, head=None)
            if j == 0:
                params.embed = self._old_stages[0].params.embed
                if self._old_stages[0].device != dev:
                    weight_moves.append((params, "embed", dev))
            if j == self.target.num_stages - 1:
                params.head = self._old_stages[-1].params.head
                if self._old_stages[-1].device != dev:
                    weight_moves.append((params, "head", dev))
            st = StageRuntime(
                index=j,
                spec=spec,
                device=dev,
                params=params,
                pools=pools,
                pages=table,
                is_first=j == 0,
                is_last=j == self.target.num_stages - 1,
            )
            stages.append(st)
            for src_idx, layers in incoming.items():
                route_specs.append((self._old_stages[src_idx], st, tuple(layers)))
        # New tables must follow the running sequences from now on (reserve / free).
        eng.scheduler.set_page_tables([*eng.executor.page_tables, *new_tables])
        pending = self._pending = _Pending(stages, new_tables, routes, weight_moves, [])
        shapes = sorted(eng.executor_shapes(), key=shape_order)
        max_pages = max(st.pages.num_pages for st in stages)
        move_weights = self.mode == "live"  # stop_and_copy moves them in its pause

        def build_and_compile() -> None:
            try:
                if move_weights:
                    self._move_weights(pending, paced=True)
                for pools, layer in incoming_pools:
                    if self._pending is not pending:
                        return  # rolled back meanwhile: allocate nothing more
                    with _paced():
                        pools.add_layer(layer)
                        jax.block_until_ready(pools.pools[layer])
                for src, dst, lays in route_specs:
                    routes.append(
                        Route(
                            layers=lays,
                            src_device=src.device,
                            dst_device=dst.device,
                            src_table=src.pages,
                            dst_table=dst.pages,
                            get_src_pools=(lambda s=src, ls=lays: s.pools.as_list(ls)),
                            dst_pools=dst.pools.as_list(lays),
                            page_bytes=eng.kv_spec.page_bytes(),
                        )
                    )
                for st in stages:
                    for shape in shapes:
                        eng.cache.get(st, shape)
                for r in routes:
                    r.prepare(max_pages)
            except BaseException as e:  # noqa: BLE001 - reported by the engine thread
                self._compile_error = e

        self._start_background(build_and_compile)

    def _move_weights(self, pending: _Pending, paced: bool = False) -> None:
        """Dispatches the device_put of every moved layer's weights (and embed/head); `paced`
        (on the PREPARE thread): one at a time, each waited for and followed by an idle spell
        (see `_paced`)."""
        for container, slot, dev in pending.weight_moves:
            if paced and self._pending is not pending:
                return  # rolled back meanwhile: move nothing more
            with _paced() if paced else contextlib.nullcontext():
                if isinstance(slot, str):
                    moved = jax.device_put(getattr(container, slot), dev)
                    setattr(container, slot, moved)
                else:
                    moved = jax.device_put(container[slot], dev)
                    container[slot] = moved
                if paced:
                    jax.block_until_ready(moved)
            pending.weight_arrays.append(moved)
            self.report.bytes_weights += int(sum(a.nbytes for a in jax.tree.leaves(moved)))
        pending.weight_moves = []

    def _shrink(self, st: StageRuntime, cap: int) -> None:
        """Compacts live pages below `cap` and re-allocates the stage's pools one layer at a time."""
        src, dst = st.pages.compaction_moves(cap)
        if len(src):
            st.pools.remap_pages(src, dst)
            st.pages.apply_moves(src, dst)
        old = st.pages.num_pages
        st.pools.resize(cap, live_max_page=st.pages.max_live_page())
        st.pages.resize(cap)
        self._shrunk.append((st, old))

    def _prepare_step(self) -> None:
        t = self._compile_thread
        if t is not None and t.is_alive():
            return
        if self._compile_error is not None:
            raise ReconfigError(f"compiling the new stages failed: {self._compile_error}")
        if self._shrink_to is not None:
            # Shapes met while the shrunk capacity compiled must be there too, or the old
            # stages would compile them inline at that capacity (and the new plan's list,
            # taken from what the shrunk stages serve, would lack them).
            shrink = self._shrink_to
            later = self._lacking(shrink)
            if later:
                self._compile_in_background(later, lambda: not self.abort_requested)
                return
            self._shrink_to = None
            for st, cap in shrink:
                self._shrink(st, cap)
            self._build_pending()
            return
        if self._new_stages_compiling():
            return
        self._enter("STAGE_WEIGHTS")
        self._run_hook("STAGE_WEIGHTS")
        if self.mode == "stop_and_copy":
            self._enter("SWITCH")

    def _new_stages_compiling(self) -> bool:
        """True while the new stages compile shapes the old plan serves; starts that when
        some are lacking. Checked before leaving PREPARE, before the switch, and after the
        final old-plan step: a shape the old plan first meets at any point of the migration
        is compiled for the new plan before it takes over, not inline in its first steps."""
        t = self._compile_thread
        if t is not None and t.is_alive():
            return True
        if self._compile_error is not None:
            raise ReconfigError(f"compiling the new stages failed: {self._compile_error}")
        pending = self._pending
        assert pending is not None
        missing = self._lacking([(st, None) for st in pending.stages])
        if missing:
            log.info("reconfiguration %s -> %s: compiling %d shape(s) the old plan met since",
                     self.report.source, self.report.target, len(missing))  # fmt: skip
            self._compile_in_background(missing, lambda: self._pending is pending)
            return True
        return False

    def _lacking(
        self, stages: Sequence[tuple[StageRuntime, int | None]]
    ) -> list[tuple[StageRuntime, BatchShape, int | None]]:
        """(stage, shape, pool capacity) of every batch shape the old plan serves that a stage
        lacks at that capacity (None: its own), smallest shapes first.

        PREPARE lists the shapes when it begins; the old plan may meet new ones while it
        compiles. They compile too before PREPARE goes on: else the first step to meet one on
        the shrunk pools or the new plan would compile it inline."""
        eng = self.engine
        shapes = sorted(eng.executor_shapes(), key=shape_order)
        return [
            (st, s, cap) for st, cap in stages for s in shapes if not eng.cache.has(st, s, cap)
        ]

    def _compile_in_background(
        self, todo: list[tuple[StageRuntime, BatchShape, int | None]], wanted: Callable[[], bool]
    ) -> None:
        """Compiles `todo` on a compile thread, stopping once `wanted()` turns false (rolled
        back meanwhile); a failure is reported by the engine thread's next PREPARE step."""
        cache = self.engine.cache

        def compile_them() -> None:
            try:
                for st, shape, cap in todo:
                    if not wanted():
                        return
                    cache.get(st, shape, cap)
            except BaseException as e:  # noqa: BLE001 - reported by the engine thread
                self._compile_error = e

        self._start_background(compile_them)

    # ------------------------------------------------------------------ STAGE_WEIGHTS

    def _stage_weights_step(self) -> None:
        assert self._pending is not None
        leaves = jax.tree.leaves(self._pending.weight_arrays)
        if not all(a.is_ready() for a in leaves):
            return
        self._enter("PRECOPY")
        self._run_hook("PRECOPY")
        self._precopy()

    # ------------------------------------------------------------------ PRECOPY / PATCH

    def _copy_pages(self, only_dirty: bool) -> int:
        """One copy round over every route; returns bytes. `only_dirty`: the slots written since
        the last round (each source table's dirty record; their pages when there are more than
        SLOT_COPY_MAX), else every live page."""
        assert self._pending is not None
        dirty: dict[int, np.ndarray] = {}
        for st in self._old_stages:
            dirty[id(st.pages)] = st.pages.take_dirty_slots()
        total = 0
        for r in self._pending.routes:
            if not only_dirty:
                total += r.copy(*page_moves(r.src_table, r.dst_table))
                continue
            slots = dirty[id(r.src_table)]
            if len(slots) == 0:
                continue
            s, d = slot_moves(r.src_table, r.dst_table, slots)
            if len(s) <= SLOT_COPY_MAX:
                total += r.copy_slots(s, d)
            else:
                pages = np.unique(slots // r.src_table.page_size).astype(np.int32)
                total += r.copy(*page_moves(r.src_table, r.dst_table, pages))
        return total

    def _block(self) -> None:
        assert self._pending is not None
        for r in self._pending.routes:
            r.block()

    def _precopy(self) -> None:
        """Copies live pages of the routes at this step boundary, one route's chunk at a time,
        waiting for each, as far as the pacer's credit allows (PrecopyPacer): the bulk copy is
        spread over steps at a bounded average cost per step.

        The dirty record starts when the pre-copy does, so whatever the steps write meanwhile
        (into pages copied already or not) goes with the patch rounds. Pages are remembered by
        source id; one freed and handed to another sequence after it was copied holds only
        writes made since, which the dirty record has.
        """
        assert self._pending is not None
        if self._precopied is None:
            for st in self._old_stages:
                st.pages.clear_dirty()
            self._precopied = {id(r): np.zeros(0, np.int32) for r in self._pending.routes}
        pacer = self._pacer
        pacer.boundary(self._last_step_s)
        if not pacer.may_copy():
            return  # nothing runs at this boundary: skip listing the pages (~1 ms at 32 x 256)
        todo = {}
        for r in self._pending.routes:
            s, d = page_moves(r.src_table, r.dst_table)
            keep = ~np.isin(s, self._precopied[id(r)])
            todo[id(r)] = (s[keep], d[keep])
        # One route's chunk at a time, starting where the last boundary stopped: with several
        # routes a boundary may copy for one of them only. When every route's remainder fits one
        # chunk, the pre-copy ends at this boundary (no extra step for a tail).
        routes = self._pending.routes
        tail = all(len(s) <= pacer.chunk_pages for s, _ in todo.values())
        while any(len(s) for s, _ in todo.values()):
            r = routes[self._precopy_next % len(routes)]
            s, d = todo[id(r)]
            if not len(s):
                self._precopy_next += 1
                continue
            if not tail and not pacer.may_copy():
                break
            self._precopy_next += 1
            n = max(pacer.chunk_pages, len(s)) if tail else pacer.chunk_pages
            cs, cd = s[:n], d[:n]
            t_chunk = time.perf_counter()
            self.report.bytes_kv_precopy += r.copy(cs, cd)
            self._precopied[id(r)] = np.concatenate([self._precopied[id(r)], cs])
            todo[id(r)] = (s[n:], d[n:])
            r.block()
            took = time.perf_counter() - t_chunk
            self.report.precopy_chunks.append((len(cs), round(took * 1e3, 3)))
            pacer.spent(n, took)
        if not any(len(s) for s, _ in todo.values()):
            self._enter("PATCH")
            self._run_hook("PATCH")

    def _patch_round(self) -> None:
        """Copies what the last step wrote and times it. A step writes about as much as the one
        before, so a round that took at most half the pause budget predicts the final round:
        switch after one more step, whose writes are copied right behind it (after_dispatch)."""
        t0 = time.perf_counter()
        nbytes = self._copy_pages(only_dirty=True)
        self._block()
        round_ms = (time.perf_counter() - t0) * 1e3
        self.report.rounds += 1
        self.report.bytes_kv_patched += nbytes
        self.report.round_dirty_bytes.append(nbytes)
        self.report.round_ms.append(round(round_ms, 3))
        self.dirty_bytes_left = nbytes  # the next step dirties about as much
        converged = round_ms <= self.pause_budget_ms / 2
        if not (converged or self.report.rounds >= self.max_rounds):
            return
        if self._new_stages_compiling():
            return  # rounds go on while they compile, so the dirty pages stay few
        self.report.forced_stop_and_copy = not converged
        self._enter("SWITCH")

    # ------------------------------------------------------------------ SWITCH

    def _switch(self) -> None:
        eng = self.engine
        self._run_hook("SWITCH")
        t_end_old = eng.last_step_end if eng.last_step_end is not None else time.perf_counter()
        compiles_before = eng.cache.compiles  # a restart's new cache carries the count on
        if self.mode == "restart":
            self._restart()
        else:
            assert self._pending is not None
            if self.mode == "stop_and_copy":
                self._move_weights(self._pending)
                jax.block_until_ready(self._pending.weight_arrays)
                self.report.bytes_kv_final = self._copy_pages(only_dirty=False)
                self._block()
            else:
                # The final old-plan step's writes were dispatched behind it (after_dispatch) and
                # are not waited on: the new plan's step functions take the target pools as
                # inputs, so each stage's computation starts once its own copies are done (the
                # patch rounds bounded this copy by half the pause budget). Anything written
                # since (nothing, unless that step ran no batch) is copied here.
                self.report.bytes_kv_final += self._copy_pages(only_dirty=True)
            pending = self._pending
            for st in pending.stages:
                st.pools.pools.update(
                    zip(
                        [
                            lay
                            for r in pending.routes
                            if r.dst_device == st.device
                            for lay in r.layers
                        ],
                        [
                            p
                            for r in pending.routes
                            if r.dst_device == st.device
                            for p in r.dst_pools
                        ],
                        strict=True,
                    )
                )
            # Layers that stayed share arrays with the old stage: refresh them to the latest
            # (the old stage's pools were replaced by every step since PREPARE).
            old_by_dev = {st.spec.devices[0]: st for st in self._old_stages}
            for st in pending.stages:
                old = old_by_dev.get(st.spec.devices[0])
                if old is None:
                    continue
                for layer in st.spec.layers:
                    if layer in old.pools.pools and old.spec.start <= layer < old.spec.end:
                        st.pools.pools[layer] = old.pools.pools[layer]
            eng.executor.stages = pending.stages
            eng.plan = self.target
            eng.scheduler.set_page_tables(eng.executor.page_tables)
        now = time.perf_counter()
        self.report.pause_ms = (now - t_end_old) * 1e3
        self.report.compiled_in_pause = eng.cache.compiles - compiles_before
        if self.verify and self.mode != "restart":
            self.report.verified_pages = self._verify()
        # Freeing what left (and planning growth) waits for the end of the first new-plan step:
        # dropping the departed layers' weights and pools returns hundreds of MB to the
        # allocator, which took ~10 ms here, and it would delay that step.
        self._enter("RESIZE")
        self._resize_started = False

    def _verify(self) -> int:
        """Byte-compares the K and V of every token on every migrated page with its source (a
        test aid; runs after the pause); returns the pages checked. Slots past a sequence's last
        token are not compared: patch rounds copy written slots, so the stale tail of a page
        reused since the pre-copy may differ, and nothing reads it."""
        assert self._pending is not None
        count = 0
        for r in self._pending.routes:
            s, _ = page_moves(r.src_table, r.dst_table)
            if not len(s):
                continue
            src_slots, dst_slots = [], []
            for seq, n in r.src_table.tokens.items():
                if seq in r.dst_table.pages:
                    src_slots.append(r.src_table.slots(seq, 0, n, mark_dirty=False))
                    dst_slots.append(r.dst_table.slots(seq, 0, n, mark_dirty=False))
            ss, ds = np.concatenate(src_slots), np.concatenate(dst_slots)
            for (sk, sv), (dk, dv) in zip(r.get_src_pools(), r.dst_pools, strict=True):
                for a, b in ((sk, dk), (sv, dv)):
                    h, _, _, hd = a.shape
                    x = np.asarray(a).reshape(h, -1, hd)[:, ss]
                    y = np.asarray(b).reshape(h, -1, hd)[:, ds]
                    if x.tobytes() != y.tobytes():
                        raise ReconfigError("migrated KV differs from its source at the switch")
            count += len(s)
        return count

    def _restart(self) -> None:
        """The restart baseline: rebuild every stage from the stored weights, drop all KV, and
        recompute in-flight requests (they are preempted and prefill again)."""
        eng = self.engine
        sched = eng.scheduler
        for req in list(sched.running):
            self.report.recomputed_tokens += req.num_computed
            sched._preempt(req)
        for st in self._old_stages:
            st.pools.delete()
        from pipelive_jax.serving.pipeline import CompileCache

        # A restarted server has no compiled code: it compiles, in the pause, every batch shape
        # the old one had (as a server compiles its shape buckets at start-up), so no step after
        # it compiles inline. Programs compiled before in this process come from JAX's
        # in-process cache, as a persistent compilation cache would serve a real restart.
        old_cache = eng.cache
        shapes = old_cache.shapes() | set(eng.executor_shapes())
        eng.cache = CompileCache(eng.defs, eng.backend)
        eng.cache.inherit(old_cache)
        eng.plan = self.target
        from pipelive_jax.serving.pipeline import PipelineExecutor

        eng.executor = PipelineExecutor(eng.defs, eng._build_stages(self.target), eng.cache)
        sched.set_page_tables(eng.executor.page_tables)
        for shape in sorted(shapes, key=shape_order):
            eng.executor.compile_for(shape)

    # ------------------------------------------------------------------ RESIZE

    def _resize_prepare(self) -> None:
        """Frees what left each device; plans growth where room appeared."""
        eng = self.engine
        if self.mode != "restart":
            new_by_dev = {st.spec.devices[0]: st for st in eng.executor.stages}
            for st in self._old_stages:
                new = new_by_dev.get(st.spec.devices[0])
                for layer in list(st.pools.pools):
                    if new is None or layer not in new.pools.pools:
                        k, v = st.pools.pools.pop(layer)
                        k.delete()
                        v.delete()
            # Dirty bits of the old tables were for migration only.
            for st in eng.executor.stages:
                st.pages.clear_dirty()
        self._pending = None
        self._run_hook("RESIZE")
        self._grow = []
        if eng.config.device_memory_bytes is not None and eng.config.kv_resize:
            for i, st in enumerate(eng.executor.stages):
                cap = eng.pages_for_stage(self.target, i)
                if cap > st.pages.num_pages:
                    self._grow.append((st, cap))
        if self._grow:
            shapes = list(eng.executor_shapes())
            grow = list(self._grow)

            def compile_all() -> None:
                try:
                    for st, cap in grow:
                        for shape in shapes:
                            eng.cache.get(st, shape, cap)
                        st.pools.warm_resize(cap)  # the copy into the grown pools, too
                except BaseException as e:  # noqa: BLE001
                    self._compile_error = e

            self._start_background(compile_all)
        else:
            self._compile_thread = None
            self._finish_ok()

    def _resize_step(self) -> None:
        t = self._compile_thread
        if t is not None and t.is_alive():
            return
        if self._compile_error is not None:
            # Growth is an optimisation: serving goes on at the transition capacity.
            self.report.reason = f"pools not grown: {self._compile_error}"
            self._finish_ok()
            return
        t0 = time.perf_counter()
        for st, cap in self._grow:
            st.pools.resize(cap)
            st.pages.resize(cap)
        self.report.resize_ms = (time.perf_counter() - t0) * 1e3
        self._finish_ok()

    # ------------------------------------------------------------------ end states

    def _finish_ok(self) -> None:
        self._enter("DONE")
        self.report.ok = True
        self.report.total_ms = (time.perf_counter() - self.t_start) * 1e3
        self._detach()

    def _detach(self) -> None:
        eng = self.engine
        if eng.reconfig is self:
            eng.reconfig = None
        # Drop references to the old stages (weights of moved layers, old pools) so the source
        # devices really get their memory back; the report keeps only numbers.
        self._old_stages = []
        self._shrunk = []
        self._grow = []
        self._pending = None
        self.handle._done.set()

    def _abort(self, err: BaseException) -> None:
        """Rolls back to the old plan: drop pending stages, restore capacities; serving goes on."""
        eng = self.engine
        phase = self.phase
        if phase in ("RESIZE", "DONE"):
            # Past the switch the new plan serves; a failure here only skips the growth.
            self.report.reason = f"after switch: {err}"
            self._finish_ok()
            return
        self.report.ok = False
        self.report.aborted_in = phase
        self.report.reason = (
            str(err) if isinstance(err, PipeliveError) else f"{type(err).__name__}: {err}"
        )
        self.report.error_traceback = "".join(traceback.format_exception(err))
        # A compile still running in the background is left to finish on its own (joining it
        # here would stall serving under the engine lock); what it builds is dropped with the
        # pending stages, or lands in the compile cache, where it is harmless.
        self._compile_thread = None
        pending = self._pending
        self._pending = None
        if pending is not None:
            old_arrays = {
                id(a) for st in self._old_stages for pair in st.pools.pools.values() for a in pair
            }
            # The background thread may still be adding pools and routes: take snapshots (a
            # list() of a dict's values is one step under the GIL); what it adds after this is
            # dropped with `pending` when it ends.
            pairs = [p for st in pending.stages for p in list(st.pools.pools.values())]
            pairs += [p for r in list(pending.routes) for p in r.dst_pools]
            for pair in pairs:
                for a in pair:
                    if id(a) not in old_arrays and not a.is_deleted():
                        a.delete()
        eng.executor.stages = self._old_stages
        eng.plan = self.source
        eng.scheduler.set_page_tables([st.pages for st in self._old_stages])
        for st, cap in reversed(self._shrunk):
            try:
                st.pools.resize(cap)
                st.pages.resize(cap)
            except Exception:  # noqa: BLE001 - stay at the smaller, valid capacity
                break
        for st in self._old_stages:
            st.pages.clear_dirty()
        self._enter("ABORTED")
        log.warning(
            "reconfiguration %s -> %s rolled back: %s",
            self.report.source, self.report.target, self.report.reason,
        )  # fmt: skip
        self.report.total_ms = (time.perf_counter() - self.t_start) * 1e3
        self._detach()

"""Live reconfiguration end to end (DESIGN.md §4-§5): the engine re-partitions its pipeline while
requests are in flight, and nothing a user sees changes.

- Greedy tokens are identical to an unreconfigured run for 2->3, 3->2, 1->4, 4->1 stages, one
  layer moved, and the same split on other devices, in the live, stop_and_copy and restart modes,
  and across 10 reconfigurations back and forth under continuous load.
- Migrated pages are byte-identical at the switch (`verify=True`), and the bytes the copies count
  match the pages in use and the layers moved.
- A fault injected at every phase (`hooks={phase: fn}`), a user abort and a timeout roll back to
  the old plan with no request lost and no page leaked; a fault after the switch keeps the new plan.
- Bad calls are refused at once (second reconfiguration, bad plan, unknown mode, admission).
- With memory budgets the transition never exceeds a device's budget, KV pools shrink before a
  device gains layers and grow back where room appears; `kv_resize=False` keeps capacities fixed.

Cost: every (stage, device, capacity, batch shape) is one compile, and each reconfiguration
compiles its copy routes. So the tests share one engine (`served`) with few pages, two batch
shapes (one prefill of PROMPTS, and decode / one-token prompts with at most 4 sequences), and a
small set of plans whose stage functions stay in its compile cache; each test first brings the
engine to its source plan by an idle reconfiguration. The restart-mode tests drop that cache
(a restarted server has no compiled code), so they come last. The memory tests run their own
engines on devices 6 and 7, which nothing else in this module touches, so that
`live_bytes_per_device()` (less what was there before the engine) sees exactly their arrays.

"""

from __future__ import annotations

import gc
import itertools
import sys
import time
from types import SimpleNamespace
from typing import Any

import jax
import numpy as np
import pytest

from pipelive_jax.errors import AdmissionError, PlanError, ReconfigError
from pipelive_jax.memory import (
    live_bytes_per_device,
    max_pages,
    round_capacity,
    stage_extra_bytes,
)
from pipelive_jax.models.llama import split_model
from pipelive_jax.plan import parse_plan, plan_diff
from pipelive_jax.reconfig.controller import ReconfigController
from pipelive_jax.serving.engine import model_shape
from pipelive_jax.serving.llm import LLM
from pipelive_jax.serving.sampling import SamplingParams

NUM_LAYERS = 6  # tiny-random
NUM_DEVICES = 8  # conftest

_rng = np.random.default_rng(2024)
# Prefilled together in one step: 5 + 9 + 14 tokens -> one prefill batch shape.
PROMPTS = [_rng.integers(3, 512, size=n).tolist() for n in (5, 9, 14)]
# One-token prompts: their prefill has the decode step's shape (4 sequences, 1 token each).
LOAD_PROMPTS = [[int(t)] for t in _rng.integers(3, 512, size=8)]
PARAMS = SamplingParams(max_tokens=32, ignore_eos=True)  # <= 46 tokens: 3 pages of 16
LOAD_PARAMS = SamplingParams(max_tokens=16, ignore_eos=True)
OPTIONS = dict(num_pages=16, max_model_len=64, max_num_seqs=4)


def stages_json(*stages: tuple[int, int]) -> dict[str, Any]:
    """JSON plan from (device, number of layers) pairs."""
    out, start = [], 0
    for dev, n in stages:
        out.append({"devices": [dev], "layers": [start, start + n]})
        start += n
    return {"stages": out}


TWO = [3, 3]
THREE = [2, 1, 3]
ONE = [6]
FOUR = [1, 2, 2, 1]
MOVED_ONE = [4, 2]  # layer 3 moves from device 1 to device 0
OTHER_DEVICES = stages_json((4, 3), (5, 3))  # the split of TWO, on devices 4 and 5

TRANSITIONS = {
    "2to3": (TWO, THREE),
    "3to2": (THREE, TWO),
    "1to4_scale_out": (ONE, FOUR),
    "4to1_scale_in": (FOUR, ONE),
    "one_layer_moved": (TWO, MOVED_ONE),
    "other_devices_json": (TWO, OTHER_DEVICES),
}


def plan_of(spec: Any):
    return parse_plan(spec, num_layers=NUM_LAYERS, num_devices=NUM_DEVICES)


# ------------------------------------------------------------------ engine helpers


def add(eng, prompts, params=PARAMS) -> list[str]:
    return [eng.add_request(p, params) for p in prompts]


def drain(eng, limit: int = 20000) -> int:
    n = 0
    while eng.has_unfinished():
        eng.step()
        n += 1
        assert n < limit, "the engine does not finish"
    return n


def join_compile(eng) -> None:
    """Waits for PREPARE's background compiles, so the migration runs while requests are in
    flight. When the old stages must shrink, PREPARE compiles them for the smaller capacity
    first, shrinks at the next boundary (one step), then compiles the new plan."""
    ctl = eng.reconfig
    while ctl is not None and eng.reconfig is ctl and ctl.phase == "PREPARE":
        if ctl._compile_thread is not None:
            ctl._compile_thread.join()
        if ctl._shrink_to is None:
            break
        eng.step()


def run_to_done(eng, handle, timeout_s: float = 300.0) -> int:
    """Steps until the reconfiguration is done; an idle engine's steps are no-ops while the
    compile thread works, so the loop yields the CPU between them."""
    n = 0
    deadline = time.monotonic() + timeout_s
    while not handle.done():
        eng.step()
        n += 1
        if not eng.scheduler.has_unfinished():
            time.sleep(0.001)
        assert time.monotonic() < deadline, f"reconfiguration stuck in {handle.status()['phase']}"
    return n


def ensure_plan(eng, spec) -> None:
    """Brings an idle engine to `spec` (an idle reconfiguration; nothing if already there)."""
    target = plan_of(spec)
    if eng.plan == target:
        return
    assert not eng.scheduler.has_unfinished()
    h = eng.reconfigure(target)
    run_to_done(eng, h)
    assert h.report().ok, h.report().reason
    assert eng.plan == target


def outputs(eng, ids) -> list[list[int]]:
    return [list(eng.requests[i].output_ids) for i in ids]


def expected(ref, prompts) -> list[list[int]]:
    return [ref[tuple(p)] for p in prompts]


def assert_clean(eng) -> None:
    """No reconfiguration in flight, no request left, no page leaked, stages consistent."""
    assert eng.reconfig is None
    assert not eng.scheduler.has_unfinished()
    assert eng.executor.plan == eng.plan
    # The scheduler reserves in exactly the serving stages' tables (no stale mirror table).
    assert [id(t) for t in eng.scheduler.page_tables] == [
        id(st.pages) for st in eng.executor.stages
    ]
    for i, st in enumerate(eng.executor.stages):
        assert st.index == i
        assert st.device.id == st.spec.devices[0]
        assert st.pages.num_used == 0, f"stage {i}: {st.pages.num_used} pages leaked"
        assert not st.pages.pages
        st.pages.check()
        assert st.pools.layers == tuple(st.spec.layers), f"stage {i}: pools {st.pools.layers}"
        assert st.pools.num_pages == st.pages.num_pages
        st.pools.check_invariants()
        assert len(st.params.layers) == st.spec.num_layers
        assert (st.params.embed is not None) == st.is_first
        assert (st.params.head is not None) == st.is_last


def kv_pool_arrays_on(device_id: int, pool_shape: tuple[int, ...]) -> list[jax.Array]:
    """Live (not deleted) arrays shaped like a KV pool on one device."""
    return [
        a
        for a in jax.live_arrays()
        if not a.is_deleted()
        and a.shape == pool_shape
        and {d.id for d in a.sharding.device_set} == {device_id}
    ]


class Probe:
    """Non-raising phase hooks that record the pages in use when PRECOPY and SWITCH begin
    (every stage's table holds the same tokens, so stage 0's count is everyone's)."""

    def __init__(self) -> None:
        self.used: dict[str, int] = {}
        self.routes: dict[tuple, tuple[int, ...]] = {}

    def _record(self, phase: str):
        def hook(ctl: ReconfigController) -> None:
            used = {st.pages.num_used for st in ctl.engine.executor.stages}
            assert len(used) == 1, f"stages hold different page counts: {used}"
            self.used[phase] = used.pop()
            self.routes = ctl.diff.by_route()

        return hook

    def hooks(self) -> dict[str, Any]:
        return {p: self._record(p) for p in ("PRECOPY", "SWITCH")}


def migrate(eng, ref, target, mode="live", **kw):
    """Starts PROMPTS, reconfigures to `target` while they are in flight, drains, and checks the
    tokens against the unreconfigured reference and the copy accounting against the pages in
    use. Returns the report."""
    source = eng.plan
    ids = add(eng, PROMPTS)
    for _ in range(3):
        eng.step()
    probe = Probe()
    hooks = {**probe.hooks(), **kw.pop("hooks", {})}
    h = eng.reconfigure(target, mode=mode, verify=True, hooks=hooks, **kw)
    join_compile(eng)
    drain(eng)
    r = h.report()
    assert h.done()
    assert r.ok, f"{r.aborted_in}: {r.reason}\n{r.error_traceback}"
    assert eng.plan == plan_of(target)
    assert r.source == str(source) and r.target == str(plan_of(target)) and r.mode == mode
    assert outputs(eng, ids) == expected(ref, PROMPTS)
    assert_clean(eng)
    assert r.pause_ms is not None and r.pause_ms > 0
    assert r.total_ms is not None
    if mode == "restart":
        assert r.recomputed_tokens > 0
        assert r.verified_pages is None
        return r
    page_bytes = eng.kv_spec.page_bytes()
    moved_layer_pages = sum(len(layers) for layers in probe.routes.values())
    assert r.compiled_in_pause == 0, "the switch compiled (AOT compile missed a shape)"
    assert r.bytes_weights > 0
    # Migration really happened while requests were in flight, and every migrated page of every
    # route was byte-identical to its source at the switch.
    assert probe.used["SWITCH"] > 0
    assert r.verified_pages == len(probe.routes) * probe.used["SWITCH"] > 0
    if mode == "live":
        assert probe.used["PRECOPY"] > 0
        assert r.bytes_kv_precopy == moved_layer_pages * probe.used["PRECOPY"] * page_bytes
        assert r.rounds >= 1 and len(r.round_dirty_bytes) == r.rounds
        assert r.bytes_kv_patched == sum(r.round_dirty_bytes)
        for phase in ("PREPARE", "STAGE_WEIGHTS", "PRECOPY", "PATCH", "SWITCH"):
            assert phase in r.phase_ms
    else:
        assert "PRECOPY" not in probe.used  # stop_and_copy copies everything in the pause
        assert r.bytes_kv_precopy == 0 and r.rounds == 0
        assert r.bytes_kv_final == moved_layer_pages * probe.used["SWITCH"] * page_bytes
    return r


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def served(tiny):
    """One engine on TWO (devices 0, 1) and the reference: greedy outputs of PROMPTS and
    LOAD_PROMPTS before any reconfiguration."""
    eng = LLM(tiny, plan=TWO, **OPTIONS).engine
    ref: dict[tuple[int, ...], list[int]] = {}
    for prompts, params in ((PROMPTS, PARAMS), (LOAD_PROMPTS, LOAD_PARAMS)):
        ids = add(eng, prompts, params)
        drain(eng)
        for p, out in zip(prompts, outputs(eng, ids), strict=True):
            assert len(out) == params.max_tokens
            ref[tuple(p)] = out
    assert eng.reconfig_history == []
    assert_clean(eng)
    return SimpleNamespace(eng=eng, ref=ref)


@pytest.fixture
def ref(served):
    return served.ref


@pytest.fixture
def eng(served):
    """The shared engine; afterwards, whatever a failed test left is cleaned up."""
    e = served.eng
    yield e
    e.step_hooks.clear()
    if e._thread is not None:
        e.stop()
    ctl = e.reconfig
    if ctl is not None:
        if ctl.handle.done():
            e.reconfig = None  # see test_noop_reconfigure_leaves_nothing_in_flight
        else:
            ctl.handle.abort("test cleanup")
    for rid, req in list(e.requests.items()):
        if not req.finished:
            e.abort(rid)
    drain(e)


# ------------------------------------------------------------------ token-identical transitions


@pytest.mark.parametrize("mode", ["live", "stop_and_copy"])
@pytest.mark.parametrize("name", list(TRANSITIONS))
def test_transition_is_token_identical(eng, ref, name, mode):
    source, target = TRANSITIONS[name]
    ensure_plan(eng, source)
    migrate(eng, ref, target, mode=mode)
    # Devices that left the pipeline hold no KV pool any more.
    shape = eng.kv_spec.pool_shape(OPTIONS["num_pages"])
    for dev in set(plan_of(source).devices) - set(plan_of(target).devices):
        assert kv_pool_arrays_on(dev, shape) == [], f"device {dev} still holds KV pools"


def test_ten_reconfigurations_under_continuous_load(eng, ref):
    """THREE <-> TWO ten times, live and stop_and_copy, while new requests keep arriving (also
    during the migration steps); every request completes with the reference tokens."""
    ensure_plan(eng, TWO)
    load = itertools.cycle(LOAD_PROMPTS)
    ids: list[tuple[list[int], str]] = [
        (p, i) for p, i in zip(PROMPTS, add(eng, PROMPTS), strict=True)
    ]

    def top_up() -> None:
        """One new request per step at most, so that finishes stay staggered and some request
        is always in flight (requests that arrive together finish together)."""
        if len(eng.scheduler.running) + len(eng.scheduler.waiting) < OPTIONS["max_num_seqs"]:
            p = next(load)
            ids.append((p, eng.add_request(p, LOAD_PARAMS)))

    reports = []
    arrived_while_reconfiguring = 0
    for i, target in enumerate([THREE, TWO] * 5):
        for _ in range(6):
            eng.step()
            top_up()
        mode = "live" if (i // 2) % 2 == 0 else "stop_and_copy"
        h = eng.reconfigure(target, mode=mode, verify=True)
        join_compile(eng)
        while not h.done():
            before = len(ids)
            top_up()
            arrived_while_reconfiguring += len(ids) - before
            eng.step()
        r = h.report()
        assert r.ok, f"reconfiguration {i}: {r.aborted_in}: {r.reason}"
        assert eng.plan == plan_of(target)
        assert r.verified_pages > 0
        assert (r.bytes_kv_precopy if mode == "live" else r.bytes_kv_final) > 0
        reports.append(r)
    drain(eng)
    assert len(reports) == 10
    assert len(ids) > len(PROMPTS) + 10  # requests really kept arriving
    assert arrived_while_reconfiguring >= 3
    got = [list(eng.requests[i].output_ids) for _, i in ids]
    assert got == [ref[tuple(p)] for p, _ in ids]
    assert all(eng.requests[i].finish_reason == "length" for _, i in ids)
    assert_clean(eng)


@pytest.mark.parametrize(
    "pages, took_ms, budget_ms, expected",
    [
        (16, 10.0, 5.0, 8),  # overran: halved
        (8, 10.0, 5.0, 8),  # not below the smallest compiled copy
        (1, 1.0, 0.0, 1),  # nor above what it was (a test's 1-page chunks stay 1)
        (16, 1.0, 5.0, 32),  # well under budget: doubled
        (64, 0.0, 5.0, 64),  # up to the largest
        (128, 0.0, 5.0, 128),  # a larger setting is not shrunk for being fast
        (16, 2.0, 5.0, 16),  # in between: kept
    ],
)
def test_precopy_chunk_follows_the_step_budget(pages, took_ms, budget_ms, expected):
    from pipelive_jax.reconfig.controller import next_chunk_pages

    assert next_chunk_pages(pages, took_ms / 1e3, budget_ms / 1e3) == expected


def _pace(chunk_ms: float, step_ms: float, boundaries: int) -> list[float]:
    """Copy milliseconds at each of `boundaries` step boundaries when every chunk takes
    `chunk_ms` and steps take `step_ms` (the pacer's decisions only, no copies)."""
    from pipelive_jax.reconfig.controller import PrecopyPacer

    pacer, per = PrecopyPacer(), []
    for _ in range(boundaries):
        pacer.boundary(step_ms / 1e3)
        spent = 0.0
        while pacer.may_copy():
            pacer.spent(pacer.chunk_pages, chunk_ms / 1e3)
            spent += chunk_ms
        per.append(spent)
    return per


@pytest.mark.parametrize("chunk_ms", [0.5, 3.0, 7.0, 20.0])
def test_precopy_pacer_spends_the_step_fraction_on_average(chunk_ms):
    """Whatever a chunk takes (under the per-step budget, over it, over the burst), the
    boundaries spend PRECOPY_STEP_FRACTION of the steps on average, copies keep going, and no
    boundary runs more than the burst plus one chunk."""
    from pipelive_jax.reconfig.controller import PRECOPY_BURST, PRECOPY_STEP_FRACTION

    step_ms = 100.0
    budget = PRECOPY_STEP_FRACTION * step_ms
    per = _pace(chunk_ms, step_ms, 400)
    assert sum(per) / len(per) == pytest.approx(budget, rel=0.15)
    assert max(per) <= PRECOPY_BURST * budget + chunk_ms
    if chunk_ms > budget:  # chunks longer than a step's share gather on some boundaries only
        assert 0 < sum(1 for x in per if x) < len(per)


def test_precopy_pacer_without_a_budget_copies_one_chunk_per_boundary(monkeypatch):
    import pipelive_jax.reconfig.controller as controller

    monkeypatch.setattr(controller, "PRECOPY_STEP_FRACTION", 0.0)
    assert _pace(5.0, 100.0, 20) == [5.0] * 20


def test_reconfigure_call_leaves_pool_allocation_and_weight_moves_to_the_background(
    eng, ref, monkeypatch
):
    """reconfigure() runs under the engine lock between two steps: the incoming layers' zeroed
    pools and the moved weights (hundreds of MB at SmolLM2 scale, copied on the calling thread
    on CPU) are made on the PREPARE thread, never on the serving thread."""
    import threading

    from pipelive_jax.kv.pools import StagePools
    from pipelive_jax.reconfig.controller import ReconfigController

    ensure_plan(eng, TWO)
    ids = add(eng, PROMPTS)
    for _ in range(3):
        eng.step()
    threads: dict[str, set[str]] = {"add_layer": set(), "_move_weights": set()}

    def recording(name: str, fn: Any) -> Any:
        def inner(self: Any, *a: Any, **kw: Any) -> Any:
            threads[name].add(threading.current_thread().name)
            return fn(self, *a, **kw)

        return inner

    for cls, name in ((StagePools, "add_layer"), (ReconfigController, "_move_weights")):
        monkeypatch.setattr(cls, name, recording(name, getattr(cls, name)))
    main = threading.current_thread().name
    h = eng.reconfigure(THREE, verify=True)
    join_compile(eng)
    drain(eng)
    r = h.report()
    assert r.ok, f"{r.aborted_in}: {r.reason}"
    assert threads["add_layer"] and threads["_move_weights"], threads
    assert main not in threads["add_layer"] | threads["_move_weights"], threads
    assert r.bytes_weights > 0 and r.verified_pages > 0
    assert outputs(eng, ids) == expected(ref, PROMPTS)
    assert_clean(eng)


def test_live_final_patch_runs_behind_the_last_old_step_not_in_the_pause(eng, ref, monkeypatch):
    """The final round's copy is dispatched on the last old-plan step, after its stage functions
    and before its results are fetched; the switch itself dispatches no copy. The byte-for-byte
    verify at the switch and the reference tokens show the copy still lands before it is read."""
    from pipelive_jax.reconfig import migrate
    from pipelive_jax.reconfig.controller import ReconfigController

    ensure_plan(eng, TWO)
    ids = add(eng, PROMPTS)
    for _ in range(3):
        eng.step()
    where: list[str] = []
    state = {"in": "elsewhere"}

    def tracked(name: str, fn: Any) -> Any:
        def inner(self: Any, *a: Any, **kw: Any) -> Any:
            n = fn(self, *a, **kw)
            if n:
                where.append(state["in"])
            return n

        monkeypatch.setattr(migrate.Route, name, inner)

    tracked("copy", migrate.Route.copy)
    tracked("copy_slots", migrate.Route.copy_slots)

    def marked(name: str, fn: Any) -> Any:
        def inner(self: Any, *a: Any, **kw: Any) -> Any:
            state["in"] = name
            try:
                return fn(self, *a, **kw)
            finally:
                state["in"] = "elsewhere"

        monkeypatch.setattr(ReconfigController, name, inner)

    marked("_switch", ReconfigController._switch)
    marked("after_dispatch", ReconfigController.after_dispatch)
    h = eng.reconfigure(THREE, verify=True)
    join_compile(eng)
    drain(eng)
    r = h.report()
    assert r.ok, f"{r.aborted_in}: {r.reason}"
    assert r.bytes_kv_final > 0 and "after_dispatch" in where, where
    assert "_switch" not in where, where
    assert r.verified_pages > 0
    assert outputs(eng, ids) == expected(ref, PROMPTS)
    assert_clean(eng)


def test_precopy_spread_over_steps_is_token_identical(eng, ref, monkeypatch):
    """One page per route per step: the pre-copy takes several steps while the sequences grow
    (new pages appear, written ones change); outputs and every migrated token still match."""
    import pipelive_jax.reconfig.controller as controller

    monkeypatch.setattr(controller, "PRECOPY_CHUNK_PAGES", 1)
    monkeypatch.setattr(controller, "PRECOPY_STEP_FRACTION", 0.0)
    ensure_plan(eng, TWO)
    ids = add(eng, PROMPTS)
    for _ in range(3):
        eng.step()
    phases: list[str] = []

    def seen(e) -> None:
        if e.reconfig is not None:
            phases.append(e.reconfig.phase)

    eng.step_hooks.append(seen)
    try:
        h = eng.reconfigure(THREE, verify=True)
        join_compile(eng)
        drain(eng)
    finally:
        eng.step_hooks.remove(seen)
    r = h.report()
    assert r.ok, f"{r.aborted_in}: {r.reason}"
    assert phases.count("PRECOPY") >= 3, phases
    # After the last timed round, one more old-plan step; its writes are the final copy
    # (dispatched behind that step), checked byte for byte with the rest by verify.
    assert phases.count("SWITCH") == 1 and r.bytes_kv_final > 0, phases
    assert r.verified_pages > 0 and r.bytes_kv_precopy > 0
    assert outputs(eng, ids) == expected(ref, PROMPTS)
    assert_clean(eng)


def test_patch_rounds_are_bounded_then_forced(eng, ref):
    """A pause budget nothing fits: exactly max_rounds patch rounds, each copying the pages the
    steps dirtied, then a final stop-and-copy, reported as forced."""
    ensure_plan(eng, TWO)
    r = migrate(eng, ref, MOVED_ONE, pause_budget_ms=1e-9, max_rounds=3)
    assert r.rounds == 3
    assert r.forced_stop_and_copy
    assert len(r.round_dirty_bytes) == 3 and all(b > 0 for b in r.round_dirty_bytes)
    assert r.bytes_kv_patched == sum(r.round_dirty_bytes)
    # Rounds copy the slots the steps wrote (one per running sequence per decode step), not
    # whole pages.
    slot_bytes = eng.kv_spec.page_bytes() // eng.config.page_size
    assert all(b % slot_bytes == 0 for b in r.round_dirty_bytes)
    assert all(b < eng.kv_spec.page_bytes() * 8 for b in r.round_dirty_bytes)
    assert len(r.round_ms) == 3


# ------------------------------------------------------------------ faults and aborts


def _flip_source_target(eng) -> tuple[Any, Any]:
    """TWO <-> MOVED_ONE (one route, one layer): start from whichever the engine is on."""
    if eng.plan == plan_of(MOVED_ONE):
        return MOVED_ONE, TWO
    ensure_plan(eng, TWO)
    return TWO, MOVED_ONE


def _boom(phase: str):
    def hook(ctl: ReconfigController) -> None:
        raise RuntimeError(f"injected fault in {phase}")

    return hook


def _rolled_back(eng, ref, ids, h, source, stages_before, phase, reason: str) -> None:
    drain(eng)
    r = h.report()
    assert h.done()
    assert not r.ok
    assert r.aborted_in == phase
    assert reason in (r.reason or "")
    assert r.error_traceback
    assert r.total_ms is not None
    assert eng.plan == plan_of(source)
    assert [id(st) for st in eng.executor.stages] == stages_before  # the old stages serve on
    assert outputs(eng, ids) == expected(ref, PROMPTS)
    assert_clean(eng)


@pytest.mark.parametrize(
    "phase",
    [
        "PREPARE",
        "STAGE_WEIGHTS",
        "PRECOPY",
        "PATCH",
        "SWITCH",
    ],
)
def test_fault_in_phase_rolls_back(eng, ref, phase):
    source, target = _flip_source_target(eng)
    ids = add(eng, PROMPTS)
    for _ in range(3):
        eng.step()
    stages_before = [id(st) for st in eng.executor.stages]
    h = eng.reconfigure(target, verify=True, hooks={phase: _boom(phase)})
    join_compile(eng)
    _rolled_back(eng, ref, ids, h, source, stages_before, phase, f"injected fault in {phase}")
    # A later reconfiguration works, with requests in flight.
    migrate(eng, ref, target)


def test_fault_in_validate_raises_at_the_call(eng, ref):
    source, target = _flip_source_target(eng)
    ids = add(eng, PROMPTS)
    for _ in range(3):
        eng.step()
    stages_before = [id(st) for st in eng.executor.stages]
    history = len(eng.reconfig_history)
    with pytest.raises(RuntimeError, match="injected fault in VALIDATE"):
        eng.reconfigure(target, hooks={"VALIDATE": _boom("VALIDATE")})
    assert eng.reconfig is None
    assert len(eng.reconfig_history) == history
    assert eng.plan == plan_of(source)
    assert [id(st) for st in eng.executor.stages] == stages_before
    assert [id(t) for t in eng.scheduler.page_tables] == [
        id(st.pages) for st in eng.executor.stages
    ]
    drain(eng)
    assert outputs(eng, ids) == expected(ref, PROMPTS)
    assert_clean(eng)
    ensure_plan(eng, target)  # a later reconfiguration works


def test_fault_in_resize_keeps_the_new_plan(eng, ref):
    """Past the switch the new plan serves: a RESIZE failure is reported, not rolled back."""
    source, target = _flip_source_target(eng)
    r = migrate(eng, ref, target, hooks={"RESIZE": _boom("RESIZE")})
    assert r.ok and r.aborted_in is None
    assert r.reason is not None and "after switch" in r.reason and "injected fault" in r.reason
    assert eng.plan == plan_of(target)
    ensure_plan(eng, source)  # a later reconfiguration works


def test_prepare_failure_after_partial_setup_leaves_nothing_behind(eng, ref, monkeypatch):
    ensure_plan(eng, TWO)
    ids = add(eng, PROMPTS)
    for _ in range(3):
        eng.step()

    def oom(self) -> None:
        raise RuntimeError("RESOURCE_EXHAUSTED: simulated device_put failure")

    monkeypatch.setattr(ReconfigController, "_move_weights", oom)
    try:
        h = eng.reconfigure(THREE)  # device 2 is new: gets a mirror table
    except RuntimeError:
        h = None
    monkeypatch.undo()
    if h is not None:
        drain(eng)
        assert not h.report().ok and h.report().aborted_in == "PREPARE"
    assert eng.plan == plan_of(TWO)
    assert [id(t) for t in eng.scheduler.page_tables] == [
        id(st.pages) for st in eng.executor.stages
    ]
    drain(eng)
    assert outputs(eng, ids) == expected(ref, PROMPTS)
    assert_clean(eng)


@pytest.mark.parametrize("when", ["PREPARE", "PATCH"])
def test_user_abort_rolls_back(eng, ref, when):
    """handle.abort() before the compile finished, or in the middle of the patch rounds."""
    source, target = _flip_source_target(eng)
    ids = add(eng, PROMPTS)
    for _ in range(3):
        eng.step()
    stages_before = [id(st) for st in eng.executor.stages]
    # A pause budget nothing fits keeps the controller in PATCH for max_rounds rounds.
    h = eng.reconfigure(target, verify=True, pause_budget_ms=1e-9, max_rounds=8)
    if when == "PREPARE":
        h.abort("changed my mind")
    else:
        join_compile(eng)

        def abort_mid_patch(e) -> None:
            if (
                e.reconfig is not None
                and e.reconfig.phase == "PATCH"
                and e.reconfig.report.rounds >= 2
            ):
                h.abort("changed my mind")

        eng.step_hooks.append(abort_mid_patch)
    _rolled_back(eng, ref, ids, h, source, stages_before, when, "changed my mind")
    if when == "PATCH":
        assert h.report().rounds >= 2 and h.report().bytes_kv_precopy > 0
    h.abort("too late")  # no effect once done
    assert h.report().aborted_in == when
    eng.step_hooks.clear()
    ensure_plan(eng, target)


def test_timeout_rolls_back(eng, ref):
    source, target = _flip_source_target(eng)
    ids = add(eng, PROMPTS)
    eng.step()
    stages_before = [id(st) for st in eng.executor.stages]
    h = eng.reconfigure(target, timeout_s=0.0)
    _rolled_back(eng, ref, ids, h, source, stages_before, "PREPARE", "timed out")


def test_the_timeout_leaves_out_time_spent_compiling(tiny):
    """PREPARE compiles every shape the old plan serves on a background thread, which takes as
    long as it takes: with each compile made 0.4 s slower (6 here: 2 shapes x 3 stages), a 1 s
    timeout does not cut it; a phase held up on the engine's side (a slow PATCH hook) still
    times out and rolls back."""
    eng = LLM(tiny, plan=TWO, **OPTIONS).engine
    ids = add(eng, PROMPTS)
    drain(eng)
    first = outputs(eng, ids)
    cache = eng.cache
    compile_fn = cache._compile

    def slow(sig, shape):
        time.sleep(0.4)
        return compile_fn(sig, shape)

    cache._compile = slow
    ids = add(eng, PROMPTS)
    eng.step()
    h = eng.reconfigure(THREE, timeout_s=1.0)
    run_to_done(eng, h)
    r = h.report()
    assert r.ok, r.reason
    assert r.phase_ms["PREPARE"] > 1000.0
    drain(eng)
    assert outputs(eng, ids) == first

    # A PATCH held up on the engine's side: the timeout ends it.
    h = eng.reconfigure(TWO, timeout_s=1.0, hooks={"PATCH": lambda ctl: time.sleep(1.2)})
    ids = add(eng, PROMPTS)
    run_to_done(eng, h)
    assert not h.report().ok and "timed out" in h.report().reason
    drain(eng)
    assert eng.plan == plan_of(THREE) and outputs(eng, ids) == first


# ------------------------------------------------------------------ refused at the call


def test_second_reconfigure_while_in_flight_is_refused(eng, ref):
    source, target = _flip_source_target(eng)
    ids = add(eng, PROMPTS)
    eng.step()
    h = eng.reconfigure(target, verify=True)
    assert not h.done()
    st = h.status()
    assert st["phase"] == "PREPARE" and st["done"] is False and st["ok"] is None
    assert st["mode"] == "live" and st["target"] == str(plan_of(target))
    assert eng.status()["reconfig"]["phase"] == "PREPARE"
    with pytest.raises(ReconfigError, match="already in flight"):
        eng.reconfigure(source)
    with pytest.raises(ReconfigError, match="already in flight"):
        eng.reconfigure(THREE, mode="stop_and_copy")
    assert eng.reconfig is not None and eng.reconfig.handle is h
    join_compile(eng)
    drain(eng)
    assert h.report().ok and eng.plan == plan_of(target)
    assert h.status()["done"] is True and h.status()["ok"] is True
    assert eng.status()["reconfig"] is None
    assert outputs(eng, ids) == expected(ref, PROMPTS)
    assert_clean(eng)


@pytest.mark.parametrize(
    "bad",
    [
        [3, 2],  # 5 layers of 6
        [3, 4],  # 7 layers
        [3, 0, 3],  # an empty stage
        stages_json((1, 3), (1, 3)),  # one device in two stages
        stages_json((0, 3), (9, 3)),  # no device 9
        {"stages": [{"devices": [0], "layers": [0, 4]}, {"devices": [1], "layers": [3, 6]}]},
        "three,three",
        3.5,
    ],
    ids=["short", "long", "empty_stage", "dup_device", "no_device", "overlap", "text", "float"],
)
def test_bad_plan_raises_plan_error(eng, bad):
    before = eng.plan
    stages_before = [id(st) for st in eng.executor.stages]
    with pytest.raises(PlanError):
        eng.reconfigure(bad)
    assert eng.reconfig is None and eng.plan == before
    assert [id(st) for st in eng.executor.stages] == stages_before


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(mode="hot"), "unknown mode"),
        (dict(mode="LIVE"), "unknown mode"),
        (dict(max_rounds=0), "max_rounds"),
        (dict(pause_budget_ms=0), "pause_budget_ms"),
    ],
)
def test_bad_options_raise_reconfig_error(eng, kw, match):
    before = eng.plan
    target = THREE if before != plan_of(THREE) else TWO
    with pytest.raises(ReconfigError, match=match):
        eng.reconfigure(target, **kw)
    assert eng.reconfig is None and eng.plan == before


def test_noop_reconfigure_leaves_nothing_in_flight(eng):
    before = eng.plan
    h = eng.reconfigure(before)
    assert h.done() and h.report().ok
    assert eng.plan == before
    assert eng.reconfig is None
    assert not eng.has_unfinished()


# ------------------------------------------------------------------ driving the state machine


def test_step_advances_a_reconfiguration_on_an_idle_engine(eng):
    source, target = _flip_source_target(eng)
    steps_before = eng.step_count
    h = eng.reconfigure(target, verify=True)
    assert eng.has_unfinished()  # the reconfiguration keeps the loop going
    n = run_to_done(eng, h)
    r = h.report()
    assert r.ok and eng.plan == plan_of(target) and n >= 3
    assert eng.step_count == steps_before  # no batch ran
    assert r.bytes_kv_precopy == 0 and r.verified_pages == 0  # nothing live to copy
    assert not eng.has_unfinished()
    assert_clean(eng)


def test_handle_wait_with_the_background_loop(eng, ref):
    source, target = _flip_source_target(eng)
    eng.start()
    try:
        ids = add(eng, PROMPTS)
        h = eng.reconfigure(target, verify=True)
        r = h.wait(timeout=300)
        assert r.ok and eng.plan == plan_of(target)
        eng.stop(drain=True, timeout=300)
    finally:
        eng.stop()
    assert outputs(eng, ids) == expected(ref, PROMPTS)
    assert_clean(eng)


# ------------------------------------------------------------------ memory budgets (devices 6, 7)

MEM_A = stages_json((6, 3), (7, 3))
MEM_B = stages_json((6, 4), (7, 2))  # device 6 gains layer 3: it must shrink its KV first
MEM_DEVICES = (6, 7)


def _budget_for(shape, layers: int, pages: int, utilization: float = 0.9) -> int:
    """A per-device budget whose usable bytes fit `layers` layers, the larger of embedding and
    head, and `pages` pages of each layer (plus a little slack)."""
    extra = max(shape.embed_bytes(), shape.head_bytes())
    usable = layers * shape.weight_bytes_per_layer() + extra
    usable += layers * pages * shape.page_bytes_per_layer(16) + 1000
    return int(np.ceil(usable / utilization)) + 1


def _stage_bytes(eng, st) -> int:
    """What one serving stage should hold: its layers' weights, embedding/head, pools."""
    shape = eng.shape
    n = st.spec.num_layers
    b = n * shape.weight_bytes_per_layer() + n * st.pages.num_pages * eng.kv_spec.page_bytes()
    if st.is_first:
        b += shape.embed_bytes()
    if st.is_last:
        b += shape.head_bytes()
    return b


class MemoryRecorder:
    """`live_bytes_per_device()` at every step boundary and at every phase hook."""

    def __init__(self, base: dict[int, int]) -> None:
        self.base = base
        self.rows: list[tuple[str, dict[int, int]]] = []

    def record(self, where: str) -> None:
        live = live_bytes_per_device()
        self.rows.append((where, {d: live.get(d, 0) - b for d, b in self.base.items()}))

    def step_hook(self, eng) -> None:
        self.record(eng.reconfig.phase if eng.reconfig is not None else "serving")

    def phase_hooks(self) -> dict[str, Any]:
        def make(phase):
            return lambda ctl: self.record(f"hook:{phase}")

        return {
            p: make(p) for p in ("PREPARE", "STAGE_WEIGHTS", "PRECOPY", "PATCH", "SWITCH", "RESIZE")
        }

    def max(self, device: int, during_reconfig_only: bool = False) -> int:
        return max(
            row[device]
            for where, row in self.rows
            if not during_reconfig_only or where != "serving"
        )


def _abort_all(eng) -> None:
    for rid, req in list(eng.requests.items()):
        if not req.finished:
            eng.abort(rid)


def _collect() -> None:
    """Frees what the memory tests' engines held, so that the next engine on devices 6 and 7
    is measured alone. pytest keeps the last exception's traceback in sys.last_* (for
    post-mortem debugging); an xfailed test's frames would keep its engine alive."""
    for name in ("last_type", "last_value", "last_traceback", "last_exc"):
        if hasattr(sys, name):
            setattr(sys, name, None)
    gc.collect()


def _baseline() -> dict[int, int]:
    """Bytes already on devices 6 and 7 before a memory test's engine exists (0 when this
    module runs alone: nothing else here uses those devices); measurements subtract it."""
    _collect()
    live = live_bytes_per_device()
    return {d: live.get(d, 0) for d in MEM_DEVICES}


@pytest.fixture(scope="class")
def budget_engine(tiny):
    """TWO on devices 6, 7 with a budget for 3 layers and 64 pages per stage."""
    base = _baseline()
    shape = model_shape(split_model(tiny.model)[0])
    budget = _budget_for(shape, layers=3, pages=64)
    eng = LLM(
        tiny, plan=MEM_A, device_memory_bytes=budget, max_model_len=64, max_num_seqs=32
    ).engine
    ns = SimpleNamespace(
        eng=eng, budget=budget, usable=eng.config.budget(6).usable_bytes, base=base
    )
    yield ns
    _abort_all(eng)
    ns.eng = eng = None
    _collect()


@pytest.fixture(scope="class")
def fixed_engine(tiny):
    """TWO on devices 6, 7 with kv_resize=False and a budget for 6 layers and 32 pages."""
    base = _baseline()
    shape = model_shape(split_model(tiny.model)[0])
    budget = _budget_for(shape, layers=6, pages=32)
    eng = LLM(
        tiny,
        plan=MEM_A,
        device_memory_bytes=budget,
        kv_resize=False,
        max_model_len=64,
        max_num_seqs=4,
    ).engine
    ns = SimpleNamespace(eng=eng, base=base)
    yield ns
    _abort_all(eng)
    ns.eng = eng = None
    _collect()


class TestMemoryBudget:
    """device_memory_bytes such that TWO on 6, 7 has 64 pages per stage, MEM_B's transition only
    32 (device 6 holds 4 layers), and after the switch device 7 (2 layers) has room for 112."""

    def test_capacities_come_from_the_budget(self, budget_engine):
        eng = budget_engine.eng
        assert [st.pages.num_pages for st in eng.executor.stages] == [64, 64]
        for i in range(2):
            b = eng.config.budget(MEM_DEVICES[i])
            raw = max_pages(b, eng.shape, 3, 16, stage_extra_bytes(eng.shape, eng.plan, i))
            assert round_capacity(raw, eng.config.page_granule) == 64

    def test_budget_holds_during_the_transition_and_pools_grow_back(self, budget_engine, ref):
        eng, usable = budget_engine.eng, budget_engine.usable
        ensure_plan(eng, MEM_A)
        assert [st.pages.num_pages for st in eng.executor.stages] == [64, 64]
        rec = MemoryRecorder(budget_engine.base)
        eng.step_hooks.append(rec.step_hook)
        try:
            ids = add(eng, PROMPTS)
            for _ in range(3):
                eng.step()
            gc.collect()
            rec.record("before")
            # Before: exactly the weights and pools of each stage, at the budget's capacity.
            for st in eng.executor.stages:
                assert rec.rows[-1][1][st.device.id] == _stage_bytes(eng, st)
            h = eng.reconfigure(MEM_B, verify=True, hooks=rec.phase_hooks())
            rec.record("after reconfigure()")
            # PREPARE first compiles the old stages for the transition capacity B_shrink (they
            # keep serving at full capacity meanwhile), then shrinks them before anything new
            # is allocated.
            assert [st.pages.num_pages for st in eng.executor.stages] == [64, 64]
            join_compile(eng)
            assert [st.pages.num_pages for st in eng.executor.stages] == [32, 32]
            drain(eng)
        finally:
            eng.step_hooks.remove(rec.step_hook)
        r = h.report()
        assert r.ok, r.reason
        assert eng.plan == plan_of(MEM_B)
        assert r.bytes_kv_precopy > 0 and r.verified_pages > 0
        assert outputs(eng, ids) == expected(ref, PROMPTS)
        assert_clean(eng)
        phases = {w for w, _ in rec.rows}
        assert {"PREPARE", "PATCH", "hook:PRECOPY", "hook:SWITCH", "RESIZE"} <= phases
        for d in MEM_DEVICES:
            peak = rec.max(d, during_reconfig_only=True)
            assert peak <= usable, f"device {d}: {peak} bytes > usable budget {usable}"
        # Device 6 holds 4 layers: its pools stay at 32; device 7 (2 layers) grew where room appeared.
        assert r.resize_ms is not None
        assert (
            [st.pages.num_pages for st in eng.executor.stages]
            == [
                eng.pages_for_stage(eng.plan, 0),
                eng.pages_for_stage(eng.plan, 1),
            ]
            == [32, 112]
        )

    def test_budget_holds_after_switches_and_departed_weights_are_freed(self, budget_engine, ref):
        eng, usable = budget_engine.eng, budget_engine.usable
        rec = MemoryRecorder(budget_engine.base)
        eng.step_hooks.append(rec.step_hook)
        try:
            for target in (MEM_A, MEM_B) if eng.plan == plan_of(MEM_B) else (MEM_B, MEM_A):
                ids = add(eng, PROMPTS)
                for _ in range(3):
                    eng.step()
                h = eng.reconfigure(target, verify=True)
                join_compile(eng)
                drain(eng)
                eng.step()  # one more boundary, after the growth
                assert h.report().ok and outputs(eng, ids) == expected(ref, PROMPTS)
        finally:
            eng.step_hooks.remove(rec.step_hook)
        gc.collect()
        live = live_bytes_per_device()
        for st in eng.executor.stages:
            assert live.get(st.device.id, 0) - budget_engine.base[st.device.id] == _stage_bytes(
                eng, st
            ), f"device {st.device.id}"
        for d in MEM_DEVICES:
            assert rec.max(d) <= usable, f"device {d}: {rec.max(d)} bytes > usable budget {usable}"

    def test_fault_after_shrink_restores_capacity(self, budget_engine, ref):
        eng = budget_engine.eng
        source = MEM_A if eng.plan == plan_of(MEM_A) else MEM_B
        target = MEM_B if source is MEM_A else MEM_A
        caps = [st.pages.num_pages for st in eng.executor.stages]
        ids = add(eng, PROMPTS)
        for _ in range(3):
            eng.step()
        h = eng.reconfigure(target, verify=True, hooks={"PATCH": _boom("PATCH")})
        assert [st.pages.num_pages for st in eng.executor.stages] == caps  # compiling first
        join_compile(eng)
        assert [st.pages.num_pages for st in eng.executor.stages] == [32, 32]  # shrunk
        drain(eng)
        r = h.report()
        assert not r.ok and r.aborted_in == "PATCH"
        assert eng.plan == plan_of(source)
        assert [st.pages.num_pages for st in eng.executor.stages] == caps  # restored
        assert outputs(eng, ids) == expected(ref, PROMPTS)
        assert_clean(eng)

    def test_admission_refuses_a_plan_that_cannot_fit(self, budget_engine, ref):
        """All six layers onto device 6: the transition leaves no room for the pages in use."""
        eng = budget_engine.eng
        ids = add(eng, PROMPTS)
        for _ in range(3):
            eng.step()
        plan_before = eng.plan
        stages_before = [id(st) for st in eng.executor.stages]
        caps = [st.pages.num_pages for st in eng.executor.stages]
        used = eng.executor.stages[0].pages.num_used
        assert used > 0
        with pytest.raises(AdmissionError) as info:
            eng.reconfigure(stages_json((6, 6)))
        err = info.value
        assert "device 6" in str(err) and f"{used} pages are in use" in str(err)
        assert err.numbers["device"] == 6
        assert err.numbers["pages_in_use"] == used
        assert err.numbers["pages_that_fit"] < used
        assert err.numbers["resident_layers"] == 6
        assert set(err.numbers["devices"]) == {6, 7}
        # Nothing changed, and serving goes on.
        assert eng.reconfig is None and eng.plan == plan_before
        assert [id(st) for st in eng.executor.stages] == stages_before
        assert [st.pages.num_pages for st in eng.executor.stages] == caps
        drain(eng)
        assert outputs(eng, ids) == expected(ref, PROMPTS)
        assert_clean(eng)

    def test_admission_message_is_accurate_when_weights_fit(self, budget_engine):
        eng = budget_engine.eng
        shape = eng.shape
        weights = shape.total_weight_bytes()
        assert weights < eng.config.budget(6).usable_bytes  # all weights do fit on device 6
        with pytest.raises(AdmissionError) as info:
            eng.reconfigure(stages_json((6, 6)))
        msg = str(info.value)
        assert "cannot even hold the weights" not in msg
        assert "device 6" in msg and "before rounding down" in msg


class TestNoResize:
    """kv_resize=False: each stage's pools are sized once for all six layers, and stay so."""

    def test_pools_sized_for_all_layers_and_reconfiguration_works(self, fixed_engine, ref):
        eng = fixed_engine.eng
        for i, st in enumerate(eng.executor.stages):
            raw = max_pages(
                eng.config.budget(st.device.id),
                eng.shape,
                NUM_LAYERS,
                16,
                stage_extra_bytes(eng.shape, eng.plan, i),
            )
            assert st.pages.num_pages == round_capacity(raw, eng.config.page_granule) == 32
        rec = MemoryRecorder(fixed_engine.base)
        eng.step_hooks.append(rec.step_hook)
        try:
            ids = add(eng, PROMPTS)
            for _ in range(3):
                eng.step()
            h = eng.reconfigure(MEM_B, verify=True, hooks=rec.phase_hooks())
            assert [st.pages.num_pages for st in eng.executor.stages] == [32, 32]  # no shrink
            join_compile(eng)
            drain(eng)
        finally:
            eng.step_hooks.remove(rec.step_hook)
        r = h.report()
        assert r.ok and eng.plan == plan_of(MEM_B)
        assert r.bytes_kv_precopy > 0 and r.verified_pages > 0
        assert r.resize_ms is None  # nothing to grow
        assert [st.pages.num_pages for st in eng.executor.stages] == [32, 32]
        assert outputs(eng, ids) == expected(ref, PROMPTS)
        assert_clean(eng)
        usable = eng.config.budget(6).usable_bytes
        for d in MEM_DEVICES:
            assert rec.max(d) <= usable


@pytest.fixture(scope="class")
def roomy_engine(tiny):
    """TWO on devices 6, 7 with a budget far above what 4 sequences of 64 tokens can use."""
    _collect()
    eng = LLM(
        tiny, plan=MEM_A, device_memory_bytes=1 << 30, max_model_len=64, max_num_seqs=4
    ).engine
    yield eng
    _abort_all(eng)
    eng = None
    _collect()


class TestUsefulCapacity:
    """A budget-derived capacity stops at the pages the engine's requests can ever use: more is
    never used, and growing into it after a reconfiguration copied all KV for nothing."""

    def test_capacity_stops_at_useful_pages_and_nothing_grows_past_it(self, roomy_engine, ref):
        eng = roomy_engine
        # 4 sequences x ceil(64 / 16) pages + page 0 = 17, rounded up to the granule (16).
        assert eng.config.useful_pages == 32
        raw = max_pages(
            eng.config.budget(6), eng.shape, 3, 16, stage_extra_bytes(eng.shape, eng.plan, 0)
        )
        assert raw > 1000  # what the budget alone would give
        assert [st.pages.num_pages for st in eng.executor.stages] == [32, 32]
        # Device 7 goes from 3 layers to 2: room appears there, but not room anything can use.
        r = migrate(eng, ref, MEM_B)  # token identity, verified pages, nothing leaked
        assert r.resize_ms is None  # nothing grown
        assert [st.pages.num_pages for st in eng.executor.stages] == [32, 32]


# ------------------------------------------------------------------ RESIZE failure and leaks


def test_resize_failure_still_frees_the_departed_pools(eng, ref):
    ensure_plan(eng, THREE)
    migrate(eng, ref, TWO, hooks={"RESIZE": _boom("RESIZE")})
    gc.collect()
    assert kv_pool_arrays_on(2, eng.kv_spec.pool_shape(OPTIONS["num_pages"])) == []


# ------------------------------------------------------------------ restart baseline (last:
# it replaces the engine's compile cache, as a restarted server would)


@pytest.mark.parametrize("source, target", [(TWO, THREE), (THREE, ONE)], ids=["2to3", "3to1"])
def test_restart_mode_is_token_identical(eng, ref, source, target):
    ensure_plan(eng, source)
    r = migrate(eng, ref, target, mode="restart")
    assert r.bytes_kv_precopy == 0 and r.bytes_kv_final == 0
    assert "SWITCH" in r.phase_ms and "PRECOPY" not in r.phase_ms


def test_restart_compiles_every_shape_the_old_cache_had_in_its_pause(eng):
    ensure_plan(eng, ONE)
    old_cache, before = eng.cache, eng.cache.compiles
    old_shapes = old_cache.shapes()
    h = eng.reconfigure(TWO, mode="restart")
    run_to_done(eng, h)
    r = h.report()
    assert r.ok and eng.plan == plan_of(TWO) and eng.cache is not old_cache
    # A new cache, filled in the pause for both stages with every shape the old one had (so no
    # step after the restart compiles inline); the count carries on across the two caches.
    assert r.compiled_in_pause == len(old_shapes) * 2
    assert eng.cache.compiles - before >= r.compiled_in_pause
    assert all(eng.cache.has(st, s) for st in eng.executor.stages for s in old_shapes)


def test_a_new_plan_compiles_every_shape_the_old_one_serves_not_only_recent_ones(tiny):
    """A shape met long before the reconfiguration (three prompts prefilled together, then 300
    decode-only steps) is compiled for the new plan too: when it comes back after the switch,
    no step compiles inline. Its own engine: the shared one keeps to two shapes."""
    llm = LLM(tiny, plan=TWO, **OPTIONS)
    eng = llm.engine
    ids = add(eng, PROMPTS)  # the rare shape: three prefills in one step
    drain(eng)
    first = outputs(eng, ids)
    # 4 x (1 + 44) tokens fit the 15 pages (no preemption); 7 rounds: > 256 decode steps.
    long_params = SamplingParams(max_tokens=44, ignore_eos=True)
    for _ in range(7):  # one-token prompts decoding: the decode shape only
        add(eng, LOAD_PROMPTS[:4], long_params)
        drain(eng)
    served = set(eng.executor_shapes())
    h = eng.reconfigure(THREE, mode="live")
    run_to_done(eng, h)
    assert h.report().ok and eng.plan == plan_of(THREE)
    assert all(eng.cache.has(st, s) for st in eng.executor.stages for s in served)
    before = eng.cache.compiles
    ids = add(eng, PROMPTS)
    drain(eng)
    assert eng.cache.compiles == before
    assert outputs(eng, ids) == first


def test_a_shape_first_met_during_prepare_is_compiled_before_the_switch(tiny):
    """PREPARE takes its list of shapes when it begins; a shape the old plan first serves
    while PREPARE compiles (here: three prompts prefilled together) is compiled for the new
    plan before the switch, so that no step after it compiles inline."""
    eng = LLM(tiny, plan=TWO, **OPTIONS).engine
    add(eng, LOAD_PROMPTS[:4], LOAD_PARAMS)  # the decode shape only
    drain(eng)
    h = eng.reconfigure(THREE, mode="live")
    assert eng.reconfig.phase == "PREPARE"
    ids = add(eng, PROMPTS)
    eng.step()  # the new shape, compiled inline on the old plan, while PREPARE compiles
    assert eng.reconfig is not None and eng.reconfig.phase == "PREPARE"
    run_to_done(eng, h)
    drain(eng)
    first = outputs(eng, ids)
    assert h.report().ok and eng.plan == plan_of(THREE)
    before = eng.cache.compiles
    ids = add(eng, PROMPTS)
    drain(eng)
    assert eng.cache.compiles == before
    assert outputs(eng, ids) == first


@pytest.mark.parametrize("when", ["PATCH", "SWITCH"])
def test_a_shape_first_met_during_the_migration_is_compiled_before_the_switch(tiny, ref, when):
    """A shape the old plan first serves in a patch round, or in the final old-plan step
    (phase SWITCH, before the pause), is compiled for the new plan before it takes over: the
    patch rounds go on meanwhile (from SWITCH the controller goes back to them)."""
    eng = LLM(tiny, plan=TWO, **OPTIONS).engine
    add(eng, LOAD_PROMPTS[:4], LOAD_PARAMS)  # the decode shape only
    drain(eng)
    known = set(eng.executor_shapes())
    served: list = []
    hooks = {"SWITCH": lambda ctl: served.extend(ctl.engine.executor_shapes())}
    add(eng, LOAD_PROMPTS[:1], LOAD_PARAMS)  # in flight, so that the migration takes steps
    h = eng.reconfigure(THREE, mode="live", hooks=hooks)
    join_compile(eng)
    for _ in range(12):
        if eng.reconfig is None or eng.reconfig.phase == when:
            break
        eng.step()
    assert eng.reconfig is not None and eng.reconfig.phase == when
    ids = add(eng, PROMPTS)
    eng.step()  # three prefills beside a decode: compiled inline on the old plan
    assert eng.reconfig is not None and eng.reconfig.phase in ("PATCH", "SWITCH")
    run_to_done(eng, h)
    drain(eng)
    r = h.report()
    assert r.ok, r.reason
    assert eng.plan == plan_of(THREE)
    assert set(served) - known  # the prefills' shape, first met during the migration
    assert all(eng.cache.has(st, s) for st in eng.executor.stages for s in served)
    assert outputs(eng, ids) == expected(ref, PROMPTS)
    assert_clean(eng)


# ------------------------------------------------------------------ real weights


@pytest.mark.smollm2
def test_smollm2_live_two_to_three_uneven_stages(smollm2):
    prompts = ["The capital of France is", "Once upon a time, there was", "def add(a, b):"]
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    eng = LLM(smollm2, plan=[15, 15], num_pages=16, max_model_len=64, max_num_seqs=4).engine
    ids = add(eng, prompts, params)
    drain(eng)
    reference = outputs(eng, ids)
    assert all(len(o) == 24 for o in reference)
    ids = add(eng, prompts, params)
    for _ in range(3):
        eng.step()
    probe = Probe()
    h = eng.reconfigure([8, 12, 10], verify=True, hooks=probe.hooks())
    join_compile(eng)
    drain(eng)
    r = h.report()
    assert r.ok, r.reason
    assert eng.plan == parse_plan([8, 12, 10], num_layers=30)
    assert r.bytes_kv_precopy > 0 and probe.used["PRECOPY"] > 0
    assert (
        r.verified_pages
        == len(plan_diff(plan_of_30([15, 15]), eng.plan).by_route()) * probe.used["SWITCH"]
        > 0
    )
    assert outputs(eng, ids) == reference
    assert_clean(eng)


def plan_of_30(spec):
    return parse_plan(spec, num_layers=30)

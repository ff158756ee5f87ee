"""Replay a workload in real time against an `Engine`, with a reconfiguration schedule.

The loop (one thread, the caller's):

1. add every request whose arrival time has come (`Engine.add_request`);
2. start every `[[reconfig]]` entry that is due: at `at_s` seconds into the run, or when the
   `after_requests`-th request has arrived. One reconfiguration runs at a time, so an entry that
   comes due while another is in flight waits for it (the wait is recorded). A plan the engine
   refuses (`AdmissionError`, or any other `PipeliveError` at the call) is recorded as a refusal
   and serving goes on;
3. `Engine.step()` when there is work, else sleep until the next arrival.

Latencies are measured from each request's *scheduled* arrival, not from when the loop got round
to adding it: a request that arrives during a long step (a compile, a reconfiguration pause)
waits, as a client's request would wait in the server's socket. Tokens are timed when the step
that produced them returns to the host (`RequestMetrics.token_times`).

Before the measured run an optional rehearsal replays the very same workload and schedule once,
unmeasured, then compiles every batch shape it met for every (stage, KV capacity) it met
(`CompileCache.compile_known`), so that the measured run meets no compile: on CPU each compiles
for seconds, and without a rehearsal those compiles, not the system under test, dominate the
latencies. The measured run then serves only on those shapes (`Engine.shapes_frozen`: a batch
runs padded on the smallest compiled shape that holds it), as a server that compiled its shape
buckets at start-up. Which shapes a run meets, and so which a reconfiguration compiles for its
new stages, depends on timing; before these two steps two runs of one config compiled at
different moments and their latencies differed up to 2x. A restarted engine starts with an
empty compile cache and compiles every shape the old one had in its pause; after a rehearsal
those programs come from JAX's in-process cache, as a persistent compilation cache would serve
a real restart. An
optional warm-up (not measured) serves `warmup_requests` requests
drawn from the same workload with another seed, so that the batch shapes the workload uses are
compiled; with `warmup_reconfig` it also walks through the reconfiguration schedule with requests
in flight, so that every plan's stage functions (and the transition capacities) are compiled too,
as on a server whose plans were prepared ahead of time. Without it a reconfiguration compiles its
new stages on a background thread during the measured run, which on a 2-core CPU competes with
serving.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pipelive_jax.bench.workload import WorkloadRequest, make_workload, summarize
from pipelive_jax.config import BenchConfig, ReconfigEntry, WorkloadSection
from pipelive_jax.errors import AdmissionError, ConfigError, PipeliveError

if TYPE_CHECKING:
    from pipelive_jax.serving.engine import Engine

__all__ = ["RunRecord", "run_bench", "run_workload"]


@dataclass
class RunRecord:
    """What one measured run observed; `bench.results.compute_results` turns it into metrics.

    Times ending in `_s` are seconds from the run's start `t0` (a `time.perf_counter()` value);
    request metrics keep the engine's perf_counter times.
    """

    t0: float
    requests: list[WorkloadRequest]
    request_ids: list[str]
    metrics: dict[str, Any] = field(default_factory=dict)  # request id -> RequestMetrics
    outputs: dict[str, int] = field(default_factory=dict)  # request id -> output tokens
    finish_reasons: dict[str, str | None] = field(default_factory=dict)
    reconfigs: list[dict[str, Any]] = field(default_factory=list)
    refusals: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    steps: int = 0
    step_ms_max: float = 0.0
    long_steps: list[tuple[float, float]] = field(default_factory=list)  # (start_s, ms) > 1 s
    preemptions: int = 0
    compiles: int = 0
    end_s: float = 0.0
    timed_out: bool = False
    plans: list[tuple[float, str]] = field(default_factory=list)  # (time_s, plan) from t0
    warmup: dict[str, Any] = field(default_factory=dict)


def _params(req: WorkloadRequest, temperature: float, ignore_eos: bool, seed: int) -> Any:
    from pipelive_jax.serving.sampling import SamplingParams

    return SamplingParams(
        max_tokens=req.max_tokens,
        temperature=temperature,
        ignore_eos=ignore_eos,
        seed=seed if temperature > 0 else None,
    )


def _start_reconfig(engine: Engine, entry: ReconfigEntry) -> Any:
    return engine.reconfigure(
        entry.plan,
        mode=entry.mode,
        pause_budget_ms=entry.pause_budget_ms,
        max_rounds=entry.max_rounds,
    )


def run_workload(
    engine: Engine,
    requests: list[WorkloadRequest],
    schedule: tuple[ReconfigEntry, ...] = (),
    *,
    temperature: float = 0.0,
    ignore_eos: bool = True,
    seed: int = 0,
    max_duration_s: float = 900.0,
    progress: bool = True,
    id_prefix: str = "r",
    on_tick: Callable[[RunRecord], None] | None = None,
) -> RunRecord:
    """Replays `requests` in real time on `engine`, applying `schedule`; returns the record."""
    from tqdm import tqdm

    reqs = sorted(requests, key=lambda r: r.arrival_s)
    rec = RunRecord(
        t0=0.0, requests=reqs, request_ids=[f"{id_prefix}{i}" for i in range(len(reqs))]
    )
    sched = engine.scheduler
    preempt0 = sched.num_preemptions
    compiles0 = engine.cache.compiles
    pending = list(range(len(schedule)))  # entries not started yet, in order
    active: dict[str, Any] | None = None  # the entry in flight: its record + handle
    next_req = 0
    finished: set[str] = set()
    bar = tqdm(
        total=len(reqs), unit="req", desc="bench", disable=not progress, mininterval=0.5, leave=True
    )
    rec.t0 = t0 = time.perf_counter()
    rec.plans.append((0.0, str(engine.plan)))
    plan_obj = engine.plan
    # The runner holds its requests itself: the engine forgets old finished ones
    # (finished_retention), and a long run may finish more than it keeps.
    submitted: dict[str, Any] = {}
    while True:
        now = time.perf_counter() - t0
        # 1. arrivals
        while next_req < len(reqs) and reqs[next_req].arrival_s <= now:
            r = reqs[next_req]
            rid = rec.request_ids[next_req]
            engine.add_request(
                list(r.prompt_token_ids), _params(r, temperature, ignore_eos, seed + next_req), rid
            )
            # latencies count from the scheduled arrival (see the module docstring)
            submitted[rid] = engine.requests[rid]
            submitted[rid].metrics.arrival_time = t0 + r.arrival_s
            next_req += 1
        # 2. reconfigurations
        if active is not None and active["handle"].done():
            _close(active, t0, rec)
            active = None
        while active is None and pending:
            entry = schedule[pending[0]]
            due_s = _due(entry, reqs, next_req)
            if due_s is None or due_s > now:
                break
            idx = pending.pop(0)
            info: dict[str, Any] = {
                "index": idx,
                "mode": entry.mode,
                "due_s": round(due_s, 4),
                "start_s": round(time.perf_counter() - t0, 4),
                "trigger": {"at_s": entry.at_s}
                if entry.at_s is not None
                else {"after_requests": entry.after_requests},
                "source": str(engine.plan),
            }
            try:
                handle = _start_reconfig(engine, entry)
            except PipeliveError as e:
                info["error"] = type(e).__name__
                info["reason"] = str(e)
                if isinstance(e, AdmissionError):
                    info["numbers"] = _jsonable(e.numbers)
                rec.refusals.append(info)
                continue
            info["handle"] = handle
            active = info
        # 3. serve, or wait for the next event
        if engine.has_unfinished():
            ts = time.perf_counter()
            outs = engine.step()
            te = time.perf_counter()
            rec.steps += 1
            ms = (te - ts) * 1e3
            rec.step_ms_max = max(rec.step_ms_max, ms)
            if ms > 1000:
                rec.long_steps.append((round(ts - t0, 3), round(ms, 1)))
            if engine.plan is not plan_obj:
                plan_obj = engine.plan
                rec.plans.append((round(ts - t0, 4), str(plan_obj)))
                if active is not None and "switch_s" not in active:
                    active["switch_s"] = round(ts - t0, 4)
            done_now = [o.request_id for o in outs if o.finished and o.request_id not in finished]
            finished.update(done_now)
            bar.update(len(done_now))
            if not outs and not sched.has_unfinished():
                time.sleep(0.002)  # only a reconfiguration in flight: let its thread work
        else:
            if next_req >= len(reqs) and active is None:
                break
            waits = [0.05]
            if next_req < len(reqs):
                waits.append(reqs[next_req].arrival_s - now)
            if pending:
                d = _due(schedule[pending[0]], reqs, next_req)
                if d is not None:
                    waits.append(d - now)
            time.sleep(max(0.0, min(waits)))
        if progress and rec.steps % 16 == 0:
            status = active["handle"].status()["phase"] if active is not None else "-"
            bar.set_postfix_str(
                f"plan {engine.plan} | waiting {len(sched.waiting)} | reconfig {status}",
                refresh=False,
            )
        if on_tick is not None:
            on_tick(rec)
        if time.perf_counter() - t0 > max_duration_s:
            rec.timed_out = True
            for rid in submitted:
                engine.abort(rid)
            if active is not None:
                active["handle"].abort("benchmark time limit")
                while engine.reconfig is not None:
                    engine.step()
                _close(active, t0, rec)
                active = None
            break
    bar.close()
    if active is not None:
        _close(active, t0, rec)
    for idx in pending:
        left = schedule[idx]
        rec.skipped.append(
            {
                "index": idx,
                "mode": left.mode,
                "trigger": {"at_s": left.at_s}
                if left.at_s is not None
                else {"after_requests": left.after_requests},
                "reason": "the workload ended before this entry came due",
            }
        )
    rec.end_s = time.perf_counter() - t0
    rec.preemptions = sched.num_preemptions - preempt0
    rec.compiles = engine.cache.compiles - compiles0
    for rid in rec.request_ids:
        req = submitted.get(rid)
        if req is None:
            continue
        rec.metrics[rid] = req.metrics
        rec.outputs[rid] = len(req.output_ids)
        rec.finish_reasons[rid] = req.finish_reason
    return rec


def _due(entry: ReconfigEntry, reqs: list[WorkloadRequest], arrived: int) -> float | None:
    """When `entry` comes due (s from the start), or None while it cannot be known yet."""
    if entry.at_s is not None:
        return entry.at_s
    n = entry.after_requests
    assert n is not None
    if n <= len(reqs):
        return reqs[n - 1].arrival_s
    return None


def _close(info: dict[str, Any], t0: float, rec: RunRecord) -> None:
    handle = info.pop("handle")
    info["done_s"] = round(time.perf_counter() - t0, 4)
    rep = handle.report()
    info["report"] = _jsonable(rep.to_json())
    info["ok"] = bool(rep.ok)
    info["target"] = rep.target
    rec.reconfigs.append(info)


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, float | int | str | bool) or x is None:
        return x
    try:
        import numpy as np

        if isinstance(x, np.generic):
            return x.item()
    except ImportError:  # pragma: no cover
        pass
    return str(x)


# --------------------------------------------------------------------------------------------
# Warm-up


def _serve_staggered(
    engine: Engine,
    reqs: list[WorkloadRequest],
    w: Any,
    prefix: str,
    every: int = 2,
    on_step: Callable[[], None] | None = None,
) -> None:
    """Serves `reqs` as fast as the engine goes, one new request every `every` steps (so that
    prefills mix with decodes as in the measured run)."""
    i = 0
    step = 0
    while i < len(reqs) or engine.has_unfinished():
        if i < len(reqs) and step % every == 0:
            r = reqs[i]
            engine.add_request(
                list(r.prompt_token_ids), _params(r, w.temperature, w.ignore_eos, i), f"{prefix}{i}"
            )
            i += 1
        if on_step is not None:
            on_step()
        if not engine.step() and not engine.scheduler.has_unfinished():
            time.sleep(0.002)
        step += 1


def _workload(cfg: BenchConfig) -> WorkloadSection:
    if cfg.workload is None:
        raise ConfigError(f"{cfg.path}: a benchmark needs a [workload] table (kind = ...)")
    return cfg.workload


def rehearse(
    engine: Engine,
    cfg: BenchConfig,
    requests: list[WorkloadRequest],
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Replays the measured workload and schedule once, unmeasured, brings the engine back to
    the initial plan, and compiles every shape met for every stage met; returns what it did."""
    t0 = time.perf_counter()
    initial = engine.plan
    schedule = tuple(cfg.reconfig)
    log(f"rehearsal: {len(requests)} requests, {len(schedule)} reconfigurations (not measured)")
    rec = run_workload(
        engine,
        requests,
        schedule,
        temperature=_workload(cfg).temperature,
        ignore_eos=_workload(cfg).ignore_eos,
        seed=cfg.bench.seed,
        max_duration_s=cfg.bench.max_duration_s,
        progress=False,
        id_prefix="rehearsal-",
    )
    if engine.plan != initial:
        log(f"rehearsal: back to {initial}")
        h = engine.reconfigure(initial, mode="live")
        while not h.done():
            engine.step()
            time.sleep(0.002)
    t_fill = time.perf_counter()
    filled = engine.cache.compile_known()
    log(f"rehearsal: {filled} more compiles to cover every shape met on every stage met")
    # Which shapes a run meets also depends on timing: serve the measured run on the shapes
    # compiled now (padded to the smallest that holds a batch) instead of compiling new ones.
    engine.shapes_frozen = True
    return {
        "seconds": round(time.perf_counter() - t0, 2),
        # The run's compiles (a restarted engine's new cache carries the count on) and the fill.
        "compiles": rec.compiles + filled,
        "fill_compiles": filled,
        "fill_s": round(time.perf_counter() - t_fill, 2),
        "shapes_frozen": len(engine.cache.shapes()),
        "reconfigs_ok": sum(1 for r in rec.reconfigs if r.get("ok")),
        "refusals": len(rec.refusals),
    }


def warm_up(
    engine: Engine,
    cfg: BenchConfig,
    vocab_size: int,
    log: Callable[[str], None],
    requests: list[WorkloadRequest] | None = None,
) -> dict[str, Any]:
    """The warm-up and rehearsal of `[bench]` (see the module docstring); returns what they did."""
    b = cfg.bench
    info: dict[str, Any] = {"requests": b.warmup_requests, "reconfig": b.warmup_reconfig}
    if b.rehearsal and requests is not None:
        info["rehearsal"] = rehearse(engine, cfg, requests, log)
    if b.warmup_requests <= 0 and not b.warmup_reconfig:
        return info
    t0 = time.perf_counter()
    c0 = engine.cache.compiles
    pool = make_workload(
        _workload(cfg),
        seed=b.seed + 7919,
        vocab_size=vocab_size,
        max_model_len=cfg.scheduler.max_model_len,
    )
    n = max(b.warmup_requests, 1)
    stride = max(1, len(pool) // n)
    reqs = pool[::stride][:n]
    log(f"warm-up: {len(reqs)} requests on {engine.plan}")
    _serve_staggered(engine, reqs, _workload(cfg), "warm-a")
    if b.warmup_reconfig and cfg.reconfig:
        initial = engine.plan
        for k, entry in enumerate(cfg.reconfig):
            log(
                f"warm-up: reconfiguration {k} ({entry.mode}) to {entry.plan} with requests in flight"
            )
            box: dict[str, Any] = {}

            def start(entry: ReconfigEntry = entry, box: dict[str, Any] = box) -> None:
                if "h" not in box and engine.scheduler.running:
                    try:
                        box["h"] = _start_reconfig(engine, entry)
                    except PipeliveError as e:
                        box["h"] = None
                        box["error"] = str(e)

            _serve_staggered(engine, reqs, _workload(cfg), f"warm-{k}-", on_step=start)
            h = box.get("h")
            while h is not None and not h.done():
                engine.step()
                time.sleep(0.002)
            if h is None:
                log(f"warm-up: reconfiguration {k} not started: {box.get('error', 'no requests')}")
            elif h.report().ok:
                # the new plan at its final (grown) capacity
                _serve_staggered(engine, reqs, _workload(cfg), f"warm-{k}-after-")
        if engine.plan != initial:
            log(f"warm-up: back to {initial}")
            h = engine.reconfigure(initial, mode="live")
            while not h.done():
                engine.step()
                time.sleep(0.002)
    info["seconds"] = round(time.perf_counter() - t0, 2)
    info["compiles"] = engine.cache.compiles - c0
    return info


# --------------------------------------------------------------------------------------------
# A whole benchmark


def run_bench(
    cfg: BenchConfig,
    *,
    out_dir: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> tuple[dict[str, Any], str]:
    """Loads the model, builds the engine, warms up, runs the workload, writes the results.

    Returns (results, output directory). JAX must already have `cfg.num_devices` devices (the
    CLI calls `setup_devices` before importing anything that imports JAX).
    """
    w = _workload(cfg)
    import jax

    from pipelive_jax.bench.results import compute_results, write_results
    from pipelive_jax.models.registry import load_model
    from pipelive_jax.serving.engine import Engine

    say = log or (lambda m: None)
    if len(jax.devices()) < cfg.num_devices:
        raise PipeliveError(
            f"the config needs {cfg.num_devices} devices but JAX has {len(jax.devices())}; set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={cfg.num_devices} before JAX starts"
        )
    out = cfg.out_dir(out_dir)
    t_load = time.perf_counter()
    say(f"loading {cfg.model.name} ({cfg.model.dtype})")
    loaded = load_model(
        cfg.model.name, dtype=cfg.model.dtype, seed=cfg.model.seed, progress=progress
    )
    engine = Engine(loaded, cfg.plan.stages, **cfg.engine_options())
    load_s = time.perf_counter() - t_load
    vocab = loaded.config.vocab_size
    reqs = make_workload(
        w,
        seed=cfg.bench.seed,
        vocab_size=vocab,
        max_model_len=cfg.scheduler.max_model_len,
    )
    say(f"workload: {summarize(reqs)}")
    warm = warm_up(engine, cfg, vocab, say, reqs)
    say(f"measuring: {len(reqs)} requests, {len(cfg.reconfig)} scheduled reconfigurations")
    watch = _cpu_watch()
    with watch:
        rec = run_workload(
            engine,
            reqs,
            cfg.reconfig,
            temperature=w.temperature,
            ignore_eos=w.ignore_eos,
            seed=cfg.bench.seed,
            max_duration_s=cfg.bench.max_duration_s,
            progress=progress,
        )
    rec.warmup = warm
    results = compute_results(cfg, rec, engine=engine)
    results["load_s"] = round(load_s, 2)
    results["cpu_other_cores"] = getattr(watch, "other_cores", None)
    results["cpu_own_cores"] = getattr(watch, "own_cores", None)
    write_results(out, results)
    return results, out


def _cpu_watch() -> Any:
    """How much CPU other processes took during the measured run."""
    from pipelive_jax.bench.machine import CpuWatch

    return CpuWatch()

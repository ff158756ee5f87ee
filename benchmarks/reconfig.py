"""Reconfiguration pause and migration overhead on SmolLM2-135M: live vs stop_and_copy vs restart.

One engine per setting (n_req in-flight requests, context ~ctx tokens) is re-partitioned back and
forth between PLAN_A = [15, 15] (devices 0, 1) and PLAN_B = [8, 12, 10] (devices 0, 1, 2) while
its requests decode (greedy, EOS ignored). 8 host CPU devices are forced (XLA_FLAGS below).

Per setting (each in its own process, which loads the model; `--same-process` runs them all
in this one):
  1. prompts: n_req random-token prompts of P = ctx - room tokens, so that while decoding the
     context stays in [ctx - room, ctx] and every step has the same batch shape (the block-table
     bucket is ctx/16 pages). max_num_batched_tokens = n_req * ctx, so a whole prefill (and the
     recompute after a restart) is one step of one shape. When the room left is too small for the
     next repeat, every request is aborted and fresh prompts are prefilled (a "refresh").
  2. warm-up: one live round trip A -> B -> A with the compile thread waited for (no steps while
     it compiles), so every (stage, shape) of both plans and every copy route is compiled before
     timing.
  3. timed repeats, alternating the direction: `live` and `stop_and_copy` (`--repeats`), then
     `restart` (`--restart-repeats`; it drops the compile cache, so it comes last). Before a
     restart `jax.clear_caches()` is called too: a restarted server has no compiled code in
     JAX's in-process caches either (without it the "recompile" would hit them).

Measured per repeat: the controller's report (pause_ms, rounds, bytes, phase_ms, ...), and every
step around it, each with its wall time (engine.step(), which includes the reconfiguration work
done at that step boundary) and its compute time (step hook -> end of the stage compute). Steps
are classed by the controller phase seen by a step hook (the hook runs after before_step):
  steady     the K_PRE steps before reconfigure() and the K_POST steps after the
             reconfiguration is done (on the new plan; restart: after the recovery): no
             reconfiguration in flight. Both, because the machine's speed drifts over the seconds
             a reconfiguration takes (other tenants; the context grows by tens of tokens): the
             steps before alone put single repeats' ratios anywhere in 0.75-1.34. The ratio
             against the steps before only is reported too (`*_vs_before`). K_WARM unmeasured
             steps come first, right out of the quiet wait (in the run on 5e66c98 the 4 steps
             before were below the 4 after in 5 of 5 repeats at 32 x 256; whether the idle spell
             or drift did it, the first steps are not counted). Only steps with all n_req
             requests running are classed (a repeat that outran its decode room ended with
             empty steps);
  overlap    phase PREPARE: on a background thread, the moved weights are copied to their new
             devices and the incoming layers' pools allocated (paced, see the controller's
             STAGING_IDLE_RATIO) and the new plan is compiled (here: found in the cache), sharing
             the 2 CPU cores (reported separately from migration, with its own ratio);
  migration  phases STAGE_WEIGHTS, PRECOPY, PATCH, and (live) the final old-plan step, phase
             SWITCH, which dispatches the final patch: from the end of PREPARE up to the switch;
  switch     the step whose before_step did the switch (its wall includes the pause).
The "step-time ratio during migration" is, per repeat, median(migration) / median(steady) of that
repeat, for wall and for compute; the criterion takes the median over the repeats. A repeat is
compared with its own steady steps because the machine's speed differs between repeats by more
than the effect measured, and a slow spell also stretches the (time-paced) pre-copy over more
steps: pooling all repeats' steps (also reported, `ratio_migration_wall`) lets the slow repeats
weigh more on the migration side than on the steady side (K_PRE + K_POST steps each).
`observed_gap_ms` is end of the last old-plan compute -> start of the first new-plan compute as
seen from outside (includes work the controller does after it stops its pause clock).
For restart, `recovery_ms` is the end of the last old step -> every request in flight at the
switch has produced a token again (the pause, plus the recompute of all their KV). Above
`--restart-recompute-max-tokens` (n_req * ctx; default 8192, i.e. 32 x 1024 is skipped: its
recompute alone takes minutes on 2 cores) the requests are aborted right after the switch and
`recovery_est_ms` = pause + the measured prefill of the same prompts is reported instead.
Also reported, because it stalls serving outside pause_ms: the time of the reconfigure() call
itself (it runs between two steps, under the engine lock); and the slowest migration step and
the PRECOPY phase's length (the pre-copy is paced over many steps, PrecopyPacer).

Runtime: about 35 minutes on an idle 2-core machine (most of it the 32 x 1024 prefill and the
compiles); it waits (bounded) for other processes to go quiet before each setting and repeat
and records how many cores they used (`other_cores`).

Usage: .venv/bin/python benchmarks/reconfig.py [--quick] [--repeats 5] [--restart-repeats 1]
Writes benchmarks/results/reconfig.json (reconfig_quick.json with --quick) and a .png plot.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=2", "")
    + " --xla_force_host_platform_device_count=8"
).strip()

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax import monitoring  # noqa: E402

PLAN_A = [15, 15]
PLAN_B = [8, 12, 10]
MODES = ("live", "stop_and_copy", "restart")
K_WARM = 2  # unmeasured steps after the quiet wait, before the steady ones
K_PRE = 12  # steady steps measured before each reconfigure()
K_POST = 12  # steady steps measured after the reconfiguration is done (on the new plan)
MIGRATION_PHASES = ("STAGE_WEIGHTS", "PRECOPY", "PATCH", "SWITCH")

# ---------------------------------------------------------------- XLA compile events

_COMPILES: list[tuple[float, float]] = []  # (end time, seconds) of every XLA backend compile
_COMPILE_LOCK = threading.Lock()


def _on_event(event: str, duration: float, **_: Any) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
        with _COMPILE_LOCK:
            _COMPILES.append((time.perf_counter(), duration))


monitoring.register_event_duration_secs_listener(_on_event)


def _compiles_between(t0: float, t1: float) -> tuple[int, float]:
    with _COMPILE_LOCK:
        xs = [d for t, d in _COMPILES if t0 <= t <= t1]
    return len(xs), round(sum(xs), 3)


# ---------------------------------------------------------------- small stats helpers


def pct(xs: list[float], q: float) -> float | None:
    xs = [x for x in xs if x is not None]
    return round(float(np.percentile(xs, q)), 3) if xs else None


def med(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return round(statistics.median(xs), 3) if xs else None


def mean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return round(statistics.fmean(xs), 3) if xs else None


# ---------------------------------------------------------------- stepping with a record


class Stepper:
    """Runs engine.step() and records, per step, the phase a step hook saw and the timings."""

    def __init__(self, eng: Any) -> None:
        self.eng = eng
        self._cur: dict[str, Any] | None = None
        eng.step_hooks.append(self._hook)

    def _hook(self, eng: Any) -> None:
        ctl = eng.reconfig
        self._cur = {
            "t_hook": time.perf_counter(),
            "prev_end": eng.last_step_end,
            "phase": ctl.phase if ctl is not None else None,
            "stages": len(eng.executor.stages),
        }

    def step(self) -> dict[str, Any]:
        eng = self.eng
        ctl = eng.reconfig
        phase_before = ctl.phase if ctl is not None else None
        running = len(eng.scheduler.running)
        t0 = time.perf_counter()
        eng.step()
        t1 = time.perf_counter()
        cur = self._cur or {"t_hook": t0, "prev_end": None, "phase": None, "stages": None}
        self._cur = None
        ctl_after = eng.reconfig
        end = eng.last_step_end if eng.last_step_end is not None else t1
        n_c, s_c = _compiles_between(t0, t1)
        return {
            "phase_before": phase_before,
            "phase": cur["phase"],
            "phase_after": ctl_after.phase if ctl_after is not None else None,
            "stages": cur["stages"],
            "running_before": running,
            "wall_ms": round((t1 - t0) * 1e3, 3),
            "before_ms": round((cur["t_hook"] - t0) * 1e3, 3),
            "compute_ms": round((end - cur["t_hook"]) * 1e3, 3),
            "after_ms": round((t1 - end) * 1e3, 3),
            "gap_ms": round((cur["t_hook"] - cur["prev_end"]) * 1e3, 3)
            if cur["prev_end"] is not None
            else None,
            "xla_compiles": n_c,
            "xla_compile_s": s_c,
            "t0": t0,
            "t1": t1,
            "prev_end": cur["prev_end"],
        }


def min_context(eng: Any) -> int:
    return min((r.num_tokens for r in eng.scheduler.running), default=0)


def max_context(eng: Any) -> int:
    return max((r.num_tokens for r in eng.scheduler.running), default=0)


# ---------------------------------------------------------------- one setting


class Setting:
    def __init__(self, loaded: Any, n_req: int, ctx: int, room: int, max_model_len: int) -> None:
        from pipelive_jax.serving.engine import Engine

        self.loaded = loaded
        self.n_req = n_req
        self.ctx = ctx
        self.room = room
        self.prompt_len = ctx - room
        assert self.prompt_len > ctx // 2, "context must stay in one block-table bucket"
        num_pages = n_req * ctx // 16 + 64
        num_pages = -(-num_pages // 16) * 16
        self.options = dict(
            num_pages=num_pages,
            max_model_len=max_model_len,
            max_num_seqs=max(32, n_req),
            max_num_batched_tokens=n_req * ctx,
        )
        t0 = time.perf_counter()
        self.eng = Engine(loaded, PLAN_A, **self.options)
        self.build_s = time.perf_counter() - t0
        self.stepper = Stepper(self.eng)
        self.refreshes: list[dict[str, Any]] = []
        self.seed = 1000 * n_req + ctx
        self.plan_is_a = True

    def room_left(self) -> int:
        if len(self.eng.scheduler.running) < self.n_req or self.eng.scheduler.waiting:
            return 0
        return self.ctx - max_context(self.eng)

    def refresh(self, why: str) -> None:
        """Aborts every request and prefills fresh prompts (one step), then one decode step."""
        from pipelive_jax.serving.sampling import SamplingParams

        eng = self.eng
        for r in list(eng.scheduler.running) + list(eng.scheduler.waiting):
            eng.abort(r.request_id)
        self.seed += 1
        prompts = common.random_prompts(
            self.n_req, self.prompt_len, self.loaded.config.vocab_size, seed=self.seed
        )
        params = SamplingParams(max_tokens=self.room, ignore_eos=True)
        for p in prompts:
            eng.add_request(p, params)
        t0 = time.perf_counter()
        steps = [self.stepper.step()]
        while eng.scheduler.waiting or any(
            r.num_computed < r.num_tokens - 1 for r in eng.scheduler.running
        ):
            steps.append(self.stepper.step())
        steps.append(self.stepper.step())  # first decode step
        self.refreshes.append(
            {
                "why": why,
                "s": round(time.perf_counter() - t0, 2),
                "prefill_steps": len(steps) - 1,
                "prefill_ms": [s["wall_ms"] for s in steps[:-1]],
                # less the XLA compiles that ran inside those steps
                "prefill_net_ms": round(
                    sum(s["wall_ms"] - s["xla_compile_s"] * 1e3 for s in steps[:-1]), 3
                ),
                "xla_compiles": sum(s["xla_compiles"] for s in steps),
            }
        )
        common.log(
            f"  refresh ({why}): {len(steps) - 1} prefill step(s), {time.perf_counter() - t0:.1f} s, "
            f"{sum(s['xla_compiles'] for s in steps)} XLA compiles"
        )

    def ensure_room(self, need: int) -> None:
        left = self.room_left()
        if left < need:
            self.refresh(f"room {left} < {need}")

    def next_plan(self) -> list[int]:
        return PLAN_B if self.plan_is_a else PLAN_A

    def reconfigure_once(
        self, mode: str, *, wait_compile: bool = False, recompute: bool = True
    ) -> dict[str, Any]:
        """One reconfiguration to the other plan while the requests decode; returns its record.

        `recompute=False` (restart only): abort every request right after the switch instead of
        recomputing their KV, and estimate the recovery as pause + the fastest measured prefill
        of these requests' prompts (same batch shape; less XLA compile time inside it; the
        recompute would have up to `room` more tokens per request).
        """
        eng, st = self.eng, self.stepper
        abort_state = {"armed": mode == "restart" and not recompute, "done": False}

        def abort_after_switch(e: Any) -> None:
            ctl = e.reconfig
            if (
                abort_state["armed"]
                and not abort_state["done"]
                and (ctl is None or ctl.phase != "SWITCH")
            ):
                for r in list(e.scheduler.running) + list(e.scheduler.waiting):
                    e.abort(r.request_id)
                abort_state["done"] = True

        target = self.next_plan()
        source = PLAN_A if self.plan_is_a else PLAN_B
        ctx_at_start = (min_context(eng), max_context(eng))
        warm = [st.step() for _ in range(K_WARM)]
        steady = [st.step() for _ in range(K_PRE)]
        in_flight_ids = [r.request_id for r in eng.scheduler.running]
        restart_cache_clear_ms = None
        if mode == "restart":
            t0 = time.perf_counter()
            jax.clear_caches()
            restart_cache_clear_ms = round((time.perf_counter() - t0) * 1e3, 3)
        if abort_state["armed"]:
            eng.step_hooks.insert(0, abort_after_switch)
        t0 = time.perf_counter()
        handle = eng.reconfigure(target, mode=mode)
        call_ms = (time.perf_counter() - t0) * 1e3
        ctl = eng.reconfig
        waited_compile_s = 0.0
        if wait_compile and ctl is not None:
            t = getattr(ctl, "_compile_thread", None)
            tw = time.perf_counter()
            while t is not None and t.is_alive():
                time.sleep(0.05)
            waited_compile_s = time.perf_counter() - tw
        during: list[dict[str, Any]] = []
        switch_step: dict[str, Any] | None = None
        ctx_at_switch = None
        running_at_switch = None
        t_deadline = time.perf_counter() + 900
        while not handle.done():
            if eng.reconfig is not None and eng.reconfig.phase == "SWITCH":
                ctx_at_switch = (min_context(eng), max_context(eng))
                running_at_switch = len(eng.scheduler.running)
            s = st.step()
            if s["phase_before"] == "SWITCH" and s["phase"] != "SWITCH":
                switch_step = s
            else:
                # (live: the final old-plan step, phase SWITCH, dispatches the final patch
                # behind its compute; it counts as a migration step)
                during.append(s)
            if time.perf_counter() > t_deadline:
                raise RuntimeError(f"reconfiguration stuck in {handle.status()}")
        rep = handle.report()
        if abort_after_switch in eng.step_hooks:
            eng.step_hooks.remove(abort_after_switch)
        recovery_est_ms = None
        if abort_state["done"] and rep.pause_ms is not None and self.refreshes:
            prefill = min(r["prefill_net_ms"] for r in self.refreshes)
            recovery_est_ms = round(rep.pause_ms + prefill, 3)
        # Restart: wait until every request in flight before has produced a token again.
        recovery_ms = None
        post: list[dict[str, Any]] = []
        if mode == "restart" and rep.ok and switch_step is not None:
            reqs = [eng.requests[i] for i in in_flight_ids]
            t_old_end = switch_step["prev_end"]

            def recovered(r: Any) -> bool:
                tt = r.metrics.token_times
                return r.finished or bool(tt and tt[-1] > t_old_end)

            while not all(recovered(r) for r in reqs) and len(post) < 64:
                post.append(st.step())
            firsts = [
                min(t for t in r.metrics.token_times if t > t_old_end)
                for r in reqs
                if any(t > t_old_end for t in r.metrics.token_times)
            ]
            if firsts and t_old_end is not None:
                recovery_ms = round((max(firsts) - t_old_end) * 1e3, 3)
        after: list[dict[str, Any]] = []
        if not abort_state["done"]:
            after = [st.step() for _ in range(K_POST)]
        self.plan_is_a = not self.plan_is_a if rep.ok else self.plan_is_a
        full = self.n_req

        def classed(steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
            return [s for s in steps if s["running_before"] == full]

        unclassed = sum(s["running_before"] != full for s in steady + during + after)
        steps_all = warm + steady + during + ([switch_step] if switch_step else []) + post + after
        steady, after = classed(steady), classed(after)
        overlap = [s for s in classed(during) if s["phase"] == "PREPARE"]
        migration = [s for s in classed(during) if s["phase"] in MIGRATION_PHASES]
        # the step whose after_step left PREPARE (weights ready -> precopy done in its after_step)
        leave_prep = [
            s for s in during if s["phase"] == "PREPARE" and s["phase_after"] != "PREPARE"
        ]
        n_c, s_c = (0, 0.0)
        if switch_step is not None:
            n_c, s_c = switch_step["xla_compiles"], switch_step["xla_compile_s"]

        def strip(steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
            return [
                {k: v for k, v in s.items() if k not in ("t0", "t1", "prev_end")} for s in steps
            ]

        rec = {
            "mode": mode,
            "source": source,
            "target": target,
            "ok": rep.ok,
            "reason": rep.reason,
            "pause_ms": None if rep.pause_ms is None else round(rep.pause_ms, 3),
            "observed_gap_ms": switch_step["gap_ms"] if switch_step else None,
            "switch_step_wall_ms": switch_step["wall_ms"] if switch_step else None,
            "switch_step_xla_compiles": n_c,
            "switch_step_xla_compile_s": s_c,
            "recovery_ms": recovery_ms,
            "recovery_est_ms": recovery_est_ms,
            "recompute_skipped": abort_state["done"],
            "reconfigure_call_ms": round(call_ms, 3),
            "waited_compile_s": round(waited_compile_s, 3),
            "restart_clear_caches_ms": restart_cache_clear_ms,
            "running_at_switch": running_at_switch,
            "n_req": self.n_req,
            "in_flight_at_switch": running_at_switch == self.n_req,
            "context_at_start": ctx_at_start,
            "context_at_switch": ctx_at_switch,
            "report": rep.to_json() | {"error_traceback": None},
            "steady_wall_ms": [s["wall_ms"] for s in steady],
            "steady_compute_ms": [s["compute_ms"] for s in steady],
            "overlap_wall_ms": [s["wall_ms"] for s in overlap],
            "overlap_compute_ms": [s["compute_ms"] for s in overlap],
            "migration_wall_ms": [s["wall_ms"] for s in migration],
            "migration_compute_ms": [s["compute_ms"] for s in migration],
            "leave_prepare_after_ms": [s["after_ms"] for s in leave_prep],
            "post_wall_ms": [s["wall_ms"] for s in post],
            "after_wall_ms": [s["wall_ms"] for s in after],
            "after_compute_ms": [s["compute_ms"] for s in after],
            "unclassed_steps": unclassed,
            "steps": strip(steps_all),
            "total_steps": len(steps_all),
        }
        return rec


def summarize(recs: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in recs if r["ok"]]
    pauses = [r["pause_ms"] for r in ok]
    out: dict[str, Any] = {
        "repeats": len(recs),
        "ok": len(ok),
        "pause_ms_all": pauses,
        "pause_ms_p50": pct(pauses, 50),
        "pause_ms_p99": pct(pauses, 99),
        "pause_ms_max": max(pauses) if pauses else None,
        "observed_gap_ms_all": [r["observed_gap_ms"] for r in ok],
        "observed_gap_ms_p50": pct([r["observed_gap_ms"] for r in ok], 50),
        "switch_step_wall_ms_all": [r["switch_step_wall_ms"] for r in ok],
        "reconfigure_call_ms_all": [r["reconfigure_call_ms"] for r in recs],
        "rounds_all": [r["report"]["rounds"] for r in ok],
        "forced_stop_and_copy_all": [r["report"]["forced_stop_and_copy"] for r in ok],
        "compiled_in_pause_all": [r["report"]["compiled_in_pause"] for r in ok],
        "switch_step_xla_compiles_all": [r["switch_step_xla_compiles"] for r in ok],
        "bytes_kv_final_all": [r["report"]["bytes_kv_final"] for r in ok],
        "bytes_kv_precopy_all": [r["report"]["bytes_kv_precopy"] for r in ok],
        "bytes_kv_patched_all": [r["report"]["bytes_kv_patched"] for r in ok],
        "bytes_weights": ok[0]["report"]["bytes_weights"] if ok else None,
        "in_flight_at_switch_all": [r["in_flight_at_switch"] for r in recs],
        "context_at_switch_all": [r["context_at_switch"] for r in recs],
        "recovery_ms_all": [r["recovery_ms"] for r in ok],
        "recovery_est_ms_all": [r["recovery_est_ms"] for r in ok],
        "recomputed_tokens_all": [r["report"]["recomputed_tokens"] for r in ok],
        # the pre-copy is paced over many steps: its phase's length, not a stall
        "precopy_phase_ms_all": [r["report"]["phase_ms"].get("PRECOPY") for r in ok],
        "precopy_phase_ms_p50": pct([r["report"]["phase_ms"].get("PRECOPY") for r in ok], 50),
        "reconfigure_call_ms_p50": pct([r["reconfigure_call_ms"] for r in recs], 50),
        "prepare_ms_all": [r["report"]["phase_ms"].get("PREPARE") for r in ok],
        "other_cores_all": [r.get("other_cores") for r in recs],
    }
    before_w = [x for r in ok for x in r["steady_wall_ms"]]
    before_c = [x for r in ok for x in r["steady_compute_ms"]]
    after_w = [x for r in ok for x in r["after_wall_ms"]]
    steady_w = before_w + after_w
    steady_c = before_c + [x for r in ok for x in r["after_compute_ms"]]
    mig_w = [x for r in ok for x in r["migration_wall_ms"]]
    mig_c = [x for r in ok for x in r["migration_compute_ms"]]
    ov_w = [x for r in ok for x in r["overlap_wall_ms"]]
    ov_c = [x for r in ok for x in r["overlap_compute_ms"]]
    out["steps"] = {
        "steady_wall_ms_median": med(steady_w),
        "steady_compute_ms_median": med(steady_c),
        "migration_steps": len(mig_w),
        "migration_wall_ms_median": med(mig_w),
        "migration_wall_ms_mean": mean(mig_w),
        "migration_compute_ms_median": med(mig_c),
        "overlap_steps": len(ov_w),
        "overlap_wall_ms_median": med(ov_w),
        "overlap_compute_ms_median": med(ov_c),
        "ratio_migration_wall": common.ratio(med(mig_w), med(steady_w)),
        "ratio_migration_wall_mean": common.ratio(mean(mig_w), mean(steady_w)),
        "ratio_migration_compute": common.ratio(med(mig_c), med(steady_c)),
        "steady_before_wall_ms_median": med(before_w),
        "steady_after_wall_ms_median": med(after_w),
        "ratio_migration_wall_vs_before": common.ratio(med(mig_w), med(before_w)),
        "ratio_migration_compute_vs_before": common.ratio(med(mig_c), med(before_c)),
        "ratio_overlap_wall": common.ratio(med(ov_w), med(steady_w)),
        "ratio_overlap_compute": common.ratio(med(ov_c), med(steady_c)),
        "leave_prepare_after_ms_all": [x for r in ok for x in r["leave_prepare_after_ms"]],
        "steady_wall_ms_max": max(steady_w) if steady_w else None,
        "migration_wall_ms_max": max(mig_w) if mig_w else None,
        "ratio_migration_wall_max_over_steady_median": common.ratio(
            max(mig_w) if mig_w else None, med(steady_w)
        ),
    }
    per_w = [
        common.ratio(med(r["migration_wall_ms"]), med(r["steady_wall_ms"] + r["after_wall_ms"]))
        for r in ok
    ]
    per_c = [
        common.ratio(
            med(r["migration_compute_ms"]), med(r["steady_compute_ms"] + r["after_compute_ms"])
        )
        for r in ok
    ]
    out["steps"] |= {
        "ratio_per_repeat_wall": per_w,
        "ratio_per_repeat_compute": per_c,
        "ratio_migration_wall_repeats_median": med([x for x in per_w if x is not None]),
        "ratio_migration_compute_repeats_median": med([x for x in per_c if x is not None]),
    }
    return out


def run_setting(
    loaded: Any,
    n_req: int,
    ctx: int,
    args: argparse.Namespace,
) -> dict[str, Any]:
    room = args.room_256 if ctx <= 256 else args.room_1024
    wq = common.wait_for_quiet(args.quiet_wait)
    watch = common.CpuWatch()
    watch.__enter__()
    s = Setting(loaded, n_req, ctx, room, args.max_model_len)
    common.log(f"setting n_req={n_req} ctx={ctx}: prompts {s.prompt_len} tokens, {s.options}")
    t0 = time.perf_counter()
    s.refresh("initial")
    initial_s = time.perf_counter() - t0
    # warm-up: a live round trip with the compile waited for
    t0 = time.perf_counter()
    warm = []
    for _ in range(2):
        s.ensure_room(12)
        r = s.reconfigure_once("live", wait_compile=True)
        warm.append(
            {
                k: r[k]
                for k in ("source", "target", "ok", "pause_ms", "waited_compile_s", "total_steps")
            }
            | {"prepare_ms": r["report"]["phase_ms"].get("PREPARE")}
        )
        if not r["ok"]:
            raise RuntimeError(f"warm-up reconfiguration failed: {r['reason']}")
    warm_s = time.perf_counter() - t0
    common.log(f"  warm-up: {warm_s:.1f} s {warm}")
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
    # Steps of decode room a repeat needs: a live one spends ~45-60 steps in PREPARE at 8 x 256
    # (the paced weight and pool staging), so there every live repeat starts on fresh prompts.
    pre = K_WARM + K_PRE
    need = {
        "live": 90 + pre + K_POST,
        "stop_and_copy": 14 + pre + K_POST,
        "restart": pre + K_POST + 2,
    }
    reps = {"live": args.repeats, "stop_and_copy": args.repeats, "restart": args.restart_repeats}
    for mode in MODES:
        for i in range(reps[mode]):
            s.ensure_room(need[mode])
            rq = common.wait_for_quiet(args.repeat_quiet_wait, window_s=0.5)
            with common.CpuWatch() as w:
                r = s.reconfigure_once(
                    mode, recompute=n_req * ctx <= args.restart_recompute_max_tokens
                )
            r["other_cores"] = w.other_cores
            r["quiet_wait"] = rq
            r["wall_s"] = round(w.wall, 2)
            runs[mode].append(r)
            need[mode] = max(need[mode], r["total_steps"] + 4)
            common.log(
                f"  {mode} #{i} {r['source']}->{r['target']}: pause {r['pause_ms']} ms "
                f"(gap {r['observed_gap_ms']}), rounds {r['report']['rounds']}, "
                f"forced {r['report']['forced_stop_and_copy']}, steady "
                f"{med(r['steady_wall_ms'])} ms, overlap {len(r['overlap_wall_ms'])} steps "
                f"{med(r['overlap_wall_ms'])} ms, migration {len(r['migration_wall_ms'])} steps "
                f"{med(r['migration_wall_ms'])} ms, call {r['reconfigure_call_ms']:.0f} ms, "
                f"ctx {r['context_at_switch']}, in flight {r['running_at_switch']}/{n_req}, "
                f"recovery {r['recovery_ms']}, other cores {w.other_cores}, {w.wall:.1f} s"
                + ("" if r["ok"] else f" FAILED: {r['reason']}")
            )
    watch.__exit__(None, None, None)
    out = {
        "n_req": n_req,
        "ctx": ctx,
        "prompt_len": s.prompt_len,
        "room": room,
        "engine_options": s.options,
        "engine_build_s": round(s.build_s, 2),
        "initial_prefill_s": round(initial_s, 2),
        "warmup_s": round(warm_s, 2),
        "warmup": warm,
        "refreshes": s.refreshes,
        "quiet_wait": wq,
        "other_cores": watch.other_cores,
        "own_cores": watch.own_cores,
        "wall_s": round(watch.wall, 1),
        "modes": {m: {"summary": summarize(runs[m]), "runs": runs[m]} for m in MODES},
    }
    # free the engine's arrays before the next setting
    del s
    import gc

    gc.collect()
    return out


# ---------------------------------------------------------------- targets, table, plot


def targets(results: dict[str, Any]) -> dict[str, Any]:
    sets = results["settings"]
    t: dict[str, Any] = {}

    def p50(key: str, mode: str) -> float | None:
        return sets[key]["modes"][mode]["summary"]["pause_ms_p50"]

    live = {k: p50(k, "live") for k in sets}
    t["live_pause_p50_under_5ms"] = {
        "per_setting": live,
        "met": all(v is not None and v < 5.0 for v in live.values()),
    }
    flat = {}
    for n in sorted({v["n_req"] for v in sets.values()}):
        a, b = f"n{n}_ctx256", f"n{n}_ctx1024"
        if a in sets and b in sets:
            flat[f"n{n}"] = common.ratio(live[b], live[a])
    t["live_pause_flat_in_context"] = {
        "criterion": "p50(ctx 1024) / p50(ctx 256) <= 1.5 for each n_req",
        "ratio_1024_over_256": flat,
        "met": bool(flat) and all(v is not None and v <= 1.5 for v in flat.values()),
    }
    sc = {}
    rs = {}
    for k in sets:
        sc[k] = common.ratio(p50(k, "stop_and_copy"), live[k])
        rs[k] = common.ratio(p50(k, "restart"), live[k])
    sc1024 = {k: v for k, v in sc.items() if k.endswith("ctx1024")}
    t["stop_and_copy_10x_live_at_1024"] = {
        "ratio_p50_all": sc,
        "met": bool(sc1024) and all(v is not None and v >= 10 for v in sc1024.values()),
    }
    t["restart_100x_live"] = {
        "ratio_p50": rs,
        "met": all(v is not None and v >= 100 for v in rs.values()),
    }

    def steps(k: str, key: str) -> Any:
        return sets[k]["modes"]["live"]["summary"]["steps"][key]

    mig = {k: steps(k, "ratio_migration_wall_repeats_median") for k in sets}
    migc = {k: steps(k, "ratio_migration_compute_repeats_median") for k in sets}
    pooled = {k: steps(k, "ratio_migration_wall") for k in sets}
    t["migration_steps_at_most_10pct_slower"] = {
        "criterion": "per repeat, median wall of live-mode steps in STAGE_WEIGHTS/PRECOPY/PATCH "
        "(and the final old-plan step) over the median wall of that repeat's steady steps (before "
        "reconfigure() and after done); the median of these ratios over the repeats <= 1.10",
        "ratio_wall": mig,
        "ratio_compute": migc,
        "ratio_wall_pooled": pooled,
        "met": all(v is not None and v <= 1.10 for v in mig.values()),
        "met_compute_only": all(v is not None and v <= 1.10 for v in migc.values()),
        "met_pooled": all(v is not None and v <= 1.10 for v in pooled.values()),
    }
    return t


def rec_cell(sm: dict[str, Any]) -> str:
    m = med(sm["recovery_ms_all"])
    if m is not None:
        return str(m)
    e = med(sm.get("recovery_est_ms_all", []))
    return f"~{e} (est.)" if e is not None else "-"


def table(results: dict[str, Any]) -> str:
    rows = [
        "| setting | mode | pause p50 ms | pause p99 ms | n | rounds | forced | steady ms | "
        "migration ms (n) | ratio wall (pooled) | ratio compute | max migr. step ms | "
        "precopy phase ms | "
        "reconfigure() call ms | overlap ms (n) | ratio overlap | recovery ms |"
    ]
    rows.append("|" + "---|" * 17)
    for k, v in results["settings"].items():
        for m in MODES:
            sm = v["modes"][m]["summary"]
            st = sm["steps"]
            rows.append(
                f"| {k} | {m} | {sm['pause_ms_p50']} | {sm['pause_ms_p99']} | {sm['ok']} | "
                f"{sm['rounds_all']} | {sum(bool(x) for x in sm['forced_stop_and_copy_all'])} | "
                f"{st['steady_wall_ms_median']} | {st['migration_wall_ms_median']} "
                f"({st['migration_steps']}) | {st['ratio_migration_wall_repeats_median']} "
                f"({st['ratio_migration_wall']}) | "
                f"{st['ratio_migration_compute_repeats_median']} | {st['migration_wall_ms_max']} | "
                f"{sm['precopy_phase_ms_p50']} | {sm['reconfigure_call_ms_p50']} | "
                f"{st['overlap_wall_ms_median']} ({st['overlap_steps']}) | "
                f"{st['ratio_overlap_wall']} | {rec_cell(sm)} |"
            )
    return "\n".join(rows)


def plot(results: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = results["settings"]
    keys = list(sets)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    width = 0.26
    colors = {"live": "tab:green", "stop_and_copy": "tab:orange", "restart": "tab:red"}
    x = np.arange(len(keys))
    for i, m in enumerate(MODES):
        p50 = [sets[k]["modes"][m]["summary"]["pause_ms_p50"] or np.nan for k in keys]
        p99 = [sets[k]["modes"][m]["summary"]["pause_ms_p99"] or np.nan for k in keys]
        xs = x + (i - 1) * width
        ax1.bar(xs, p50, width, label=f"{m} p50", color=colors[m])
        ax1.scatter(xs, p99, marker="_", s=200, color="k", zorder=3)
        for xi, k in zip(xs, keys, strict=True):
            raw = [p for p in sets[k]["modes"][m]["summary"]["pause_ms_all"] if p]
            ax1.scatter([xi] * len(raw), raw, s=8, color="k", alpha=0.5, zorder=4)
    ax1.axhline(5.0, color="tab:green", ls="--", lw=1, label="5 ms target (live)")
    ax1.set_yscale("log")
    ax1.set_xticks(x, [k.replace("_", "\n") for k in keys])
    ax1.set_ylabel("pause (ms, log)")
    ax1.set_title("Reconfiguration pause [15,15] <-> [8,12,10]\n(bar p50, dash p99, dots raw)")
    ax1.legend(fontsize=8)
    series = [
        ("ratio_migration_wall_repeats_median", "migration / steady (wall)", "tab:blue"),
        ("ratio_migration_compute_repeats_median", "migration / steady (compute)", "tab:cyan"),
        (
            "ratio_migration_wall_max_over_steady_median",
            "max migration step / steady",
            "tab:purple",
        ),
        ("ratio_overlap_wall", "compile overlap / steady (wall)", "tab:gray"),
    ]
    width2 = 0.8 / len(series)
    for i, (key, label, c) in enumerate(series):
        vals = [sets[k]["modes"]["live"]["summary"]["steps"].get(key) or np.nan for k in keys]
        ax2.bar(x + (i - (len(series) - 1) / 2) * width2, vals, width2, label=label, color=c)
    ax2.axhline(1.10, color="k", ls="--", lw=1, label="1.10 target")
    ax2.axhline(1.0, color="k", lw=0.5)
    ax2.set_xticks(x, [k.replace("_", "\n") for k in keys])
    ax2.set_yscale("log")
    ax2.set_ylabel("step time ratio (log)")
    ax2.set_title(
        "Live mode: decode step time during reconfiguration\n"
        "(migration / steady: median over repeats of each repeat's ratio)"
    )
    ax2.legend(fontsize=8)
    fig.suptitle(f"SmolLM2-135M, {results.get('device_note', '')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------- main


def setting_here(n_req: int, ctx: int, args: argparse.Namespace) -> tuple[float, dict[str, Any]]:
    """(model load seconds, run_setting's record), in this process."""
    from pipelive_jax.models.registry import load_model

    t0 = time.perf_counter()
    loaded = load_model("smollm2-135m")
    load_s = round(time.perf_counter() - t0, 2)
    return load_s, run_setting(loaded, n_req, ctx, args)


def setting_in_child(
    n_req: int, ctx: int, args: argparse.Namespace
) -> tuple[float, dict[str, Any]]:
    """One setting in a fresh process, as a server is started for its configuration: a run
    in one long process measured the later settings' pauses ~0.2 ms longer than the same
    settings alone (the process carried the earlier settings' heap and caches), which read as a
    dependence on context that a setting run alone does not show."""
    import json
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        part = os.path.join(tmp, "part.json")
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            f"--settings={n_req}x{ctx}",
            f"--repeats={args.repeats}",
            f"--restart-repeats={args.restart_repeats}",
            f"--room-256={args.room_256}",
            f"--room-1024={args.room_1024}",
            f"--max-model-len={args.max_model_len}",
            f"--quiet-wait={args.quiet_wait}",
            f"--repeat-quiet-wait={args.repeat_quiet_wait}",
            f"--restart-recompute-max-tokens={args.restart_recompute_max_tokens}",
            f"--part-out={part}",
        ]
        subprocess.run(cmd, check=True)
        with open(part) as f:
            got = json.load(f)
    key = f"n{n_req}_ctx{ctx}"
    return got["load_s"][key], got["settings"][key]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="8 requests, 256 ctx, 2 repeats")
    ap.add_argument("--settings", default=None, help="e.g. 8x256,32x1024")
    ap.add_argument("--repeats", type=int, default=None, help="live / stop_and_copy repeats")
    ap.add_argument("--restart-repeats", type=int, default=None)
    ap.add_argument("--room-256", type=int, default=124, help="decode room at ctx 256")
    ap.add_argument("--room-1024", type=int, default=192, help="decode room at ctx 1024")
    ap.add_argument("--max-model-len", type=int, default=1024 + 64)
    ap.add_argument("--quiet-wait", type=float, default=20.0, help="per setting")
    ap.add_argument("--repeat-quiet-wait", type=float, default=3.0, help="per repeat")
    ap.add_argument(
        "--restart-recompute-max-tokens",
        type=int,
        default=8192,
        help="above n_req*ctx tokens a restart's KV recompute is skipped (estimated instead)",
    )
    ap.add_argument("--name", default=None)
    ap.add_argument(
        "--same-process",
        action="store_true",
        help="run every setting in this process (default: each setting in its own process)",
    )
    ap.add_argument("--part-out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--plot-only", action="store_true", help="redraw the PNG from the JSON")
    args = ap.parse_args()
    if args.plot_only:
        import json

        name = args.name or ("reconfig_quick" if args.quick else "reconfig")
        with open(os.path.join(common.RESULTS_DIR, f"{name}.json")) as f:
            doc = json.load(f)
        plot(doc["results"], os.path.join(common.RESULTS_DIR, f"{name}.png"))
        return
    if args.settings:
        settings = [tuple(int(x) for x in s.split("x")) for s in args.settings.split(",")]
    elif args.quick:
        settings = [(8, 256)]
    else:
        settings = [(8, 256), (32, 256), (8, 1024), (32, 1024)]
    if args.repeats is None:
        args.repeats = 2 if args.quick else 5
    if args.restart_repeats is None:
        args.restart_repeats = 1
    name = args.name or ("reconfig_quick" if args.quick else "reconfig")

    t_all = time.perf_counter()
    common.log(f"jax devices: {len(jax.devices())} x {jax.devices()[0].platform}")
    results: dict[str, Any] = {"load_s": {}, "settings": {}}
    for n_req, ctx in settings:
        key = f"n{n_req}_ctx{ctx}"
        if args.same_process or len(settings) == 1:
            results["load_s"][key], results["settings"][key] = setting_here(n_req, ctx, args)
        else:
            results["load_s"][key], results["settings"][key] = setting_in_child(n_req, ctx, args)
        common.log(f"{key} done in {results['settings'][key]['wall_s']} s")
    if args.part_out:
        import json

        with open(args.part_out, "w") as f:
            json.dump(results, f)
        return
    results["targets"] = targets(results)
    results["total_s"] = round(time.perf_counter() - t_all, 1)
    results["device_note"] = (
        f"{len(jax.devices())} forced host CPU devices on {os.cpu_count()} cores"
    )
    results["table_md"] = table(results)
    config = {
        "model": "smollm2-135m",
        "dtype": "float32",
        "plans": {"A": PLAN_A, "B": PLAN_B},
        "settings": [f"n{n}_ctx{c}" for n, c in settings],
        "repeats": {
            "live": args.repeats,
            "stop_and_copy": args.repeats,
            "restart": args.restart_repeats,
        },
        "reconfigure_kwargs": {"pause_budget_ms": 10.0, "max_rounds": 8},
        "k_warm_unmeasured_steps": K_WARM,
        "k_pre_steady_steps": K_PRE,
        "k_post_steps": K_POST,
        "room": {"256": args.room_256, "1024": args.room_1024},
        "max_model_len": args.max_model_len,
        "prompts": "random token ids in [3, vocab), numpy default_rng, length ctx - room",
        "sampling": "greedy, ignore_eos, max_tokens = room",
        "restart_clears_jax_caches": True,
        "restart_recompute_max_tokens": args.restart_recompute_max_tokens,
        "xla_flags": os.environ.get("XLA_FLAGS"),
        "quick": args.quick,
        "step_classes": {
            "steady": f"{K_PRE} steps before reconfigure() + {K_POST} after it is done",
            "overlap": "hook phase PREPARE (paced weight/pool staging and compile in the background)",
            "migration": "hook phase in STAGE_WEIGHTS/PRECOPY/PATCH, or SWITCH before the switch (live: the final old-plan step)",
        },
    }
    path = common.write_results(name, config, results)
    png = os.path.join(common.RESULTS_DIR, f"{name}.png")
    plot(results, png)
    common.log(f"wrote {path} and {png} in {results['total_s']} s")
    print(results["table_md"])
    for k, v in results["targets"].items():
        print(k, "MET" if v["met"] else "NOT MET", {kk: vv for kk, vv in v.items() if kk != "met"})


if __name__ == "__main__":
    main()

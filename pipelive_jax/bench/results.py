"""Benchmark results: metrics in vLLM's `benchmark_serving` vocabulary, JSON, plots, comparison.

`results.json` holds, at the top level, the metrics under the names vLLM's benchmark uses
(`mean_ttft_ms`, `median_ttft_ms`, `p99_ttft_ms`, `mean_tpot_ms`, `mean_itl_ms`, `mean_e2e_ms`,
`request_throughput`, `output_throughput`, `total_token_throughput`, `goodput`, `completed`, ...)
and, beside them, what this benchmark adds: preemptions, every reconfiguration's report,
refusals, a timeline, per-phase metrics, and `metadata` (versions, git commit, machine, the config
as parsed, its text and its sha256).

Definitions (all per completed request, times from its scheduled arrival):
- TTFT: first token - arrival. E2E: last token (finish) - arrival.
- TPOT: (last token - first token) / (output tokens - 1), requests with >= 2 output tokens.
- ITL: every gap between consecutive tokens of a request (all requests pooled).
- throughputs: per second of the run's duration (first arrival to last completion).
- goodput: requests per second that met every SLO given (`slo_ttft_ms`, `slo_tpot_ms`; a request
  with one output token has no TPOT and meets that SLO); None when no SLO is set.

Plots (matplotlib, Agg): `latency_cdf.png`, `timeline.png` (output tokens/s and queue length
per interval, reconfigurations marked), `reconfig_pause.png` (pause per reconfiguration by mode).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from pipelive_jax.errors import PipeliveError

if TYPE_CHECKING:
    from pipelive_jax.bench.runner import RunRecord
    from pipelive_jax.config import BenchConfig

__all__ = ["compare", "compute_results", "load_results", "plot_results", "write_results"]

PERCENTILES = (50, 90, 99)


def _stats(name: str, values_s: Sequence[float]) -> dict[str, float | None]:
    """mean/median/std/pXX of `values_s` (seconds) as `{stat}_{name}_ms`."""
    out: dict[str, float | None] = {}
    v = np.asarray(values_s, dtype=float) * 1e3
    keys = ["mean", "median", "std"] + [f"p{p}" for p in PERCENTILES]
    if v.size == 0:
        return {f"{k}_{name}_ms": None for k in keys}
    out[f"mean_{name}_ms"] = float(np.mean(v))
    out[f"median_{name}_ms"] = float(np.median(v))
    out[f"std_{name}_ms"] = float(np.std(v))
    for p in PERCENTILES:
        out[f"p{p}_{name}_ms"] = float(np.percentile(v, p))
    return out


def _versions() -> dict[str, Any]:
    from importlib import metadata

    out: dict[str, Any] = {"python": sys.version.split()[0]}
    for name in ("pipelive-jax", "jax", "jaxlib", "flax", "numpy", "matplotlib"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    try:
        import jax

        out["jax_backend"] = jax.default_backend()
        out["jax_devices"] = [str(d) for d in jax.devices()]
    except Exception:  # noqa: BLE001 - metadata only
        pass
    out["xla_flags"] = os.environ.get("XLA_FLAGS")
    return out


def _machine_and_git() -> tuple[dict[str, Any], dict[str, Any]]:
    from pipelive_jax.bench.machine import git_commit, machine_info

    return machine_info(), git_commit()


def compute_results(cfg: BenchConfig, rec: RunRecord, *, engine: Any = None) -> dict[str, Any]:
    """The results document of one run (see the module docstring)."""
    from pipelive_jax.bench.workload import summarize

    t0 = rec.t0
    ttft, tpot, itl, e2e, queue = [], [], [], [], []
    in_lens, out_lens, good = [], [], []
    per_request = []
    last_finish = 0.0
    for rid, r in zip(rec.request_ids, rec.requests, strict=True):
        m = rec.metrics.get(rid)
        n_out = rec.outputs.get(rid, 0)
        reason = rec.finish_reasons.get(rid)
        row: dict[str, Any] = {
            "id": rid,
            "arrival_s": round(r.arrival_s, 4),
            "input_tokens": len(r.prompt_token_ids),
            "output_tokens": n_out,
            "finish_reason": reason,
            "phase": r.phase,
        }
        if (
            m is not None
            and m.finished_time is not None
            and m.first_token_time is not None
            and reason in ("length", "stop")
        ):
            t_arr = t0 + r.arrival_s
            a = m.first_token_time - t_arr
            e = m.finished_time - t_arr
            p = (m.token_times[-1] - m.token_times[0]) / (n_out - 1) if n_out > 1 else None
            gaps = list(np.diff(m.token_times)) if len(m.token_times) > 1 else []
            ttft.append(a)
            e2e.append(e)
            if p is not None:
                tpot.append(p)
            itl.extend(gaps)
            if m.first_scheduled_time is not None:
                queue.append(max(0.0, m.first_scheduled_time - t_arr))
            in_lens.append(len(r.prompt_token_ids))
            out_lens.append(n_out)
            last_finish = max(last_finish, m.finished_time - t0)
            slo_ok = (cfg.bench.slo_ttft_ms is None or a * 1e3 <= cfg.bench.slo_ttft_ms) and (
                cfg.bench.slo_tpot_ms is None or p is None or p * 1e3 <= cfg.bench.slo_tpot_ms
            )
            good.append(slo_ok)
            row.update(
                ttft_ms=round(a * 1e3, 3),
                tpot_ms=round(p * 1e3, 3) if p is not None else None,
                e2e_ms=round(e * 1e3, 3),
                preemptions=m.preemptions,
                slo_ok=slo_ok,
            )
        per_request.append(row)
    first_arrival = min((r.arrival_s for r in rec.requests), default=0.0)
    duration = max(last_finish - first_arrival, 1e-9) if ttft else 0.0
    completed = len(ttft)
    total_in, total_out = int(sum(in_lens)), int(sum(out_lens))
    has_slo = cfg.bench.slo_ttft_ms is not None or cfg.bench.slo_tpot_ms is not None
    res: dict[str, Any] = {
        "name": cfg.name,
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "num_requests": len(rec.requests),
        "completed": completed,
        "failed": len(rec.requests) - completed,
        "duration": duration,
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": completed / duration if completed else 0.0,
        "output_throughput": total_out / duration if completed else 0.0,
        "total_token_throughput": (total_in + total_out) / duration if completed else 0.0,
        "goodput": (sum(good) / duration if completed else 0.0) if has_slo else None,
        "goodput_fraction": (sum(good) / len(rec.requests) if rec.requests else None)
        if has_slo
        else None,
        "slo_ttft_ms": cfg.bench.slo_ttft_ms,
        "slo_tpot_ms": cfg.bench.slo_tpot_ms,
    }
    for name, vals in (
        ("ttft", ttft),
        ("tpot", tpot),
        ("itl", itl),
        ("e2e", e2e),
        ("queue", queue),
    ):
        res.update(_stats(name, vals))
    res.update(
        {
            "preemptions": rec.preemptions,
            "num_reconfigs": len(rec.reconfigs),
            "num_reconfigs_ok": sum(1 for r in rec.reconfigs if r.get("ok")),
            "num_refusals": len(rec.refusals),
            "num_skipped_reconfigs": len(rec.skipped),
            "max_pause_ms": max(
                (
                    r["report"]["pause_ms"]
                    for r in rec.reconfigs
                    if r["report"].get("pause_ms") is not None
                ),
                default=None,
            ),
            "total_pause_ms": sum(
                r["report"]["pause_ms"] or 0.0 for r in rec.reconfigs if r.get("report")
            ),
            "steps": rec.steps,
            "max_step_ms": round(rec.step_ms_max, 2),
            "long_steps": [list(x) for x in rec.long_steps],
            "compiles_during_run": rec.compiles,
            "timed_out": rec.timed_out,
            "run_s": round(rec.end_s, 3),
            "warmup": rec.warmup,
            "plans": [list(p) for p in rec.plans],
            "reconfigurations": rec.reconfigs,
            "refusals": rec.refusals,
            "skipped_reconfigs": rec.skipped,
            "workload": summarize(rec.requests),
            "per_phase": _per_phase(cfg, per_request),
            "timeline": _timeline(rec, cfg.bench.timeline_interval_s),
            "ttfts": [round(x, 6) for x in ttft],
            "tpots": [round(x, 6) for x in tpot],
            "itls": [round(float(x), 6) for x in itl],
            "e2els": [round(x, 6) for x in e2e],
            "input_lens": in_lens,
            "output_lens": out_lens,
            "per_request": per_request,
        }
    )
    if engine is not None:
        res["final_status"] = _final_status(engine)
        # every distinct batch shape compiles separately: how many the run (and warm-up) used
        shapes = engine.shapes_used()
        res["batch_shapes"] = sorted([list(s.__dict__.values()) for s in shapes])
    machine, git = _machine_and_git()
    res["metadata"] = {
        "config_path": cfg.path,
        "config_sha256": cfg.sha256,
        "config": cfg.to_dict(),
        "config_text": cfg.text,
        "versions": _versions(),
        "git_commit": git.get("commit"),
        "git_dirty": git.get("dirty"),
        "machine": machine,
        "devices_simulated": True,
        "note": (
            "pipeline stages run on CPU host devices of one machine "
            "(--xla_force_host_platform_device_count); they share its cores and memory"
        ),
    }
    return res


def _final_status(engine: Any) -> dict[str, Any]:
    st = engine.status()
    return {"plan": st["plan"], "stages": st["stages"], "preemptions": st["preemptions"]}


def _per_phase(cfg: BenchConfig, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    phases = cfg.workload.phases if cfg.workload is not None else ()
    if not phases:
        return []
    out = []
    for k, ph in enumerate(phases):
        sel = [r for r in rows if r["phase"] == k and "ttft_ms" in r]
        tt = [r["ttft_ms"] for r in sel]
        tp = [r["tpot_ms"] for r in sel if r["tpot_ms"] is not None]
        out.append(
            {
                "phase": k,
                "kind": ph.kind,
                "requests": sum(1 for r in rows if r["phase"] == k),
                "completed": len(sel),
                "mean_ttft_ms": float(np.mean(tt)) if tt else None,
                "p99_ttft_ms": float(np.percentile(tt, 99)) if tt else None,
                "mean_tpot_ms": float(np.mean(tp)) if tp else None,
                "p99_tpot_ms": float(np.percentile(tp, 99)) if tp else None,
            }
        )
    return out


def _timeline(rec: RunRecord, dt: float) -> dict[str, Any]:
    """Per `dt` seconds: output tokens/s, requests waiting (arrived, not yet scheduled) and
    running, from the requests' own times (so a long step does not hide its queue)."""
    t0 = rec.t0
    end = max(rec.end_s, dt)
    n = int(np.ceil(end / dt))
    edges = np.arange(n + 1) * dt
    tokens = np.zeros(n)
    waiting = np.zeros(n, dtype=int)
    running = np.zeros(n, dtype=int)
    mids = edges[:-1] + dt / 2
    for rid, r in zip(rec.request_ids, rec.requests, strict=True):
        m = rec.metrics.get(rid)
        if m is None:
            continue
        tt = np.asarray(m.token_times) - t0
        if tt.size:
            idx = np.clip((tt // dt).astype(int), 0, n - 1)
            np.add.at(tokens, idx, 1)
        sched = (m.first_scheduled_time - t0) if m.first_scheduled_time is not None else np.inf
        fin = (m.finished_time - t0) if m.finished_time is not None else np.inf
        waiting += (mids >= r.arrival_s) & (mids < sched)
        running += (mids >= sched) & (mids < fin)
    return {
        "interval_s": dt,
        "t_s": [round(float(x), 3) for x in edges[:-1]],
        "output_tokens_per_s": [round(float(x), 3) for x in tokens / dt],
        "waiting": waiting.tolist(),
        "running": running.tolist(),
    }


# --------------------------------------------------------------------------------------------
# Files


def write_results(out_dir: str, results: dict[str, Any], *, plots: bool = True) -> list[str]:
    """Writes `results.json` (and the PNGs) into `out_dir`; returns the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "results.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1, default=_default)
        f.write("\n")
    written = [path]
    if plots:
        written += plot_results(results, out_dir)
    return written


def _default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, tuple):
        return list(o)
    return str(o)


def load_results(path: str) -> dict[str, Any]:
    """`results.json` of a folder (or the file itself). Raises PipeliveError if unreadable."""
    f = os.path.join(path, "results.json") if os.path.isdir(path) else path
    try:
        with open(f) as fh:
            doc = json.load(fh)
    except OSError as e:
        raise PipeliveError(f"{f}: cannot read results: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise PipeliveError(f"{f}: not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise PipeliveError(
            f"{f}: not the results of `pipelive bench` (a JSON object), but a {type(doc).__name__}"
        )
    return doc


# --------------------------------------------------------------------------------------------
# Plots


def _cdf(ax: Any, values_ms: Sequence[float], title: str) -> None:
    v = np.sort(np.asarray(values_ms, dtype=float))
    ax.set_title(title)
    ax.set_ylabel("fraction of requests" if "ITL" not in title else "fraction of gaps")
    ax.grid(True, alpha=0.3)
    if v.size == 0:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        return
    y = np.arange(1, v.size + 1) / v.size
    ax.step(v, y, where="post")
    ax.set_xlabel("ms")
    if v[0] > 0 and v[-1] / v[0] > 20:
        ax.set_xscale("log")
    for p in (50, 99):
        x = float(np.percentile(v, p))
        ax.axvline(x, color="grey", ls=":", lw=0.8)
        ax.text(x, 0.02 if p == 50 else 0.1, f" p{p} {x:.0f}", fontsize=7, color="grey")


def plot_results(res: dict[str, Any], out_dir: str) -> list[str]:
    """Writes the three PNGs of one run; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    name = res.get("name", "")
    paths = []

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, key, title in zip(
        axes.flat,
        ("ttfts", "tpots", "itls", "e2els"),
        ("TTFT", "TPOT", "ITL", "E2E latency"),
        strict=True,
    ):
        _cdf(ax, [x * 1e3 for x in res.get(key, [])], title)
    fig.suptitle(f"{name}: latency CDFs ({res.get('completed')} requests)")
    fig.tight_layout()
    p = os.path.join(out_dir, "latency_cdf.png")
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)

    tl = res.get("timeline", {})
    t = np.asarray(tl.get("t_s", []), dtype=float)
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(11, 6), sharex=True)
    if t.size:
        dt = tl.get("interval_s", 0.5)
        ax1.step(t + dt, tl["output_tokens_per_s"], where="pre", color="tab:blue", lw=1)
        ax2.step(t + dt, tl["waiting"], where="pre", color="tab:orange", label="waiting")
        ax2.step(t + dt, tl["running"], where="pre", color="tab:green", label="running")
        ax2.legend(loc="upper right", fontsize=8)
    cfg = res.get("metadata", {}).get("config", {})
    phases = (cfg.get("workload") or {}).get("phases") or []
    start = 0.0
    for ph in phases:
        color = "#e8f0ff" if ph["kind"] == "prefill" else "#fff0e0"
        for ax in (ax1, ax2):
            ax.axvspan(start, start + ph["duration_s"], color=color, zorder=0)
        ax1.text(
            start + 0.5,
            0.97,
            ph["kind"],
            transform=ax1.get_xaxis_transform(),
            fontsize=8,
            va="top",
            color="grey",
        )
        start += ph["duration_s"]
    for r in res.get("reconfigurations", []):
        rep = r.get("report", {})
        for ax in (ax1, ax2):
            ax.axvline(r["start_s"], color="purple", ls=":", lw=1)
            if r.get("switch_s") is not None:
                ax.axvline(r["switch_s"], color="purple", ls="-", lw=1.2)
        pause = rep.get("pause_ms")
        label = f"{r['mode']}" + (f" {pause:.0f} ms" if pause is not None else "")
        if not r.get("ok"):
            label += " (aborted)"
        x = r.get("switch_s", r["start_s"])
        ax1.text(
            x,
            0.85,
            " " + label,
            transform=ax1.get_xaxis_transform(),
            fontsize=7,
            color="purple",
            rotation=90,
            va="top",
        )
    for r in res.get("refusals", []):
        for ax in (ax1, ax2):
            ax.axvline(r["start_s"], color="red", ls="--", lw=1)
        ax1.text(
            r["start_s"],
            0.85,
            " refused",
            transform=ax1.get_xaxis_transform(),
            fontsize=7,
            color="red",
            rotation=90,
            va="top",
        )
    ax1.set_ylabel("output tokens/s")
    ax2.set_ylabel("requests")
    ax2.set_xlabel("seconds into the run (dotted: reconfiguration starts, solid: switch)")
    ax1.set_title(f"{name}: throughput and queue per {tl.get('interval_s', 0.5)} s")
    for ax in (ax1, ax2):
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    p = os.path.join(out_dir, "timeline.png")
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)

    recs = res.get("reconfigurations", [])
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(recs) + 3), 4))
    colors = {"live": "tab:green", "stop_and_copy": "tab:orange", "restart": "tab:red"}
    if recs:
        labels = [f"#{r['index']} {r['mode']}" for r in recs]
        pauses = [r.get("report", {}).get("pause_ms") or 0.0 for r in recs]
        bars = ax.bar(range(len(recs)), pauses, color=[colors.get(r["mode"], "grey") for r in recs])
        for b, v, r in zip(bars, pauses, recs, strict=True):
            tag = f"{v:.1f}" + ("" if r.get("ok") else " aborted")
            ax.text(
                b.get_x() + b.get_width() / 2,
                max(v, 1e-3),
                tag,
                ha="center",
                va="bottom",
                fontsize=8,
            )
        ax.set_xticks(range(len(recs)), labels, rotation=20, fontsize=8)
        if max(pauses) > 0 and max(pauses) / max(min(p for p in pauses if p > 0), 1e-3) > 20:
            ax.set_yscale("log")
    else:
        ax.text(0.5, 0.5, "no reconfigurations", ha="center", va="center", transform=ax.transAxes)
    ax.set_ylabel("pause (ms)")
    ax.set_title(f"{name}: pause per reconfiguration")
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    p = os.path.join(out_dir, "reconfig_pause.png")
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)
    return paths


# --------------------------------------------------------------------------------------------
# Comparison


COMPARE_ROWS: tuple[tuple[str, str, str], ...] = (
    # (key, label, format)
    ("completed", "completed", "d"),
    ("request_throughput", "requests/s", ".3f"),
    ("output_throughput", "output tokens/s", ".1f"),
    ("total_token_throughput", "total tokens/s", ".1f"),
    ("goodput", "goodput (req/s in SLO)", ".3f"),
    ("mean_ttft_ms", "mean TTFT ms", ".0f"),
    ("p99_ttft_ms", "p99 TTFT ms", ".0f"),
    ("mean_tpot_ms", "mean TPOT ms", ".1f"),
    ("p99_tpot_ms", "p99 TPOT ms", ".1f"),
    ("p99_itl_ms", "p99 ITL ms", ".0f"),
    ("mean_e2e_ms", "mean E2E ms", ".0f"),
    ("preemptions", "preemptions", "d"),
    ("num_reconfigs_ok", "reconfigs done", "d"),
    ("num_refusals", "refused", "d"),
    ("max_pause_ms", "max pause ms", ".1f"),
    ("compiles_during_run", "compiles in run", "d"),
    ("cpu_other_cores", "other load (cores)", ".2f"),
)


def _fmt(v: Any, fmt: str) -> str:
    if v is None:
        return "-"
    try:
        return format(v, fmt)
    except (TypeError, ValueError):
        return str(v)


def compare(dirs: Sequence[str], *, markdown: bool = False) -> Any:
    """Several runs side by side: a `rich.table.Table` (or a markdown string with `markdown`)."""
    runs = [(d, load_results(d)) for d in dirs]
    names = [r.get("name") or os.path.basename(os.path.normpath(d)) for d, r in runs]
    if markdown:
        lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
        for key, label, fmt in COMPARE_ROWS:
            lines.append(
                f"| {label} | " + " | ".join(_fmt(r.get(key), fmt) for _, r in runs) + " |"
            )
        return "\n".join(lines)
    from rich.table import Table

    table = Table(title="pipelive bench compare")
    table.add_column("metric")
    for n in names:
        table.add_column(n, justify="right")
    for key, label, fmt in COMPARE_ROWS:
        table.add_row(label, *(_fmt(r.get(key), fmt) for _, r in runs))
    return table


# Reproduction check: what must match exactly (the workload and what the engine did with it) and
# what may drift with the load on a shared machine (rates and latencies, relative tolerance).
CHECK_EXACT = ("num_requests", "completed", "failed", "total_output_tokens", "num_reconfigs_ok")
CHECK_RELATIVE = (
    "request_throughput",
    "output_throughput",
    "mean_ttft_ms",
    "mean_tpot_ms",
    "mean_e2e_ms",
)


def check_reproduction(
    reference: dict[str, Any], run: dict[str, Any], tolerance: float = 0.5
) -> tuple[bool, list[dict[str, Any]]]:
    """Whether `run` reproduces `reference` (two results.json dicts), with one row per metric.

    Counts must be equal; rates and latencies may differ by `tolerance` relative to the
    reference (0.5: run / reference in [0.5, 1.5]). A metric missing from either side fails
    its row.
    """
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance!r}")
    rows = []
    for key in (*CHECK_EXACT, *CHECK_RELATIVE):
        ref, got = reference.get(key), run.get(key)
        if ref is None or got is None:
            rows.append({"metric": key, "reference": ref, "run": got, "ratio": None, "ok": False})
            continue
        if key in CHECK_EXACT:
            ok = ref == got
            ratio = None
        else:
            ratio = got / ref if ref else (1.0 if got == ref else float("inf"))
            ok = abs(ratio - 1.0) <= tolerance
        rows.append({"metric": key, "reference": ref, "run": got, "ratio": ratio, "ok": ok})
    return all(r["ok"] for r in rows), rows

"""Benchmark workloads: when requests arrive and how long their prompts and outputs are.

Every workload is a list of `WorkloadRequest(arrival_s, prompt_token_ids, max_tokens)` sorted by
arrival, made from a seed: arrivals, lengths and token ids come from three independent numpy
generators spawned from it (`numpy.random.SeedSequence(seed).spawn(3)`), so the same seed gives
the same requests, and changing a length distribution does not move the arrivals.

Arrivals:
- Poisson at `rate` req/s: exponential inter-arrival times.
- Gamma at `rate` req/s with shape `burstiness` = k (as vLLM's benchmark_serving): inter-arrival
  times ~ Gamma(k, 1/(rate*k)), mean 1/rate, coefficient of variation 1/sqrt(k); k = 1 is
  Poisson, k < 1 burstier, k > 1 more regular.

Lengths (tokens), each clipped to [min, max] and scaled by the workload's `scale`:
- fixed (value), uniform (low..high inclusive), lognormal (mean, sigma).
- lognormal with `mean` = the distribution's mean (not the log's): mu = ln(mean) - sigma^2/2.
  Without mean/sigma it uses ShareGPT-like numbers: mean input 161 and mean output 338 tokens,
  the averages the vLLM paper reports for ShareGPT (Kwon et al., SOSP'23: 161.31 and 337.99,
  8.4x and 5.8x Alpaca's 19.31 and 58.45). The sigmas (1.0 input, 0.8 output) are our choice to
  give that data's long right tail (median about 0.61x and 0.73x the mean); they are not fitted
  to the raw data, which is not available offline here.

The pattern-shift workload (PipeLive's evaluation, NOTES.md): phases alternate between
prefill-heavy requests (512 in / 16 out) and decode-heavy ones (128 in / 512 out), Poisson
arrivals at each phase's rate. These lengths take a GPU seconds but a 2-core CPU minutes, so the
workload's `scale` multiplies them (scale 0.1875 gives 96/3 and 24/96); the ratio between the
phases, which is what makes the best pipeline split change, is kept.

Trace replay: a CSV with a timestamp, input tokens and output tokens per row. Column names are
matched case-insensitively: `timestamp`/`arrival_s`/`time`, `input_tokens`/`prompt_tokens`/
`input_len`, `output_tokens`/`generated_tokens`/`output_len`, and the Azure LLM inference trace's
`TIMESTAMP,ContextTokens,GeneratedTokens` (timestamps like `2023-11-16 18:15:46.6805900`).
Arrivals are the timestamps less the first, divided by `time_scale`.

Prompt token ids are random in `[low_token, vocab_size)` (ids below `low_token`, the special
tokens, are avoided); outputs run to `max_tokens` when `ignore_eos` is set.
"""

from __future__ import annotations

import csv
import datetime as _dt
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipelive_jax.config import LengthSpec, PhaseSpec, WorkloadSection
from pipelive_jax.errors import ConfigError

__all__ = [
    "DECODE_HEAVY",
    "PREFILL_HEAVY",
    "SHAREGPT_INPUT",
    "SHAREGPT_OUTPUT",
    "WorkloadRequest",
    "gamma_arrivals",
    "make_workload",
    "poisson_arrivals",
    "read_trace",
    "sample_lengths",
    "summarize",
]

SHAREGPT_INPUT = (161.31, 1.0)
"""(mean, sigma) of the ShareGPT-like lognormal input length (see the module docstring)."""
SHAREGPT_OUTPUT = (337.99, 0.8)
"""(mean, sigma) of the ShareGPT-like lognormal output length."""

PREFILL_HEAVY = (512, 16)
"""(input, output) tokens of a prefill-heavy request in PipeLive's pattern-shift workload."""
DECODE_HEAVY = (128, 512)
"""(input, output) tokens of a decode-heavy request."""


@dataclass(frozen=True)
class WorkloadRequest:
    """One request: it arrives `arrival_s` seconds into the run. `phase` is the index of its
    pattern-shift phase (None for other workloads)."""

    arrival_s: float
    prompt_token_ids: list[int]
    max_tokens: int
    phase: int | None = None


# --------------------------------------------------------------------------------------------
# Arrivals


def _arrivals(
    gaps: Any, rate: float, num: int | None, duration: float | None, start: float
) -> np.ndarray:
    """Cumulative arrival times from a gap sampler, stopping at `num` or `start + duration`."""
    if num is None and duration is None:
        raise ValueError("give num (requests) or duration (seconds)")
    if num is not None:
        t = start + np.cumsum(gaps(num))
        if duration is not None:
            t = t[t < start + duration]
        return t
    assert duration is not None
    # Draw in chunks until past the end; expected count is rate * duration.
    out: list[np.ndarray] = []
    last = start
    chunk = max(16, int(rate * duration * 1.2) + 16)
    while last < start + duration:
        t = last + np.cumsum(gaps(chunk))
        out.append(t)
        last = float(t[-1])
    t = np.concatenate(out)
    return t[t < start + duration]


def poisson_arrivals(
    rng: np.random.Generator,
    rate: float,
    num: int | None = None,
    duration: float | None = None,
    start: float = 0.0,
) -> np.ndarray:
    """Arrival times (s) of a Poisson process at `rate` req/s: `num` of them, or those before
    `start + duration` (both: whichever ends first)."""
    if not rate > 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    return _arrivals(lambda n: rng.exponential(1.0 / rate, n), rate, num, duration, start)


def gamma_arrivals(
    rng: np.random.Generator,
    rate: float,
    burstiness: float = 1.0,
    num: int | None = None,
    duration: float | None = None,
    start: float = 0.0,
) -> np.ndarray:
    """Arrival times of a renewal process with Gamma(k=burstiness, 1/(rate*k)) gaps: mean rate
    `rate`, coefficient of variation 1/sqrt(k)."""
    if not rate > 0 or not burstiness > 0:
        raise ValueError(f"rate and burstiness must be > 0, got {rate}, {burstiness}")
    k = burstiness
    return _arrivals(lambda n: rng.gamma(k, 1.0 / (rate * k), n), rate, num, duration, start)


# --------------------------------------------------------------------------------------------
# Lengths


def sample_lengths(
    rng: np.random.Generator,
    spec: LengthSpec,
    n: int,
    *,
    scale: float = 1.0,
    default: tuple[float, float] = SHAREGPT_INPUT,
) -> np.ndarray:
    """`n` lengths (int64) from `spec`, multiplied by `scale`, rounded, clipped to [min, max].

    `default` is the (mean, sigma) a lognormal spec without them uses.
    """
    if spec.dist == "fixed":
        assert spec.value is not None
        x = np.full(n, float(spec.value))
    elif spec.dist == "uniform":
        assert spec.low is not None and spec.high is not None
        x = rng.integers(spec.low, spec.high + 1, n).astype(float)
    elif spec.dist == "lognormal":
        mean = spec.mean if spec.mean is not None else default[0]
        sigma = spec.sigma if spec.sigma is not None else default[1]
        mu = math.log(mean) - sigma**2 / 2
        x = rng.lognormal(mu, sigma, n)
    else:
        raise ValueError(f"unknown length distribution {spec.dist!r}")
    out = np.rint(x * scale).astype(np.int64)
    hi = spec.max if spec.max is not None else np.iinfo(np.int64).max
    return np.clip(out, spec.min, hi)


# --------------------------------------------------------------------------------------------
# Traces


_TIME_COLS = ("timestamp", "arrival_s", "arrival_time", "time")
_IN_COLS = ("input_tokens", "contexttokens", "prompt_tokens", "input_len", "context_tokens")
_OUT_COLS = ("output_tokens", "generatedtokens", "generated_tokens", "output_len")


def _parse_time(value: str) -> float:
    v = value.strip()
    try:
        return float(v)
    except ValueError:
        pass
    # Azure traces write 7 fractional digits; datetime takes at most 6.
    if "." in v:
        head, frac = v.rsplit(".", 1)
        digits = "".join(ch for ch in frac if ch.isdigit())
        tail = frac[len(digits) :]
        v = f"{head}.{digits[:6]}{tail}"
    return _dt.datetime.fromisoformat(v.replace("Z", "+00:00")).timestamp()


def read_trace(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(arrival seconds from the first row, input tokens, output tokens) of a trace CSV, sorted
    by arrival. Raises ConfigError naming the file and the row for anything it cannot read."""
    try:
        f = open(path, newline="")  # noqa: SIM115 - closed below
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the trace: {e.strerror or e}") from None
    with f:
        reader = csv.DictReader(f)
        fields = {c.strip().lower(): c for c in (reader.fieldnames or [])}

        def column(names: Sequence[str], what: str) -> str:
            for n in names:
                if n in fields:
                    return fields[n]
            raise ConfigError(
                f"{path}: no {what} column; expected one of {', '.join(names)} "
                f"(case-insensitive), found {', '.join(reader.fieldnames or []) or 'none'}"
            )

        tc = column(_TIME_COLS, "timestamp")
        ic = column(_IN_COLS, "input-tokens")
        oc = column(_OUT_COLS, "output-tokens")
        ts, ins, outs = [], [], []
        for row_no, row in enumerate(reader, start=2):
            try:
                ts.append(_parse_time(row[tc]))
                ins.append(int(float(row[ic])))
                outs.append(int(float(row[oc])))
            except (TypeError, ValueError) as e:
                raise ConfigError(f"{path}:{row_no}: cannot read this row ({e})") from None
    if not ts:
        raise ConfigError(f"{path}: the trace has no rows")
    t = np.asarray(ts, dtype=float)
    order = np.argsort(t, kind="stable")
    t = t[order] - t[order][0]
    return t, np.asarray(ins, np.int64)[order], np.asarray(outs, np.int64)[order]


# --------------------------------------------------------------------------------------------
# Whole workloads


def _phase_lengths(phase: PhaseSpec, scale: float) -> tuple[LengthSpec, LengthSpec]:
    base = PREFILL_HEAVY if phase.kind == "prefill" else DECODE_HEAVY
    inp = phase.input or LengthSpec("fixed", value=base[0])
    out = phase.output or LengthSpec("fixed", value=base[1])
    return inp, out


def make_workload(
    w: WorkloadSection,
    *,
    seed: int,
    vocab_size: int,
    max_model_len: int | None = None,
    low_token: int = 3,
) -> list[WorkloadRequest]:
    """The requests of a `[workload]` section, sorted by arrival.

    With `max_model_len`, prompts are cut to `max_model_len - 1` tokens and outputs to what is
    left, so that every request fits the engine (the number cut is in `summarize`).
    """
    arr_rng, len_rng, tok_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3)
    )
    phases: np.ndarray | None = None
    if w.kind in ("poisson", "gamma"):
        if w.kind == "poisson":
            t = poisson_arrivals(arr_rng, w.rate, w.num_requests, w.duration_s)
        else:
            t = gamma_arrivals(arr_rng, w.rate, w.burstiness, w.num_requests, w.duration_s)
        ins = sample_lengths(len_rng, w.input, len(t), scale=w.scale, default=SHAREGPT_INPUT)
        outs = sample_lengths(len_rng, w.output, len(t), scale=w.scale, default=SHAREGPT_OUTPUT)
    elif w.kind == "pattern_shift":
        ts, i_s, o_s, ph = [], [], [], []
        start = 0.0
        for k, phase in enumerate(w.phases):
            tk = poisson_arrivals(
                arr_rng, phase.rate or w.rate, duration=phase.duration_s, start=start
            )
            inp, out = _phase_lengths(phase, w.scale)
            ts.append(tk)
            i_s.append(sample_lengths(len_rng, inp, len(tk), scale=w.scale))
            o_s.append(sample_lengths(len_rng, out, len(tk), scale=w.scale))
            ph.append(np.full(len(tk), k))
            start += phase.duration_s
        t, ins, outs = np.concatenate(ts), np.concatenate(i_s), np.concatenate(o_s)
        phases = np.concatenate(ph)
        if w.num_requests is not None:
            t, ins, outs, phases = (
                t[: w.num_requests],
                ins[: w.num_requests],
                outs[: w.num_requests],
                phases[: w.num_requests],
            )
    elif w.kind == "trace":
        assert w.trace is not None
        t, ins, outs = read_trace(w.trace)
        t = t / w.time_scale
        ins = np.maximum(np.rint(ins * w.scale).astype(np.int64), 1)
        outs = np.maximum(np.rint(outs * w.scale).astype(np.int64), 1)
        keep = np.ones(len(t), bool)
        if w.duration_s is not None:
            keep &= t < w.duration_s
        t, ins, outs = t[keep], ins[keep], outs[keep]
        if w.num_requests is not None:
            t, ins, outs = t[: w.num_requests], ins[: w.num_requests], outs[: w.num_requests]
    else:
        raise ValueError(f"unknown workload kind {w.kind!r}")
    if max_model_len is not None:
        ins = np.minimum(ins, max_model_len - 1)
        outs = np.minimum(outs, max_model_len - ins)
    if vocab_size <= low_token:
        raise ValueError(f"vocab_size {vocab_size} leaves no token ids above {low_token}")
    reqs = []
    for i in range(len(t)):
        ids = tok_rng.integers(low_token, vocab_size, int(ins[i])).tolist()
        reqs.append(
            WorkloadRequest(
                arrival_s=float(t[i]),
                prompt_token_ids=ids,
                max_tokens=int(outs[i]),
                phase=int(phases[i]) if phases is not None else None,
            )
        )
    return reqs


def summarize(reqs: Sequence[WorkloadRequest]) -> dict[str, Any]:
    """Counts, span and mean lengths of a workload (what results.json records of it)."""
    if not reqs:
        return {"num_requests": 0}
    t = np.array([r.arrival_s for r in reqs])
    ins = np.array([len(r.prompt_token_ids) for r in reqs])
    outs = np.array([r.max_tokens for r in reqs])
    span = float(t[-1] - t[0]) if len(t) > 1 else 0.0
    return {
        "num_requests": len(reqs),
        "span_s": round(span, 3),
        "mean_rate": round((len(t) - 1) / span, 4) if span > 0 else None,
        "mean_input_tokens": round(float(ins.mean()), 2),
        "mean_output_tokens": round(float(outs.mean()), 2),
        "total_input_tokens": int(ins.sum()),
        "total_output_tokens": int(outs.sum()),
    }

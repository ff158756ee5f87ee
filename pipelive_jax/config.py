"""Benchmark configs: TOML files -> validated dataclasses, with errors that name file and line.

A config fixes one reproducible experiment: the model, the initial pipeline plan, the KV cache and
its memory budgets, the scheduler limits, the workload, the reconfiguration schedule and where the
results go. `load_config(path)` reads it with `tomllib` and checks every key and value; a problem
raises `ConfigError` naming the file, the line and the key (``configs/x.toml:12: [workload] rate:
...``). `tomllib` reports no line numbers for values, so `_Locator` finds a key's line by scanning
the file text within the key's table.

Sections (every key optional unless marked)::

    [model]      name = "smollm2-135m" | "tiny-random" | path, dtype = "float32", seed, backend
    [plan]       stages (required) = [15, 15] | [{devices = [0], layers = [0, 15]}, ...],
                 devices = N simulated devices (default: the most any plan of the file uses),
                 speeds = [1.0, 0.6] (relative, for `pipelive plan`), num_microbatches
    [kv]         page_size, num_pages = int | [per stage], device_memory = bytes | "640MiB" |
                 [per device], utilization, kv_resize, page_granule,
                 kv_cache_dtype = "auto" | "float32" | "bfloat16" | "float16"
    [scheduler]  max_num_seqs, max_num_batched_tokens, max_model_len, background_compile
    [workload]   (a benchmark needs it) kind (required) = "poisson" | "gamma" | "pattern_shift" | "trace", rate,
                 burstiness (gamma shape; or cv), num_requests, duration_s, input = {...},
                 output = {...}, scale, phases = [{kind, duration_s, rate, ...}], trace,
                 time_scale, temperature, ignore_eos
    [[reconfig]] at_s | after_requests, plan (required), mode, pause_budget_ms, max_rounds
    [bench]      out, seed, slo_ttft_ms, slo_tpot_ms, warmup_requests, warmup_reconfig,
                 rehearsal, timeline_interval_s, max_duration_s

This module imports no JAX: the CLI reads a config to learn how many host devices to create
before JAX is imported.
"""

from __future__ import annotations

import difflib
import hashlib
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from pipelive_jax.errors import ConfigError, PlanError
from pipelive_jax.plan import PipelinePlan, parse_plan

__all__ = [
    "BenchConfig",
    "BenchSection",
    "KVSection",
    "LengthSpec",
    "ModelSection",
    "PhaseSpec",
    "PlanSection",
    "ReconfigEntry",
    "SchedulerSection",
    "WorkloadSection",
    "load_config",
    "parse_bytes",
]

WORKLOAD_KINDS = ("poisson", "gamma", "pattern_shift", "trace")
LENGTH_DISTS = ("fixed", "uniform", "lognormal")
PHASE_KINDS = ("prefill", "decode")
RECONFIG_MODES = ("live", "stop_and_copy", "restart")
DTYPES = ("float32", "bfloat16", "float16")
# The engine's kv_cache_dtype: "auto" (the model's dtype; float32 on CPU) or a dtype.
KV_CACHE_DTYPES = ("auto", *DTYPES)

# Layers of the registry models, so that a config's plans are checked against the model without
# importing JAX (models.registry imports Flax). Other models are checked when they are loaded.
KNOWN_NUM_LAYERS = {"smollm2-135m": 30, "tiny-random": 6}

_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_bytes(value: Any) -> int:
    """`640MiB`, `4.8GiB`, `1e9`, `1000000` or an int -> bytes. Raises ValueError."""
    if isinstance(value, bool):
        raise ValueError(f"expected a byte count, got {value!r}")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"a memory budget must be positive, got {value}")
        return value
    if isinstance(value, float):
        if not value > 0 or not math.isfinite(value):
            raise ValueError(f"a memory budget must be positive, got {value}")
        return int(value)
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*", value)
        if m:
            unit = m.group(2).lower() or "b"
            if unit in _UNITS:
                n = int(float(m.group(1)) * _UNITS[unit])
                if n > 0:
                    return n
    raise ValueError(
        f"expected a byte count like 640MiB, 4.8GiB or 1000000 (units {', '.join(_UNITS)}), "
        f"got {value!r}"
    )


# --------------------------------------------------------------------------------------------
# Where a key is in the file


_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(
    r"""^\s*((?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*')(?:\s*\.\s*(?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*'))*)\s*="""
)


def _split_dotted(text: str) -> list[str]:
    parts = re.findall(r"""[A-Za-z0-9_-]+|"[^"]*"|'[^']*'""", text)
    return [p[1:-1] if p[:1] in "\"'" else p for p in parts]


class _Locator:
    """Finds the line of a key path like ("workload", "phases", 1, "rate") in TOML text.

    It follows table headers (`[a.b]`, and `[[a]]` counted per array) and `key =` lines (dotted
    keys included). A path that goes into an inline table or array (`input = {mean = 3}`) resolves
    to the line of the innermost key written as `key =` at or after its parent's line, before the
    next table header; failing that, to the parent's line. Good enough to point a reader at the
    right line; it is not a TOML parser.
    """

    def __init__(self, text: str) -> None:
        self.keys: dict[tuple[Any, ...], int] = {}
        self.headers: dict[tuple[Any, ...], int] = {}
        self.lines = text.splitlines()
        counts: dict[tuple[Any, ...], int] = {}
        table: tuple[Any, ...] = ()
        header_lines = []
        depth = 0  # open brackets/braces of a value that spans lines
        for no, raw in enumerate(self.lines, start=1):
            line = _strip_comment(raw)
            if depth == 0:
                h = _HEADER.match(line)
                if h:
                    names = tuple(_split_dotted(h.group(2)))
                    if h.group(1) == "[[":
                        # an array of tables: its index is resolved against enclosing arrays
                        base = (*self._resolve(names[:-1], counts), names[-1])
                        idx = counts.get(base, 0)
                        counts[base] = idx + 1
                        table = (*base, idx)
                    else:
                        table = self._resolve(names, counts)
                    self.headers.setdefault(table, no)
                    header_lines.append(no)
                    continue
                k = _KEY.match(line)
                if k:
                    path = (*table, *_split_dotted(k.group(1)))
                    self.keys.setdefault(path, no)
            depth += _bracket_balance(line)
            depth = max(depth, 0)
        self._header_lines = header_lines

    @staticmethod
    def _resolve(names: tuple[str, ...], counts: Mapping[tuple[Any, ...], int]) -> tuple[Any, ...]:
        """`[a.b]` inside the latest `[[a]]` becomes (a, index, b)."""
        out: list[Any] = []
        for name in names:
            out.append(name)
            base = tuple(out)
            if base in counts:
                out.append(counts[base] - 1)
        return tuple(out)

    def _end_of_table(self, line: int) -> int:
        after = [h for h in self._header_lines if h > line]
        return after[0] if after else len(self.lines) + 1

    def line(self, path: Sequence[Any]) -> int | None:
        path = tuple(path)
        for n in range(len(path), 0, -1):
            prefix = path[:n]
            if prefix in self.keys:
                return self._scan(self.keys[prefix], path[n:])
            if prefix in self.headers:
                return self._scan(self.headers[prefix], path[n:])
        return None

    def _scan(self, start: int, rest: Sequence[Any]) -> int:
        """The line of the innermost key of `rest` inside the value that starts at `start`."""
        end = self._end_of_table(start)
        if rest and isinstance(rest[0], int):
            # an element of a multi-line array of inline tables: the rest[0]-th line opening one
            opening = [
                no
                for no in range(start + 1, end)
                if _strip_comment(self.lines[no - 1]).lstrip().startswith("{")
            ]
            if rest[0] < len(opening):
                start = opening[rest[0]]
        names = [p for p in rest if isinstance(p, str)]
        if not names:
            return start
        pat = re.compile(rf"""(^|[\s{{,])["']?{re.escape(names[-1])}["']?\s*=""")
        for no in range(start, end):
            if pat.search(_strip_comment(self.lines[no - 1])):
                return no
        return start


def _strip_comment(line: str) -> str:
    """The line without a trailing comment (a `#` outside strings)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
        elif ch == "#":
            return line[:i]
    return line


def _bracket_balance(line: str) -> int:
    """Open minus closed brackets/braces outside strings, after the `=` of a key line."""
    quote = None
    depth = 0
    body = (
        line.split("=", 1)[1] if "=" in line and not line.lstrip().startswith(("[", "{")) else line
    )
    for ch in body:
        if quote:
            if ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
    return depth


# --------------------------------------------------------------------------------------------
# The sections


@dataclass(frozen=True)
class ModelSection:
    """`[model]`: which model, in which dtype; `seed` seeds tiny-random's weights."""

    name: str = "smollm2-135m"
    dtype: str = "float32"
    seed: int = 0
    backend: str | None = None


@dataclass(frozen=True)
class PlanSection:
    """`[plan]`: the initial plan (as written: counts or JSON form) and the simulated devices.

    `devices` is how many host devices the run creates (every plan of the file must fit in them);
    `speeds` are relative device speeds, used only by `pipelive plan --config`.
    """

    stages: Any
    devices: int
    speeds: tuple[float, ...] | None = None
    num_microbatches: int = 1


@dataclass(frozen=True)
class KVSection:
    """`[kv]`: the paged KV cache. With `device_memory` the capacities come from the admission
    rule (DESIGN.md §4); `num_pages` fixes them instead. `device_memory` is one budget for every
    device or a list indexed by device id (heterogeneous devices)."""

    page_size: int = 16
    num_pages: int | tuple[int, ...] | None = None
    device_memory: int | tuple[int, ...] | None = None
    utilization: float = 0.9
    kv_resize: bool = True
    page_granule: int = 16
    kv_cache_dtype: str = "auto"


@dataclass(frozen=True)
class SchedulerSection:
    max_num_seqs: int = 8
    max_num_batched_tokens: int = 256
    max_model_len: int = 512
    background_compile: bool = False


@dataclass(frozen=True)
class LengthSpec:
    """A token-length distribution: `fixed` (value), `uniform` (low..high inclusive) or
    `lognormal` (mean and sigma of the log; None = the ShareGPT-like defaults of
    `bench.workload`), clipped to [min, max]."""

    dist: str = "fixed"
    value: int | None = None
    low: int | None = None
    high: int | None = None
    mean: float | None = None
    sigma: float | None = None
    min: int = 1
    max: int | None = None


@dataclass(frozen=True)
class PhaseSpec:
    """One phase of the pattern-shift workload: `prefill` (512 in / 16 out at scale 1) or
    `decode` (128 in / 512 out); `input`/`output` override the lengths."""

    kind: str
    duration_s: float
    rate: float | None = None
    input: LengthSpec | None = None
    output: LengthSpec | None = None


@dataclass(frozen=True)
class WorkloadSection:
    kind: str
    rate: float = 1.0
    burstiness: float = 1.0
    num_requests: int | None = None
    duration_s: float | None = None
    input: LengthSpec = field(default_factory=lambda: LengthSpec("fixed", value=128))
    output: LengthSpec = field(default_factory=lambda: LengthSpec("fixed", value=64))
    scale: float = 1.0
    phases: tuple[PhaseSpec, ...] = ()
    trace: str | None = None
    time_scale: float = 1.0
    temperature: float = 0.0
    ignore_eos: bool = True


@dataclass(frozen=True)
class ReconfigEntry:
    """One scheduled reconfiguration: at `at_s` seconds into the run, or when the
    `after_requests`-th request has arrived."""

    plan: Any
    at_s: float | None = None
    after_requests: int | None = None
    mode: str = "live"
    pause_budget_ms: float = 10.0
    max_rounds: int = 8


@dataclass(frozen=True)
class BenchSection:
    """`[bench]`: where results go and how the run is measured. SLOs are in ms (None = no SLO).

    warmup_requests: requests served before the measured run (not measured) so that the batch
      shapes the workload uses are compiled; warmup_reconfig: the warm-up also walks through the
      reconfiguration schedule, so every plan's stage functions are compiled before measuring.
    rehearsal: before measuring, replay the whole workload and schedule once, unmeasured (a
      dress rehearsal), so that the measured run finds compiled nearly every (stage, KV
      capacity, batch shape) it meets; restart entries are left out of it (a restart drops the
      compiled code anyway).
    """

    out: str | None = None
    seed: int = 0
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    warmup_requests: int = 0
    warmup_reconfig: bool = False
    rehearsal: bool = False
    timeline_interval_s: float = 0.5
    max_duration_s: float = 900.0


@dataclass(frozen=True)
class BenchConfig:
    """A whole config file, validated. `text` is the file as read and `sha256` its hash."""

    path: str
    name: str
    text: str
    sha256: str
    model: ModelSection
    plan: PlanSection
    kv: KVSection
    scheduler: SchedulerSection
    workload: WorkloadSection | None  # None: a config for `pipelive serve`, not a benchmark
    reconfig: tuple[ReconfigEntry, ...]
    bench: BenchSection

    def engine_options(self) -> dict[str, Any]:
        """Keyword arguments of `EngineConfig` (the `**engine_options` of `Engine` and `LLM`)."""
        kv, sc = self.kv, self.scheduler
        memory: int | dict[int, int] | None
        if isinstance(kv.device_memory, tuple):
            memory = dict(enumerate(kv.device_memory))
        else:
            memory = kv.device_memory
        num_pages = list(kv.num_pages) if isinstance(kv.num_pages, tuple) else kv.num_pages
        return {
            "page_size": kv.page_size,
            "num_pages": num_pages,
            "device_memory_bytes": memory,
            "memory_utilization": kv.utilization,
            "kv_resize": kv.kv_resize,
            "page_granule": kv.page_granule,
            "kv_cache_dtype": kv.kv_cache_dtype,
            "max_num_seqs": sc.max_num_seqs,
            "max_num_batched_tokens": sc.max_num_batched_tokens,
            "max_model_len": sc.max_model_len,
            "background_compile": sc.background_compile,
            "num_microbatches": self.plan.num_microbatches,
            "backend": self.model.backend,
        }

    @property
    def num_devices(self) -> int:
        return self.plan.devices

    def out_dir(self, override: str | None = None) -> str:
        """Where results go: the override, `[bench] out`, or results/<config name>."""
        if override:
            return override
        if self.bench.out:
            return self.bench.out
        return os.path.join("results", self.name)

    def to_dict(self) -> dict[str, Any]:
        """The parsed config as JSON-able data (for results metadata)."""
        d = asdict(self)
        d.pop("text")
        return d


# --------------------------------------------------------------------------------------------
# Reading


class _Reader:
    """Reads one table with type checks; every error names the file, line and key."""

    def __init__(self, path: str, locator: _Locator) -> None:
        self.path = path
        self.loc = locator

    def error(self, keypath: Sequence[Any], message: str) -> ConfigError:
        line = self.loc.line(keypath)
        where = f"{self.path}:{line}" if line is not None else self.path
        return ConfigError(f"{where}: {_dotted(keypath)}: {message}")

    def check_keys(self, table: Mapping[str, Any], at: Sequence[Any], known: Sequence[str]) -> None:
        for key in table:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise self.error(
                    (*at, key),
                    f"unknown key {key!r} in {_table_name(at)}{hint} "
                    f"(known keys: {', '.join(known)})",
                )

    def table(self, parent: Mapping[str, Any], at: Sequence[Any], key: str) -> dict[str, Any]:
        v = parent.get(key, {})
        if not isinstance(v, dict):
            raise self.error((*at, key), f"must be a table, got {_describe(v)}")
        return v

    def get(
        self,
        table: Mapping[str, Any],
        at: Sequence[Any],
        key: str,
        kind: str,
        default: Any = None,
        *,
        required: bool = False,
        check: Callable[[Any], str | None] | None = None,
        choices: Sequence[str] | None = None,
    ) -> Any:
        """table[key] converted to `kind` ("int", "float", "bool", "str"), or `default`."""
        if key not in table:
            if required:
                raise self.error((*at,), f"missing required key {key!r} in {_table_name(at)}")
            return default
        v = table[key]
        kp = (*at, key)
        if kind == "int":
            if isinstance(v, bool) or not isinstance(v, int):
                raise self.error(kp, f"must be an integer, got {_describe(v)}")
        elif kind == "float":
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise self.error(kp, f"must be a number, got {_describe(v)}")
            v = float(v)
            if not math.isfinite(v):
                raise self.error(kp, f"must be a finite number, got {v}")
        elif kind == "bool":
            if not isinstance(v, bool):
                raise self.error(kp, f"must be true or false, got {_describe(v)}")
        elif kind == "str":
            if not isinstance(v, str):
                raise self.error(kp, f"must be a string, got {_describe(v)}")
        else:  # pragma: no cover - a bug in this module
            raise AssertionError(kind)
        if choices is not None and v not in choices:
            close = difflib.get_close_matches(str(v), choices, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise self.error(kp, f"must be one of {', '.join(map(repr, choices))}, got {v!r}{hint}")
        if check is not None:
            msg = check(v)
            if msg:
                raise self.error(kp, f"{msg}, got {v!r}")
        return v


def _dotted(path: Sequence[Any]) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _table_name(at: Sequence[Any]) -> str:
    if not at:
        return "the top level"
    if isinstance(at[-1], int):
        names = ".".join(str(p) for p in at if not isinstance(p, int))
        return f"[[{names}]] #{at[-1] + 1}"
    return f"[{_dotted(at)}]"


def _describe(v: Any) -> str:
    if isinstance(v, dict):
        return "a table"
    if isinstance(v, list):
        return "an array"
    return f"{type(v).__name__} {v!r}"


def _positive(v: float) -> str | None:
    return None if v > 0 else "must be > 0"


def _non_negative(v: float) -> str | None:
    return None if v >= 0 else "must be >= 0"


def _power_of_two(v: int) -> str | None:
    return None if v >= 1 and not v & (v - 1) else "must be a power of two"


def _unit_interval(v: float) -> str | None:
    return None if 0 < v <= 1 else "must be in (0, 1]"


_TOP = ("model", "plan", "kv", "scheduler", "workload", "reconfig", "bench")


def load_config(path: str | os.PathLike[str]) -> BenchConfig:
    """Reads and validates a benchmark config. Raises ConfigError (file, line, key, what)."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config: {e.strerror or e}") from None
    text = raw.decode("utf-8", errors="replace")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"line (\d+)", str(e))
        where = f"{path}:{m.group(1)}" if m else path
        raise ConfigError(f"{where}: not valid TOML: {e}") from None
    r = _Reader(path, _Locator(text))
    r.check_keys(data, (), _TOP)
    for key in _TOP:
        if key != "reconfig" and key in data and not isinstance(data[key], dict):
            raise r.error((key,), f"must be a table [{key}], got {_describe(data[key])}")

    model = _read_model(r, r.table(data, (), "model"))
    if "plan" not in data:
        raise r.error((), "missing required table [plan] (with stages = [...])")
    kv = _read_kv(r, r.table(data, (), "kv"))
    scheduler = _read_scheduler(r, r.table(data, (), "scheduler"))
    workload = (
        _read_workload(r, r.table(data, (), "workload"), os.path.dirname(path))
        if "workload" in data
        else None
    )
    raw_reconfig = data.get("reconfig", [])
    if not isinstance(raw_reconfig, list) or not all(isinstance(x, dict) for x in raw_reconfig):
        raise r.error(("reconfig",), "must be an array of tables [[reconfig]]")
    num_layers = KNOWN_NUM_LAYERS.get(model.name)
    plan_table = r.table(data, (), "plan")
    initial, plan_layers = _check_plan(r, ("plan", "stages"), plan_table.get("stages"), num_layers)
    reconfig = tuple(
        _read_reconfig(r, t, ("reconfig", i), num_layers or plan_layers)
        for i, t in enumerate(raw_reconfig)
    )
    plans = [initial] + [parse_plan(e.plan, num_layers=plan_layers) for e in reconfig]
    need = max(max(p.devices) for p in plans) + 1
    plan = _read_plan_section(r, plan_table, need)
    bench = _read_bench(r, r.table(data, (), "bench"))
    _cross_checks(r, plan, kv, scheduler, workload, reconfig, plans)
    name = os.path.splitext(os.path.basename(path))[0]
    return BenchConfig(
        path=path,
        name=name,
        text=text,
        sha256=hashlib.sha256(raw).hexdigest(),
        model=model,
        plan=plan,
        kv=kv,
        scheduler=scheduler,
        workload=workload,
        reconfig=reconfig,
        bench=bench,
    )


def _read_model(r: _Reader, t: dict[str, Any]) -> ModelSection:
    at = ("model",)
    r.check_keys(t, at, ("name", "dtype", "seed", "backend"))
    return ModelSection(
        name=r.get(t, at, "name", "str", "smollm2-135m"),
        dtype=r.get(t, at, "dtype", "str", "float32", choices=DTYPES),
        seed=r.get(t, at, "seed", "int", 0),
        backend=r.get(t, at, "backend", "str", None, choices=("xla", "pallas")),
    )


def _check_plan(
    r: _Reader, kp: tuple[Any, ...], spec: Any, num_layers: int | None
) -> tuple[PipelinePlan, int]:
    """Validates a plan as written; returns it and the number of layers it covers."""
    if spec is None:
        raise r.error(
            kp[:-1],
            f"missing required key {kp[-1]!r} (a plan: [15, 15] or "
            "[{devices = [0], layers = [0, 15]}, ...])",
        )
    if isinstance(spec, dict) or (isinstance(spec, list) and spec and isinstance(spec[0], dict)):
        stages = spec["stages"] if isinstance(spec, dict) and "stages" in spec else spec
        try:
            layers = int(stages[-1]["layers"][1]) if isinstance(stages, list) and stages else 0
        except (KeyError, IndexError, TypeError, ValueError):
            layers = 0
    elif isinstance(spec, list):
        layers = sum(x for x in spec if isinstance(x, int) and not isinstance(x, bool))
    elif isinstance(spec, str):
        parts = [p for p in spec.split(",") if p.strip().lstrip("-").isdigit()]
        layers = sum(int(p) for p in parts)
    else:
        raise r.error(kp, f"must be a list of layer counts or of stages, got {_describe(spec)}")
    n = num_layers or layers
    try:
        plan = parse_plan(spec, num_layers=max(n, 1))
    except PlanError as e:
        raise r.error(kp, str(e)) from None
    return plan, n


def _read_plan_section(r: _Reader, t: dict[str, Any], need: int) -> PlanSection:
    at = ("plan",)
    r.check_keys(t, at, ("stages", "devices", "speeds", "num_microbatches"))
    devices = r.get(t, at, "devices", "int", need, check=_positive)
    if devices < need:
        raise r.error(
            (*at, "devices"),
            f"the plans of this file use device ids up to {need - 1}, so devices must be >= "
            f"{need}, got {devices}",
        )
    speeds = t.get("speeds")
    if speeds is not None:
        if (
            not isinstance(speeds, list)
            or not speeds
            or not all(isinstance(s, int | float) and not isinstance(s, bool) for s in speeds)
            or not all(s > 0 for s in speeds)
        ):
            raise r.error((*at, "speeds"), f"must be a list of positive numbers, got {speeds!r}")
        if len(speeds) != devices:
            raise r.error(
                (*at, "speeds"), f"gives {len(speeds)} speeds for {devices} devices; give one each"
            )
        speeds = tuple(float(s) for s in speeds)
    return PlanSection(
        stages=t["stages"],
        devices=devices,
        speeds=speeds,
        num_microbatches=r.get(t, at, "num_microbatches", "int", 1, check=_positive),
    )


def _read_kv(r: _Reader, t: dict[str, Any]) -> KVSection:
    at = ("kv",)
    r.check_keys(
        t,
        at,
        (
            "page_size",
            "num_pages",
            "device_memory",
            "utilization",
            "kv_resize",
            "page_granule",
            "kv_cache_dtype",
        ),
    )
    num_pages: int | tuple[int, ...] | None = None
    if "num_pages" in t:
        v = t["num_pages"]
        ok = (isinstance(v, int) and not isinstance(v, bool) and v >= 2) or (
            isinstance(v, list)
            and v
            and all(isinstance(x, int) and not isinstance(x, bool) and x >= 2 for x in v)
        )
        if not ok:
            raise r.error(
                (*at, "num_pages"), f"must be an integer >= 2 or a list of them, got {v!r}"
            )
        num_pages = tuple(v) if isinstance(v, list) else v
    memory: int | tuple[int, ...] | None = None
    if "device_memory" in t:
        v = t["device_memory"]
        try:
            if isinstance(v, list):
                if not v:
                    raise ValueError("the list is empty")
                memory = tuple(parse_bytes(x) for x in v)
            else:
                memory = parse_bytes(v)
        except ValueError as e:
            raise r.error((*at, "device_memory"), str(e)) from None
    if num_pages is not None and memory is not None:
        raise r.error(
            (*at, "num_pages"),
            "give either num_pages (fixed capacities) or device_memory (capacities from the "
            "memory budgets), not both",
        )
    return KVSection(
        page_size=r.get(t, at, "page_size", "int", 16, check=_power_of_two),
        num_pages=num_pages,
        device_memory=memory,
        utilization=r.get(t, at, "utilization", "float", 0.9, check=_unit_interval),
        kv_resize=r.get(t, at, "kv_resize", "bool", True),
        page_granule=r.get(t, at, "page_granule", "int", 16, check=_positive),
        kv_cache_dtype=r.get(
            t, at, "kv_cache_dtype", "str", "auto", choices=KV_CACHE_DTYPES
        ),
    )


def _read_scheduler(r: _Reader, t: dict[str, Any]) -> SchedulerSection:
    at = ("scheduler",)
    r.check_keys(
        t, at, ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "background_compile")
    )
    return SchedulerSection(
        max_num_seqs=r.get(t, at, "max_num_seqs", "int", 8, check=_positive),
        max_num_batched_tokens=r.get(t, at, "max_num_batched_tokens", "int", 256, check=_positive),
        max_model_len=r.get(t, at, "max_model_len", "int", 512, check=_positive),
        background_compile=r.get(t, at, "background_compile", "bool", False),
    )


def _read_length(r: _Reader, v: Any, at: tuple[Any, ...]) -> LengthSpec:
    if isinstance(v, int) and not isinstance(v, bool):
        if v < 1:
            raise r.error(at, f"a length must be >= 1, got {v}")
        return LengthSpec("fixed", value=v)
    if not isinstance(v, dict):
        raise r.error(
            at, f"must be a length (an integer) or a table {{dist = ...}}, got {_describe(v)}"
        )
    r.check_keys(v, at, ("dist", "value", "low", "high", "mean", "sigma", "min", "max"))
    dist = r.get(v, at, "dist", "str", "fixed", choices=LENGTH_DISTS)
    pos = _positive
    spec = LengthSpec(
        dist=dist,
        value=r.get(v, at, "value", "int", None, check=pos),
        low=r.get(v, at, "low", "int", None, check=pos),
        high=r.get(v, at, "high", "int", None, check=pos),
        mean=r.get(v, at, "mean", "float", None, check=pos),
        sigma=r.get(v, at, "sigma", "float", None, check=_non_negative),
        min=r.get(v, at, "min", "int", 1, check=pos),
        max=r.get(v, at, "max", "int", None, check=pos),
    )
    allowed = {"fixed": {"value"}, "uniform": {"low", "high"}, "lognormal": {"mean", "sigma"}}
    for key in ("value", "low", "high", "mean", "sigma"):
        if key in v and key not in allowed[dist]:
            raise r.error(
                (*at, key),
                f"{key!r} does not apply to dist = {dist!r} (it takes "
                f"{', '.join(sorted(allowed[dist]))})",
            )
    if dist == "fixed" and spec.value is None:
        raise r.error(at, "dist = 'fixed' needs value = N")
    if dist == "uniform":
        if spec.low is None or spec.high is None:
            raise r.error(at, "dist = 'uniform' needs low and high")
        if spec.low > spec.high:
            raise r.error((*at, "high"), f"high ({spec.high}) must be >= low ({spec.low})")
    if spec.max is not None and spec.max < spec.min:
        raise r.error((*at, "max"), f"max ({spec.max}) must be >= min ({spec.min})")
    return spec


def _read_phase(r: _Reader, t: Any, at: tuple[Any, ...]) -> PhaseSpec:
    if not isinstance(t, dict):
        raise r.error(
            at, f"a phase must be a table {{kind = ..., duration_s = ...}}, got {_describe(t)}"
        )
    r.check_keys(t, at, ("kind", "duration_s", "rate", "input", "output"))
    return PhaseSpec(
        kind=r.get(t, at, "kind", "str", required=True, choices=PHASE_KINDS),
        duration_s=r.get(t, at, "duration_s", "float", required=True, check=_positive),
        rate=r.get(t, at, "rate", "float", None, check=_positive),
        input=_read_length(r, t["input"], (*at, "input")) if "input" in t else None,
        output=_read_length(r, t["output"], (*at, "output")) if "output" in t else None,
    )


def _read_workload(r: _Reader, t: dict[str, Any], base_dir: str) -> WorkloadSection:
    at = ("workload",)
    r.check_keys(
        t,
        at,
        (
            "kind",
            "rate",
            "burstiness",
            "num_requests",
            "duration_s",
            "input",
            "output",
            "scale",
            "phases",
            "trace",
            "time_scale",
            "temperature",
            "ignore_eos",
        ),
    )
    kind = r.get(t, at, "kind", "str", required=True, choices=WORKLOAD_KINDS)
    phases: tuple[PhaseSpec, ...] = ()
    if "phases" in t:
        if not isinstance(t["phases"], list) or not t["phases"]:
            raise r.error((*at, "phases"), "must be a non-empty array of phase tables")
        phases = tuple(_read_phase(r, p, (*at, "phases", i)) for i, p in enumerate(t["phases"]))
    trace = r.get(t, at, "trace", "str", None)
    if trace is not None and not os.path.isabs(trace):
        trace = os.path.normpath(os.path.join(base_dir, trace))
    w = WorkloadSection(
        kind=kind,
        rate=r.get(t, at, "rate", "float", 1.0, check=_positive),
        burstiness=r.get(t, at, "burstiness", "float", 1.0, check=_positive),
        num_requests=r.get(t, at, "num_requests", "int", None, check=_positive),
        duration_s=r.get(t, at, "duration_s", "float", None, check=_positive),
        input=_read_length(r, t["input"], (*at, "input"))
        if "input" in t
        else LengthSpec("fixed", value=128),
        output=_read_length(r, t["output"], (*at, "output"))
        if "output" in t
        else LengthSpec("fixed", value=64),
        scale=r.get(t, at, "scale", "float", 1.0, check=_positive),
        phases=phases,
        trace=trace,
        time_scale=r.get(t, at, "time_scale", "float", 1.0, check=_positive),
        temperature=r.get(t, at, "temperature", "float", 0.0, check=_non_negative),
        ignore_eos=r.get(t, at, "ignore_eos", "bool", True),
    )
    if kind == "pattern_shift" and not phases:
        raise r.error(at, "kind = 'pattern_shift' needs phases = [{kind = 'prefill', ...}, ...]")
    if kind != "pattern_shift" and phases:
        raise r.error((*at, "phases"), f"phases apply to kind = 'pattern_shift', not {kind!r}")
    if kind == "trace":
        if trace is None:
            raise r.error(at, "kind = 'trace' needs trace = 'path/to/trace.csv'")
        if not os.path.isfile(trace):
            raise r.error((*at, "trace"), f"trace file {trace} does not exist")
    elif trace is not None:
        raise r.error((*at, "trace"), f"trace applies to kind = 'trace', not {kind!r}")
    if kind in ("poisson", "gamma") and w.num_requests is None and w.duration_s is None:
        raise r.error(at, f"kind = {kind!r} needs num_requests or duration_s")
    return w


def _read_reconfig(
    r: _Reader, t: dict[str, Any], at: tuple[Any, ...], num_layers: int
) -> ReconfigEntry:
    r.check_keys(t, at, ("at_s", "after_requests", "plan", "mode", "pause_budget_ms", "max_rounds"))
    at_s = r.get(t, at, "at_s", "float", None, check=_non_negative)
    after = r.get(t, at, "after_requests", "int", None, check=_positive)
    if (at_s is None) == (after is None):
        raise r.error(at, "give exactly one of at_s (seconds into the run) or after_requests (N)")
    if "plan" not in t:
        raise r.error(at, "missing required key 'plan' in [[reconfig]]")
    _check_plan(r, (*at, "plan"), t["plan"], num_layers)
    return ReconfigEntry(
        plan=t["plan"],
        at_s=at_s,
        after_requests=after,
        mode=r.get(t, at, "mode", "str", "live", choices=RECONFIG_MODES),
        pause_budget_ms=r.get(t, at, "pause_budget_ms", "float", 10.0, check=_positive),
        max_rounds=r.get(t, at, "max_rounds", "int", 8, check=_positive),
    )


def _read_bench(r: _Reader, t: dict[str, Any]) -> BenchSection:
    at = ("bench",)
    r.check_keys(
        t,
        at,
        (
            "out",
            "seed",
            "slo_ttft_ms",
            "slo_tpot_ms",
            "warmup_requests",
            "warmup_reconfig",
            "rehearsal",
            "timeline_interval_s",
            "max_duration_s",
        ),
    )
    return BenchSection(
        out=r.get(t, at, "out", "str", None),
        seed=r.get(t, at, "seed", "int", 0, check=_non_negative),
        slo_ttft_ms=r.get(t, at, "slo_ttft_ms", "float", None, check=_positive),
        slo_tpot_ms=r.get(t, at, "slo_tpot_ms", "float", None, check=_positive),
        warmup_requests=r.get(t, at, "warmup_requests", "int", 0, check=_non_negative),
        warmup_reconfig=r.get(t, at, "warmup_reconfig", "bool", False),
        rehearsal=r.get(t, at, "rehearsal", "bool", False),
        timeline_interval_s=r.get(t, at, "timeline_interval_s", "float", 0.5, check=_positive),
        max_duration_s=r.get(t, at, "max_duration_s", "float", 900.0, check=_positive),
    )


def _cross_checks(
    r: _Reader,
    plan: PlanSection,
    kv: KVSection,
    sc: SchedulerSection,
    w: WorkloadSection | None,
    reconfig: Sequence[ReconfigEntry],
    plans: Sequence[PipelinePlan],
) -> None:
    """Checks that span sections (each error points at the key to change)."""
    if isinstance(kv.device_memory, tuple) and len(kv.device_memory) < plan.devices:
        raise r.error(
            ("kv", "device_memory"),
            f"lists {len(kv.device_memory)} budgets but the config uses {plan.devices} devices; "
            "give one per device (or one number for all)",
        )
    if isinstance(kv.num_pages, tuple):
        counts = {p.num_stages for p in plans}
        if len(counts) > 1 or kv.num_pages and len(kv.num_pages) != counts.pop():
            raise r.error(
                ("kv", "num_pages"),
                "a list of per-stage capacities needs every plan of the file to have that many "
                "stages; give one number instead",
            )
    if sc.max_model_len % kv.page_size and sc.max_model_len < kv.page_size:
        raise r.error(
            ("scheduler", "max_model_len"),
            f"max_model_len {sc.max_model_len} is below one page ({kv.page_size} tokens)",
        )
    for i, e in enumerate(reconfig):
        if e.after_requests is not None and w is not None and w.num_requests is not None:
            if e.after_requests > w.num_requests:
                raise r.error(
                    ("reconfig", i, "after_requests"),
                    f"is after the last request (the workload has num_requests = {w.num_requests})",
                )

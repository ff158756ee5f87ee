"""`pipelive serve`: one engine behind HTTP (DESIGN.md §6).

Routes:

    POST /rpc                   JSON-RPC 2.0, single or batch (notifications get no response)
    GET  /v1/models             OpenAI-compatible
    POST /v1/completions        OpenAI-compatible; `stream: true` -> server-sent events
    POST /v1/chat/completions   OpenAI-compatible, through the model's chat template
    GET  /health                200 while serving; 503 while draining, if the engine loop died,
                                or while its steps fail (FAILING_STEPS in a row)
    GET  /metrics               Prometheus text format (a registry of this server's own)

JSON-RPC methods: `generate`, `reconfigure`*, `reconfig_status`, `abort_reconfig`*,
`validate_plan`, `status`, `metrics`; * needs `Authorization: Bearer <token>`. Errors: the spec's
-32700 parse error, -32600 invalid request, -32601 method not found, -32602 invalid params (what
was wrong in `error.data`), -32603 internal error (logged with an id; the caller gets the id,
never a traceback), and the server's own:

    -32001 busy: a reconfiguration is in flight
    -32002 plan infeasible: the plan does not fit (admission numbers in `error.data`)
    -32003 unauthorized: a mutating method without the right bearer token
    -32004 timed out: the request ran past the per-request time limit (and was aborted)
    -32005 shutting down: the server is draining and takes no new requests

Threads: the engine loop runs on its own thread (`Engine.start()`), aiohttp on an asyncio loop.
A request's outputs cross over through the engine's subscriber callback (`add_request(...,
on_output=...)`, called on the engine thread) and `loop.call_soon_threadsafe`. Every engine call
that takes the engine lock runs in a worker thread: the lock is held for a whole step, and for
seconds while a reconfiguration rolls back, and the event loop must never wait on it.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import hmac
import json
import logging
import math
import os
import reprlib
import secrets
import signal
import threading
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from pipelive_jax.errors import (
    AdmissionError,
    ConfigError,
    PipeliveError,
    PlanError,
    ReconfigError,
    RequestError,
)
from pipelive_jax.serving.request import text_problem
from pipelive_jax.serving.rpc_client import TOKEN_ENV, default_token_path
from pipelive_jax.serving.sampling import MAX_LOGPROBS, SamplingParams, TokenLogprob

if TYPE_CHECKING:
    from pipelive_jax.models.registry import LoadedModel
    from pipelive_jax.plan import PipelinePlan
    from pipelive_jax.serving.engine import Engine, EngineConfig
    from pipelive_jax.serving.request import RequestOutput

log = logging.getLogger("pipelive.server")

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
BUSY = -32001
PLAN_INFEASIBLE = -32002
UNAUTHORIZED = -32003
TIMED_OUT = -32004
SHUTTING_DOWN = -32005

MUTATING_METHODS = frozenset({"reconfigure", "abort_reconfig"})
LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")

_brief = reprlib.Repr()
_brief.maxlevel = 3
_brief.maxstring = 60
_brief.maxother = 60


@dataclass
class ServerOptions:
    """Limits and names of one server.

    request_timeout_s: wall-clock limit of one generation request, queueing included (None: no
      limit); past it the request is aborted and the caller gets a timeout error.
    drain_timeout_s: on shutdown, how long in-flight requests may run on before they are aborted.
    max_batch: the most calls one JSON-RPC batch may hold.
    max_prompts: the most prompts one /v1/completions request may hold.
    """

    model_name: str | None = None
    max_body_bytes: int = 1 << 20
    request_timeout_s: float | None = 600.0
    drain_timeout_s: float = 30.0
    max_batch: int = 64
    max_prompts: int = 64


# ---------------------------------------------------------------------------------- errors


class RpcError(Exception):
    """A JSON-RPC error object: `code`, `message`, and `data` (JSON) for the caller."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data


class ParamError(Exception):
    """A request field with a bad value: `param` names it (None: the request as a whole)."""

    def __init__(self, param: str | None, message: str) -> None:
        super().__init__(message)
        self.param = param
        self.message = message


class RequestTimedOut(Exception):
    def __init__(self, timeout_s: float, tokens: int) -> None:
        super().__init__(
            f"the request ran past the server's time limit of {timeout_s:g} s and was aborted "
            f"after {tokens} generated tokens"
        )
        self.timeout_s = timeout_s
        self.tokens = tokens


class RequestFailed(Exception):
    """The engine ended the request on a fault of its own (finish_reason "error")."""


class ShuttingDown(Exception):
    def __init__(self) -> None:
        super().__init__("the server is shutting down and takes no new requests")


class EngineStopped(Exception):
    def __init__(self) -> None:
        super().__init__("the engine loop is not running; see the server log")


class ClientGone(Exception):
    """The client closed its connection before its answer was ready."""


# The HTTP request a handler serves, for code below it that is not handed the request (RPC
# methods): `until_answered` watches its connection.
_http_request: contextvars.ContextVar[web.Request | None] = contextvars.ContextVar(
    "pipelive_http_request", default=None
)

# Engine steps failing in a row past which /health answers 503.
FAILING_STEPS = 3

# How often a handler waiting for a generation checks that its client is still connected.
DISCONNECT_POLL_S = 0.2


async def until_answered(request: web.Request | None, aw: Awaitable[Any]) -> Any:
    """Awaits `aw` (generations' results); raises ClientGone once the client has hung up, so
    that the handler's cleanup aborts what nobody will read instead of generating it to
    max_tokens (streams find out when a write fails; this is for the answers sent whole)."""
    fut = asyncio.ensure_future(aw)
    if request is None:
        return await fut
    try:
        while True:
            done, _ = await asyncio.wait({fut}, timeout=DISCONNECT_POLL_S)
            if done:
                return fut.result()
            transport = request.transport
            if transport is None or transport.is_closing():
                raise ClientGone()
    finally:
        if not fut.done():
            fut.cancel()


class BodyTooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"request body larger than {limit} bytes")
        self.limit = limit


class ApiError(Exception):
    """An error of the OpenAI-compatible API: `{"error": {message, type, param, code}}`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def response(self) -> web.Response:
        body = {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }
        return web.json_response(body, status=self.status, dumps=_dumps)


# ---------------------------------------------------------------------------------- JSON


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False, default=str)


def _finite_float(text: str) -> float:
    x = float(text)
    if not math.isfinite(x):
        raise ValueError(f"number {text[:40]} is out of range")
    return x


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_json(data: bytes) -> Any:
    """Strict JSON: UTF-8, no NaN/Infinity, no float that overflows. Raises ValueError (or
    RecursionError for absurd nesting, UnicodeDecodeError for bad bytes)."""
    return json.loads(
        data.decode("utf-8"), parse_constant=_reject_constant, parse_float=_finite_float
    )


def _describe(value: Any) -> str:
    """A short, safe rendering of a value for error messages (bounded depth and length)."""
    try:
        return _brief.repr(value)
    except Exception:  # noqa: BLE001 - a message must never fail
        return f"<{type(value).__name__}>"


# ---------------------------------------------------------------------------------- fields


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _int_field(
    body: Mapping[str, Any],
    name: str,
    default: int | None,
    *,
    minimum: int | None = None,
    maximum: int | None = None,
) -> int | None:
    v = body.get(name)
    if v is None:
        return default
    if not _is_int(v):
        raise ParamError(name, f"{name} must be an integer, got {_describe(v)}")
    if minimum is not None and v < minimum:
        raise ParamError(name, f"{name} must be >= {minimum}, got {_describe(v)}")
    if maximum is not None and v > maximum:
        raise ParamError(name, f"{name} must be <= {maximum}, got {_describe(v)}")
    return int(v)


def _float_field(
    body: Mapping[str, Any],
    name: str,
    default: float,
    *,
    minimum: float,
    maximum: float | None = None,
    exclusive_minimum: bool = False,
) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ParamError(name, f"{name} must be a number, got {_describe(v)}")
    try:
        x = float(v)
    except OverflowError:
        raise ParamError(name, f"{name} is too large") from None
    low_ok = x > minimum if exclusive_minimum else x >= minimum
    if not math.isfinite(x) or not low_ok or (maximum is not None and x > maximum):
        low = f"> {minimum:g}" if exclusive_minimum else f">= {minimum:g}"
        high = f" and <= {maximum:g}" if maximum is not None else ""
        raise ParamError(name, f"{name} must be {low}{high}, got {_describe(v)}")
    return x


def _bool_field(body: Mapping[str, Any], name: str, default: bool) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise ParamError(name, f"{name} must be true or false, got {_describe(v)}")
    return v


def _stop_field(body: Mapping[str, Any]) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    if isinstance(v, str):
        v = [v]
    if (
        not isinstance(v, list)
        or len(v) > 16
        or not all(isinstance(s, str) and 0 < len(s) <= 256 for s in v)
    ):
        raise ParamError(
            "stop", "stop must be a string or a list of at most 16 non-empty strings (<= 256 chars)"
        )
    return list(v)


def _token_ids_field(body: Mapping[str, Any], name: str, *, empty_ok: bool) -> list[int] | None:
    v = body.get(name)
    if v is None:
        return None
    if not isinstance(v, list) or not all(_is_int(t) for t in v) or (not v and not empty_ok):
        raise ParamError(
            name, f"{name} must be a {'' if empty_ok else 'non-empty '}list of integer token ids"
        )
    return list(v)


def sampling_params(
    body: Mapping[str, Any],
    *,
    max_tokens: int,
    temperature: float,
    max_tokens_name: str = "max_tokens",
) -> SamplingParams:
    """SamplingParams from a request body (JSON-RPC `generate` or OpenAI); ParamError names the
    bad field. `max_tokens` and `temperature` are the defaults (they differ between the APIs)."""
    n = _int_field(body, max_tokens_name, max_tokens, minimum=1)
    assert n is not None
    try:
        return SamplingParams(
            max_tokens=n,
            temperature=_float_field(body, "temperature", temperature, minimum=0.0),
            top_p=_float_field(
                body, "top_p", 1.0, minimum=0.0, maximum=1.0, exclusive_minimum=True
            ),
            top_k=_int_field(body, "top_k", 0, minimum=-1) or 0,
            seed=_int_field(body, "seed", None, minimum=0, maximum=2**64 - 1),
            stop=_stop_field(body),
            stop_token_ids=_token_ids_field(body, "stop_token_ids", empty_ok=True) or [],
            ignore_eos=_bool_field(body, "ignore_eos", False),
            logprobs=_int_field(body, "logprobs", None, minimum=0, maximum=MAX_LOGPROBS),
            presence_penalty=_float_field(body, "presence_penalty", 0.0, minimum=-2, maximum=2),
            frequency_penalty=_float_field(body, "frequency_penalty", 0.0, minimum=-2, maximum=2),
            repetition_penalty=_float_field(
                body, "repetition_penalty", 1.0, minimum=0.0, exclusive_minimum=True
            ),
        )
    except RequestError as e:
        raise ParamError(None, str(e)) from None


def _only(
    params: Mapping[str, Any], allowed: frozenset[str], required: tuple[str, ...] = ()
) -> None:
    unknown = sorted(str(k) for k in params if k not in allowed)
    if unknown:
        raise ParamError(
            unknown[0], f"unknown parameter(s) {unknown[:8]}; accepted: {sorted(allowed)}"
        )
    for name in required:
        if params.get(name) is None:
            raise ParamError(name, f"{name} is required")


# ---------------------------------------------------------------------------------- metrics


def _summary_ms(values: Any) -> dict[str, Any]:
    a = np.asarray(list(values), dtype=np.float64) * 1e3
    if a.size == 0:
        return {"count": 0, "mean": None, "p50": None, "p90": None, "p99": None, "max": None}
    p50, p90, p99 = (float(x) for x in np.percentile(a, [50, 90, 99]))
    return {
        "count": int(a.size),
        "mean": float(a.mean()),
        "p50": p50,
        "p90": p90,
        "p99": p99,
        "max": float(a.max()),
    }


class ServingMetrics:
    """One server's counters and histograms (its own `CollectorRegistry`, so that several servers
    in one process do not collide) and the recent latencies the `metrics` RPC summarises.

    Touched only from the event loop thread.
    """

    def __init__(self, window: int = 4096) -> None:
        r = self.registry = CollectorRegistry()
        lat = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
        tok = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
        pause = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0)
        self.requests = Counter(
            "pipelive_requests",
            "Finished requests, by finish reason",
            ["finish_reason"],
            registry=r,
        )
        self.prompt_tokens = Counter("pipelive_prompt_tokens", "Prompt tokens", registry=r)
        self.generation_tokens = Counter(
            "pipelive_generation_tokens", "Generated tokens", registry=r
        )
        self.ttft = Histogram(
            "pipelive_time_to_first_token_seconds", "Time to first token", buckets=lat, registry=r
        )
        self.tpot = Histogram(
            "pipelive_time_per_output_token_seconds",
            "Mean time per output token after the first, per request",
            buckets=tok,
            registry=r,
        )
        self.e2e = Histogram(
            "pipelive_e2e_request_latency_seconds", "Arrival to finish", buckets=lat, registry=r
        )
        self.running = Gauge("pipelive_requests_running", "Requests running", registry=r)
        self.waiting = Gauge("pipelive_requests_waiting", "Requests waiting", registry=r)
        self.kv_utilization = Gauge(
            "pipelive_kv_cache_utilization",
            "Fraction of a stage's usable KV pages in use",
            ["stage", "device"],
            registry=r,
        )
        self.reconfigurations = Counter(
            "pipelive_reconfigurations",
            "Finished reconfigurations, by outcome (ok, aborted)",
            ["outcome"],
            registry=r,
        )
        self.reconfig_in_flight = Gauge(
            "pipelive_reconfiguration_in_flight", "1 while a reconfiguration runs", registry=r
        )
        self.pause = Histogram(
            "pipelive_reconfiguration_pause_seconds",
            "Serving pause of each reconfiguration (last old step to first new step)",
            buckets=pause,
            registry=r,
        )
        self.last_pause = Gauge(
            "pipelive_reconfiguration_last_pause_seconds",
            "Serving pause of the latest reconfiguration that switched",
            registry=r,
        )
        self.rpc_errors = Counter(
            "pipelive_rpc_errors", "JSON-RPC error responses, by code", ["code"], registry=r
        )
        self._ttft: deque[float] = deque(maxlen=window)
        self._tpot: deque[float] = deque(maxlen=window)
        self._e2e: deque[float] = deque(maxlen=window)
        self._itl: deque[float] = deque(maxlen=16 * window)
        self.finished: dict[str, int] = {}
        self.reconfig_outcomes = {"ok": 0, "aborted": 0}
        self.last_pause_ms: float | None = None
        self._reconfigs_seen = 0

    def observe_request(self, out: RequestOutput | None, reason: str | None = None) -> None:
        """Counts a request that ended: `out` is its last output (None if it produced none),
        `reason` overrides its finish reason (e.g. "timeout")."""
        reason = reason or (out.finish_reason if out is not None else None) or "unknown"
        self.requests.labels(finish_reason=reason).inc()
        self.finished[reason] = self.finished.get(reason, 0) + 1
        if out is None:
            return
        self.prompt_tokens.inc(len(out.prompt_token_ids))
        self.generation_tokens.inc(len(out.token_ids))
        m = out.metrics
        if m.ttft is not None:
            self.ttft.observe(m.ttft)
            self._ttft.append(m.ttft)
        if m.tpot is not None:
            self.tpot.observe(m.tpot)
            self._tpot.append(m.tpot)
        if m.e2e is not None:
            self.e2e.observe(m.e2e)
            self._e2e.append(m.e2e)
        self._itl.extend(float(x) for x in m.itl)

    def sync_reconfigurations(self, history: list[Any]) -> None:
        """Counts the reconfigurations of `history` (the engine's) that finished since last time."""
        for ctl in history[self._reconfigs_seen :]:
            if not ctl.handle.done():
                break  # one at a time: only the latest can still run
            report = ctl.handle.report()
            outcome = "ok" if report.ok else "aborted"
            self.reconfigurations.labels(outcome=outcome).inc()
            self.reconfig_outcomes[outcome] += 1
            if report.pause_ms is not None:
                self.pause.observe(report.pause_ms / 1e3)
                self.last_pause.set(report.pause_ms / 1e3)
                self.last_pause_ms = float(report.pause_ms)
            self._reconfigs_seen += 1

    def refresh(self, status: Mapping[str, Any]) -> None:
        """Sets the gauges from an `Engine.status()` snapshot."""
        self.running.set(status["running"])
        self.waiting.set(status["waiting"])
        self.kv_utilization.clear()  # stages come and go with the plan
        for st in status["stages"]:
            total = max(int(st["kv_pages_total"]), 1)
            self.kv_utilization.labels(stage=str(st["index"]), device=str(st["device"])).set(
                st["kv_pages_used"] / total
            )
        self.reconfig_in_flight.set(1 if status.get("reconfig") is not None else 0)

    def summary(self, status: Mapping[str, Any], in_flight: int) -> dict[str, Any]:
        return {
            "requests": {
                "finished": sum(self.finished.values()),
                "by_finish_reason": dict(self.finished),
                "in_flight": in_flight,
            },
            "ttft_ms": _summary_ms(self._ttft),
            "tpot_ms": _summary_ms(self._tpot),
            "itl_ms": _summary_ms(self._itl),
            "e2e_ms": _summary_ms(self._e2e),
            "queue_depth": {"waiting": status["waiting"], "running": status["running"]},
            "kv_utilization": [
                {
                    "stage": st["index"],
                    "device": st["device"],
                    "pages_used": st["kv_pages_used"],
                    "pages_total": st["kv_pages_total"],
                    "fraction": st["kv_pages_used"] / max(int(st["kv_pages_total"]), 1),
                }
                for st in status["stages"]
            ],
            "last_pause_ms": self.last_pause_ms,
            "reconfigurations": {
                "finished": sum(self.reconfig_outcomes.values()),
                **self.reconfig_outcomes,
                "in_flight": status.get("reconfig") is not None,
            },
        }

    def render(self) -> bytes:
        return generate_latest(self.registry)


# ---------------------------------------------------------------------------------- requests


def _request_metrics(out: RequestOutput) -> dict[str, Any]:
    m = out.metrics

    def ms(x: float | None) -> float | None:
        return None if x is None else x * 1e3

    return {
        "prompt_tokens": len(out.prompt_token_ids),
        "completion_tokens": len(out.token_ids),
        "ttft_ms": ms(m.ttft),
        "tpot_ms": ms(m.tpot),
        "e2e_ms": ms(m.e2e),
        "preemptions": m.preemptions,
    }


class Generation:
    """One request in flight: its outputs, carried from the engine thread to the event loop.

    `push` runs on the engine thread (the engine's subscriber); `next` on the event loop. While
    waiting, `next` checks every `LIVENESS_S` that the engine loop still runs (`alive`): a loop
    that died would otherwise leave every caller waiting until its time limit.
    """

    LIVENESS_S = 1.0

    def __init__(
        self,
        request_id: str,
        deadline: float | None,
        timeout_s: float | None,
        alive: Callable[[], bool],
    ) -> None:
        self.request_id = request_id
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self.deadline = deadline
        self.timeout_s = timeout_s
        self.alive = alive
        self.last: RequestOutput | None = None
        self.timed_out = False

    def push(self, out: RequestOutput) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, out)
        except RuntimeError:
            pass  # the event loop is closed: nobody listens any more; never fail the engine

    @property
    def finished(self) -> bool:
        return self.last is not None and self.last.finished

    async def next(self) -> RequestOutput:
        """The next output; raises RequestTimedOut past the deadline, EngineStopped if the
        engine loop is gone, RequestFailed if the engine ended the request on a fault."""
        while True:
            wait = self.LIVENESS_S
            if self.deadline is not None:
                wait = min(wait, max(0.0, self.deadline - self.loop.time()))
            try:
                out = await asyncio.wait_for(self.queue.get(), wait)
                break
            except TimeoutError:
                if self.deadline is not None and self.loop.time() >= self.deadline:
                    self.timed_out = True
                    tokens = len(self.last.token_ids) if self.last is not None else 0
                    raise RequestTimedOut(self.timeout_s or 0.0, tokens) from None
                if self.queue.empty() and not self.alive():
                    raise EngineStopped() from None
        self.last = out
        if out.finished and out.finish_reason == "error":
            raise RequestFailed(out.error or "the request failed; see the server log")
        return out

    async def result(self) -> RequestOutput:
        while True:
            out = await self.next()
            if out.finished:
                return out


class TextDeltas:
    """Turns a request's growing text into stream deltas that never need taking back.

    The engine re-decodes the whole output every token, so its tail may still change: an
    incomplete UTF-8 sequence decodes to U+FFFD until its last byte comes, and a stop string
    cuts the text once it has fully appeared. So until the request finishes the last
    `len(longest stop) - 1` characters and trailing U+FFFD are held back.
    """

    def __init__(self, stop: list[str]) -> None:
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.sent = 0

    def delta(self, text: str, finished: bool) -> str:
        end = len(text)
        if not finished:
            while end > 0 and text[end - 1] == "\ufffd":
                end -= 1
            end -= self.hold
        if end <= self.sent:
            return ""
        out = text[self.sent : end]
        self.sent = end
        return out


# ---------------------------------------------------------------------------------- the server

FRONTEND: web.AppKey[Frontend] = web.AppKey("pipelive_frontend")

GENERATE_KEYS = frozenset(
    {
        "prompt",
        "prompt_token_ids",
        "max_tokens",
        "temperature",
        "top_p",
        "top_k",
        "seed",
        "stop",
        "stop_token_ids",
        "ignore_eos",
        "logprobs",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
    }
)
RECONFIGURE_KEYS = frozenset({"plan", "mode", "pause_budget_ms", "max_rounds", "dry_run"})


class Frontend:
    """The HTTP front of one engine: JSON-RPC, the OpenAI-compatible API, health and metrics.

    `in_flight` maps the engine request ids this server submitted to their `Generation`; a
    request leaves it when its handler is done with it. Finished requests are also dropped
    from `engine.requests`, which would otherwise keep every request a server ever saw.
    """

    def __init__(self, engine: Engine, token: str, options: ServerOptions | None = None) -> None:
        if not isinstance(token, str) or not token:
            raise ConfigError("the RPC token must be a non-empty string")
        self.engine = engine
        self.options = options or ServerOptions()
        self.model_name = self.options.model_name or engine.loaded.name
        self.metrics = ServingMetrics()
        self.started = time.time()
        self.draining = False
        self.in_flight: dict[str, Generation] = {}
        self._token = token.encode("utf-8")
        self._force_abort: asyncio.Event | None = None
        self._methods: dict[str, Callable[[dict[str, Any]], Awaitable[Any]]] = {
            "generate": self._rpc_generate,
            "reconfigure": self._rpc_reconfigure,
            "reconfig_status": self._rpc_reconfig_status,
            "abort_reconfig": self._rpc_abort_reconfig,
            "validate_plan": self._rpc_validate_plan,
            "status": self._rpc_status,
            "metrics": self._rpc_metrics,
        }
        app = web.Application(middlewares=[self._error_middleware])
        app[FRONTEND] = self
        app.router.add_post("/rpc", self.handle_rpc)
        app.router.add_get("/v1/models", self.handle_models)
        app.router.add_post("/v1/completions", self.handle_completions)
        app.router.add_post("/v1/chat/completions", self.handle_chat)
        app.router.add_get("/health", self.handle_health)
        app.router.add_get("/metrics", self.handle_metrics)
        app.on_startup.append(self._on_startup)
        app.on_shutdown.append(self._on_shutdown)
        app.on_cleanup.append(self._on_cleanup)
        self.app = app

    # ------------------------------------------------------------------ lifecycle

    async def _on_startup(self, app: web.Application) -> None:
        self._force_abort = asyncio.Event()
        self.engine.start()

    async def _on_shutdown(self, app: web.Application) -> None:
        # Called once the listening sockets are closed: nothing new arrives from outside.
        await self.drain(self.options.drain_timeout_s)

    async def _on_cleanup(self, app: web.Application) -> None:
        await asyncio.to_thread(self.engine.stop)

    def force_abort(self) -> None:
        """Ends a drain now: in-flight requests are aborted (e.g. on a second Ctrl-C)."""
        if self._force_abort is not None:
            self._force_abort.set()

    async def drain(self, timeout_s: float) -> None:
        """Refuses new requests, lets in-flight ones finish for up to `timeout_s`, then aborts
        the rest (their callers get what was generated, finish_reason "abort")."""
        self.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self.in_flight and loop.time() < deadline:
            if self._force_abort is not None and self._force_abort.is_set():
                break
            await asyncio.sleep(0.02)
        if self.in_flight:
            ids = list(self.in_flight)
            log.warning("drain: aborting %d request(s) still in flight", len(ids))
            await asyncio.to_thread(self._abort_requests, ids)
            end = loop.time() + 5.0  # let their handlers answer
            while self.in_flight and loop.time() < end:
                await asyncio.sleep(0.02)

    def engine_alive(self) -> bool:
        # Engine has no public "is the loop running" yet; the thread is what start() made.
        thread = getattr(self.engine, "_thread", None)
        return thread is not None and thread.is_alive()

    # ------------------------------------------------------------------ requests

    async def submit(
        self, prompt: str | list[int], params: SamplingParams, prefix: str
    ) -> Generation:
        """Queues one request in the engine; raises ShuttingDown, RequestError."""
        if self.draining:
            raise ShuttingDown()
        loop = asyncio.get_running_loop()
        t = self.options.request_timeout_s
        rid = f"{prefix}-{uuid.uuid4().hex}"
        gen = Generation(rid, None if t is None else loop.time() + t, t, self.engine_alive)
        self.in_flight[rid] = gen
        try:
            await asyncio.to_thread(self.engine.add_request, prompt, params, rid, gen.push)
        except BaseException:
            self.in_flight.pop(rid, None)
            loop.run_in_executor(None, self._abort_requests, [rid])  # in case it got in
            raise
        return gen

    def release(self, gen: Generation) -> None:
        """The handler is done with `gen`: count it, and abort it if it is still running."""
        self.in_flight.pop(gen.request_id, None)
        if gen.finished:
            assert gen.last is not None
            self.metrics.observe_request(gen.last)
            self.engine.requests.pop(gen.request_id, None)
        else:
            if gen.timed_out:
                self.metrics.observe_request(gen.last, "timeout")
            asyncio.get_running_loop().run_in_executor(None, self._abort_requests, [gen.request_id])

    def _abort_requests(self, ids: list[str]) -> None:
        for rid in ids:
            self.engine.abort(rid)
            self.engine.requests.pop(rid, None)

    async def complete(
        self, prompt: str | list[int], params: SamplingParams, prefix: str
    ) -> RequestOutput:
        gen = await self.submit(prompt, params, prefix)
        try:
            out: RequestOutput = await until_answered(_http_request.get(), gen.result())
            return out
        finally:
            self.release(gen)

    # ------------------------------------------------------------------ HTTP plumbing

    @web.middleware
    async def _error_middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        openai = request.path.startswith("/v1/")
        _http_request.set(request)
        try:
            return await handler(request)
        except ClientGone:
            log.info(
                "client of %s %s hung up; its requests were aborted", request.method, request.path
            )
            return web.Response(status=499)  # nobody reads it ("client closed request")
        except ApiError as e:
            return e.response()
        except web.HTTPException as e:
            if openai and e.status >= 400:
                kind = "not_found_error" if e.status == 404 else "invalid_request_error"
                return ApiError(e.status, e.reason, type=kind).response()
            raise
        except BodyTooLarge as e:
            if openai:
                return ApiError(413, str(e), code="request_too_large").response()
            return web.json_response(
                _rpc_error(None, INVALID_REQUEST, str(e), {"limit_bytes": e.limit}),
                status=413,
                dumps=_dumps,
            )
        except Exception:
            error_id = uuid.uuid4().hex[:12]
            log.exception("internal error %s on %s %s", error_id, request.method, request.path)
            msg = f"internal server error (logged as {error_id})"
            if openai:
                return ApiError(500, msg, type="server_error", code="internal_error").response()
            if request.path == "/rpc":
                return web.json_response(
                    _rpc_error(None, INTERNAL_ERROR, msg, {"error_id": error_id}), dumps=_dumps
                )
            return web.json_response({"error": msg}, status=500)

    async def read_body(self, request: web.Request) -> bytes:
        limit = self.options.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise BodyTooLarge(limit)
        data = bytearray()
        async for chunk in request.content.iter_chunked(1 << 16):
            data += chunk
            if len(data) > limit:
                raise BodyTooLarge(limit)
        return bytes(data)

    def authorized(self, request: web.Request) -> bool:
        scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        try:
            given = credentials.strip().encode("utf-8", "surrogatepass")
        except UnicodeError:
            return False
        return hmac.compare_digest(given, self._token)

    # ------------------------------------------------------------------ JSON-RPC

    async def handle_rpc(self, request: web.Request) -> web.StreamResponse:
        body = await self.read_body(request)
        try:
            doc = parse_json(body)
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
            reason = "nesting too deep" if isinstance(e, RecursionError) else str(e)[:200]
            return self._rpc_response(
                _rpc_error(None, PARSE_ERROR, "parse error", {"reason": reason})
            )
        authorized = self.authorized(request)
        if isinstance(doc, list):
            if not doc:
                return self._rpc_response(
                    _rpc_error(None, INVALID_REQUEST, "invalid request: empty batch")
                )
            if len(doc) > self.options.max_batch:
                return self._rpc_response(
                    _rpc_error(
                        None,
                        INVALID_REQUEST,
                        f"invalid request: a batch holds at most {self.options.max_batch} calls",
                        {"batch_size": len(doc)},
                    )
                )
            answers = await asyncio.gather(*(self.call(item, authorized) for item in doc))
            replies = [a for a in answers if a is not None]
            return self._rpc_response(replies if replies else None)
        return self._rpc_response(await self.call(doc, authorized))

    def _rpc_response(self, payload: Any) -> web.Response:
        if payload is None:
            return web.Response(status=204)
        for item in payload if isinstance(payload, list) else [payload]:
            if "error" in item:
                self.metrics.rpc_errors.labels(code=str(item["error"]["code"])).inc()
        return web.json_response(payload, dumps=_dumps)

    async def call(self, item: Any, authorized: bool) -> dict[str, Any] | None:
        """One JSON-RPC call -> its response object, or None for a notification."""
        if not isinstance(item, dict):
            return _rpc_error(
                None,
                INVALID_REQUEST,
                "invalid request: a call must be a JSON object",
                {"got": type(item).__name__},
            )
        has_id = "id" in item
        rid = item.get("id")
        if isinstance(rid, bool) or not (rid is None or isinstance(rid, str | int | float)):
            return _rpc_error(
                None, INVALID_REQUEST, "invalid request: id must be a string, a number or null"
            )
        reply_id = rid if has_id else None
        if item.get("jsonrpc") != "2.0":
            return _rpc_error(reply_id, INVALID_REQUEST, 'invalid request: "jsonrpc" must be "2.0"')
        method = item.get("method")
        if not isinstance(method, str):
            return _rpc_error(reply_id, INVALID_REQUEST, "invalid request: method must be a string")
        params = item.get("params", {})
        if not isinstance(params, dict | list):
            return _rpc_error(
                reply_id, INVALID_REQUEST, "invalid request: params must be an object or an array"
            )
        try:
            result = await self._dispatch(method, params, authorized)
        except ClientGone:
            raise  # no answer to give: the client hung up
        except Exception as e:  # noqa: BLE001 - every failure becomes an error object
            err = self._error_object(e, method)
            return None if not has_id else {"jsonrpc": "2.0", "error": err, "id": rid}
        if not has_id:
            return None
        return {"jsonrpc": "2.0", "result": result, "id": rid}

    async def _dispatch(
        self, method: str, params: dict[str, Any] | list[Any], authorized: bool
    ) -> Any:
        fn = self._methods.get(method)
        if fn is None:
            raise RpcError(
                METHOD_NOT_FOUND,
                f"method not found: {_describe(method)}",
                {"methods": sorted(self._methods)},
            )
        if method in MUTATING_METHODS and not authorized:
            raise RpcError(
                UNAUTHORIZED,
                f"unauthorized: {method} needs the header 'Authorization: Bearer <token>' "
                f"(the token is in ${TOKEN_ENV} or the server's token file)",
            )
        if isinstance(params, list):
            if params:
                raise ParamError(None, "params must be an object with named parameters")
            params = {}
        return await fn(params)

    def _error_object(self, e: BaseException, method: str) -> dict[str, Any]:
        code, message, data = INTERNAL_ERROR, "", None
        if isinstance(e, RpcError):
            code, message, data = e.code, e.message, e.data
        elif isinstance(e, ParamError):
            code, message = INVALID_PARAMS, f"invalid params: {e.message}"
            data = {"param": e.param, "reason": e.message}
        elif isinstance(e, PlanError | RequestError):
            code, message = INVALID_PARAMS, f"invalid params: {e}"
            data = {"param": "plan" if isinstance(e, PlanError) else None, "reason": str(e)}
        elif isinstance(e, AdmissionError):
            code, message, data = PLAN_INFEASIBLE, f"plan infeasible: {e}", _jsonable(e.numbers)
        elif isinstance(e, ConfigError):
            code, message = PLAN_INFEASIBLE, f"plan infeasible: {e}"
            data = {"reason": str(e)}
        elif isinstance(e, ReconfigError):
            if "already in flight" in str(e):
                code, message = BUSY, f"busy: {e}"
                data = {"op_id": self._latest_op_id()}
            else:
                code, message = INVALID_PARAMS, f"invalid params: {e}"
                data = {"reason": str(e)}
        elif isinstance(e, RequestTimedOut):
            code, message = TIMED_OUT, str(e)
            data = {"timeout_s": e.timeout_s, "tokens_generated": e.tokens}
        elif isinstance(e, ShuttingDown):
            code, message = SHUTTING_DOWN, str(e)
        elif isinstance(e, EngineStopped | RequestFailed):
            code, message = INTERNAL_ERROR, str(e)
        elif isinstance(e, PipeliveError):
            code, message = INTERNAL_ERROR, str(e)
        else:
            error_id = uuid.uuid4().hex[:12]
            log.error("internal error %s in %s", error_id, method, exc_info=e)
            message = f"internal error (logged as {error_id})"
            data = {"error_id": error_id}
        err: dict[str, Any] = {"code": code, "message": message}
        if data is not None:
            err["data"] = data
        return err

    # ------------------------------------------------------------------ RPC methods

    async def _rpc_generate(self, p: dict[str, Any]) -> Any:
        _only(p, GENERATE_KEYS)
        prompt: str | list[int]
        if (p.get("prompt") is None) == (p.get("prompt_token_ids") is None):
            raise ParamError("prompt", "give exactly one of prompt (a string) or prompt_token_ids")
        if p.get("prompt") is not None:
            if not isinstance(p["prompt"], str) or not p["prompt"]:
                raise ParamError("prompt", "prompt must be a non-empty string")
            prompt = p["prompt"]
        else:
            ids = _token_ids_field(p, "prompt_token_ids", empty_ok=False)
            assert ids is not None
            prompt = ids
        params = sampling_params(p, max_tokens=16, temperature=0.0)
        out = await self.complete(prompt, params, "rpc")
        answer = {
            "request_id": out.request_id,
            "text": out.text,
            "token_ids": out.token_ids,
            "finish_reason": out.finish_reason,
            "metrics": _request_metrics(out),
        }
        if out.logprobs is not None:
            answer["logprobs"] = [
                {"token_id": t.token_id, "logprob": t.logprob, "top": [list(p) for p in t.top]}
                for t in out.logprobs
            ]
        return answer

    def _snapshot(self) -> tuple[dict[str, Any], PipelinePlan, dict[int, int]]:
        """(engine status, the serving plan, pages in use per device), from one locked read."""
        from pipelive_jax.plan import parse_plan

        status = self.engine.status()
        plan = parse_plan(status["plan"], num_layers=self.engine.defs.cfg.num_layers)
        used = {int(st["device"]): int(st["kv_pages_used"]) for st in status["stages"]}
        return status, plan, used

    def _parse_plan(self, spec: Any) -> PipelinePlan:
        from pipelive_jax.plan import parse_plan

        try:
            return parse_plan(
                spec,
                num_layers=self.engine.defs.cfg.num_layers,
                num_devices=len(self.engine.devices),
            )
        except PlanError:
            raise
        except (TypeError, ValueError) as e:  # a malformed plan the parser did not name
            raise PlanError(f"cannot read plan {_describe(spec)}: {e}") from None

    def _admission(
        self, source: PipelinePlan, target: PipelinePlan, used: dict[int, int]
    ) -> dict[str, Any]:
        """The admission verdict the controller would reach (DESIGN.md §4), changing nothing."""
        from pipelive_jax.memory import admit

        eng = self.engine
        c = eng.config
        try:
            if c.device_memory_bytes is not None:
                budgets = {}
                for d in sorted(set(source.devices) | set(target.devices)):
                    b = c.budget(d)
                    if b is not None:
                        budgets[d] = b
                adm = admit(
                    source, target, budgets, eng.shape, c.page_size, used, granule=c.page_granule
                )
                return {"ok": adm.ok, "reason": adm.reason, "numbers": _jsonable(adm.numbers())}
            need = max(used.values(), default=0)
            stages, reason = [], None
            for i, spec in enumerate(target.stages):
                fits = eng.pages_for_stage(target, i) - 1
                stages.append({"device": spec.devices[0], "pages_that_fit": fits})
                if need > fits and reason is None:
                    reason = (
                        f"device {spec.devices[0]}: {need} KV pages in use but the new stage "
                        f"holds {fits}"
                    )
            return {
                "ok": reason is None,
                "reason": reason,
                "numbers": {"pages_in_use": need, "stages": stages},
            }
        except (AdmissionError, ConfigError) as e:
            numbers = _jsonable(e.numbers) if isinstance(e, AdmissionError) else {}
            return {"ok": False, "reason": str(e), "numbers": numbers}

    def _estimate(
        self, source: PipelinePlan, target: PipelinePlan, used: dict[int, int]
    ) -> dict[str, Any]:
        """What a reconfiguration will move, from the plans and the pages in use now."""
        from pipelive_jax.plan import plan_diff

        shape = self.engine.shape
        diff = plan_diff(source, target)
        moved = diff.moved_layers
        pages = max(used.values(), default=0)
        weight = len(moved) * shape.weight_bytes_per_layer()
        if source.stages[0].devices != target.stages[0].devices:
            weight += shape.embed_bytes()
        if source.stages[-1].devices != target.stages[-1].devices:
            weight += shape.head_bytes()
        kv = len(moved) * pages * shape.page_bytes_per_layer(self.engine.config.page_size)
        return {
            "noop": diff.is_noop,
            "source": source.to_json(),
            "target": target.to_json(),
            "moved_layers": list(moved),
            "weight_bytes": weight,
            "kv_bytes_now": kv,
            "pages_in_use": pages,
        }

    async def _rpc_reconfigure(self, p: dict[str, Any]) -> Any:
        from pipelive_jax.reconfig.controller import MODES

        _only(p, RECONFIGURE_KEYS, required=("plan",))
        mode = "live" if p.get("mode") is None else p["mode"]
        if mode not in MODES:
            raise ParamError("mode", f"mode must be one of {list(MODES)}, got {_describe(mode)}")
        pause = _float_field(p, "pause_budget_ms", 10.0, minimum=0.0, exclusive_minimum=True)
        rounds = _int_field(p, "max_rounds", 8, minimum=1, maximum=1000)
        dry_run = _bool_field(p, "dry_run", False)
        return await asyncio.to_thread(
            self._reconfigure, p["plan"], str(mode), pause, rounds, dry_run
        )

    def _reconfigure(
        self, spec: Any, mode: str, pause: float, rounds: int | None, dry_run: bool
    ) -> Any:
        target = self._parse_plan(spec)
        status, source, used = self._snapshot()
        estimate = self._estimate(source, target, used)
        if dry_run:
            if status["reconfig"] is not None:
                raise RpcError(
                    BUSY, "busy: a reconfiguration is in flight", {"op_id": self._latest_op_id()}
                )
            verdict = self._admission(source, target, used)
            if not verdict["ok"]:
                raise RpcError(
                    PLAN_INFEASIBLE, f"plan infeasible: {verdict['reason']}", verdict["numbers"]
                )
            return {"dry_run": True, "admission": verdict, "estimate": estimate}
        handle = self.engine.reconfigure(
            target, mode=mode, pause_budget_ms=pause, max_rounds=rounds
        )
        index = next(
            i
            for i in range(len(self.engine.reconfig_history) - 1, -1, -1)
            if self.engine.reconfig_history[i].handle is handle
        )
        return {"op_id": _op_id(index), "estimate": estimate, "status": handle.status()}

    def _latest_op_id(self) -> str | None:
        n = len(self.engine.reconfig_history)
        return _op_id(n - 1) if n else None

    def _lookup_op(self, p: dict[str, Any], *, required: bool) -> tuple[int, Any] | None:
        op = p.get("op_id")
        history = self.engine.reconfig_history
        if op is None:
            if required:
                raise ParamError("op_id", "op_id is required")
            return (len(history) - 1, history[-1]) if history else None
        if not isinstance(op, str) or not op.startswith("op-") or not op[3:].isdecimal():
            raise ParamError("op_id", f"op_id looks like 'op-1', got {_describe(op)}")
        index = int(op[3:]) - 1
        if not 0 <= index < len(history):
            raise ParamError("op_id", f"no reconfiguration {op}")
        return index, history[index]

    def _op_status(self, index: int, ctl: Any) -> dict[str, Any]:
        handle = ctl.handle
        out = {"op_id": _op_id(index), "source": ctl.report.source, **handle.status()}
        if handle.done():
            report = handle.report().to_json()
            report.pop("error_traceback", None)  # server-side detail, never sent
            out["report"] = report
        plain: dict[str, Any] = _jsonable(out)
        return plain

    async def _rpc_reconfig_status(self, p: dict[str, Any]) -> Any:
        _only(p, frozenset({"op_id"}))
        found = self._lookup_op(p, required=False)
        self.metrics.sync_reconfigurations(self.engine.reconfig_history)
        return None if found is None else self._op_status(*found)

    async def _rpc_abort_reconfig(self, p: dict[str, Any]) -> Any:
        _only(p, frozenset({"op_id", "reason"}), required=("op_id",))
        reason = p.get("reason", "aborted over RPC")
        if not isinstance(reason, str):
            raise ParamError("reason", "reason must be a string")
        found = self._lookup_op(p, required=True)
        assert found is not None
        index, ctl = found
        requested = not ctl.handle.done()
        if requested:
            ctl.handle.abort(reason[:500])
        return {"abort_requested": requested, **self._op_status(index, ctl)}

    async def _rpc_validate_plan(self, p: dict[str, Any]) -> Any:
        _only(p, frozenset({"plan"}), required=("plan",))

        def verdict() -> dict[str, Any]:
            target = self._parse_plan(p["plan"])
            _, source, used = self._snapshot()
            return {
                **self._admission(source, target, used),
                "plan": target.to_json(),
                "estimate": self._estimate(source, target, used),
            }

        return await asyncio.to_thread(verdict)

    async def _rpc_status(self, p: dict[str, Any]) -> Any:
        _only(p, frozenset())
        status = await asyncio.to_thread(self.engine.status)
        return _jsonable(
            {
                **status,
                "model": self.model_name,
                "server": {
                    "uptime_s": time.time() - self.started,
                    "in_flight": len(self.in_flight),
                    "draining": self.draining,
                    "engine_loop_alive": self.engine_alive(),
                    "reconfigurations": len(self.engine.reconfig_history),
                },
            }
        )

    async def _rpc_metrics(self, p: dict[str, Any]) -> Any:
        _only(p, frozenset())
        status = await asyncio.to_thread(self.engine.status)
        self.metrics.sync_reconfigurations(self.engine.reconfig_history)
        return self.metrics.summary(status, len(self.in_flight))

    # ------------------------------------------------------------------ health and metrics

    async def handle_health(self, request: web.Request) -> web.Response:
        if self.draining:
            return web.json_response({"status": "draining"}, status=503)
        if not self.engine_alive():
            return web.json_response({"status": "engine loop not running"}, status=503)
        if self.engine.loop_errors_in_a_row >= FAILING_STEPS:
            # The loop survives a failing step and retries it; past a few in a row nothing is
            # being served, which a load balancer must hear of.
            return web.json_response(
                {
                    "status": "engine steps failing",
                    "failed_in_a_row": self.engine.loop_errors_in_a_row,
                    "last_error": self.engine.last_loop_error,
                },
                status=503,
            )
        return web.json_response({"status": "ok", "model": self.model_name})

    async def handle_metrics(self, request: web.Request) -> web.Response:
        status = await asyncio.to_thread(self.engine.status)
        self.metrics.sync_reconfigurations(self.engine.reconfig_history)
        self.metrics.refresh(status)
        return web.Response(
            body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    # ------------------------------------------------------------------ OpenAI-compatible API

    async def handle_models(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "object": "list",
                "data": [
                    {
                        "id": self.model_name,
                        "object": "model",
                        "created": int(self.started),
                        "owned_by": "pipelive-jax",
                        "max_model_len": self.engine.config.max_model_len,
                    }
                ],
            }
        )

    async def _openai_body(self, request: web.Request) -> dict[str, Any]:
        try:
            body = parse_json(await self.read_body(request))
        except (ValueError, RecursionError):
            raise ApiError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != self.model_name:
            raise ApiError(
                404,
                f"the model {_describe(model)} does not exist; this server serves "
                f"{self.model_name!r}",
                param="model",
                code="model_not_found",
            )
        if self.draining:
            raise ApiError(
                503, "the server is shutting down", type="server_error", code="shutting_down"
            )
        n = body.get("n")
        if n is not None and n != 1:
            raise ApiError(400, "only n=1 is supported", param="n")
        best_of = body.get("best_of")
        if best_of is not None and best_of != 1:
            raise ApiError(400, "only best_of=1 is supported", param="best_of")
        if body.get("logit_bias"):
            raise ApiError(400, "logit_bias is not supported", param="logit_bias")
        return body

    @staticmethod
    def _openai_params(body: dict[str, Any], *, max_tokens: int, chat: bool) -> SamplingParams:
        try:
            name = "max_tokens"
            if chat and body.get("max_completion_tokens") is not None:
                name = "max_completion_tokens"
            if not chat and body.get("logprobs") is False:
                body = {k: v for k, v in body.items() if k != "logprobs"}  # "off", as before
            if chat:
                # Chat asks with logprobs: true and top_logprobs: k; completions with logprobs: k.
                if body.get("logprobs") in (0, 1) and not isinstance(body["logprobs"], bool):
                    body = {**body, "logprobs": bool(body["logprobs"])}
                want = _bool_field(body, "logprobs", False)
                top = _int_field(body, "top_logprobs", None, minimum=0, maximum=MAX_LOGPROBS)
                if top is not None and not want:
                    raise ParamError("top_logprobs", "top_logprobs needs logprobs: true")
                body = {k: v for k, v in body.items() if k not in ("logprobs", "top_logprobs")}
                if want:
                    body["logprobs"] = top or 0
            return sampling_params(
                body, max_tokens=max_tokens, temperature=1.0, max_tokens_name=name
            )
        except ParamError as e:
            raise ApiError(400, e.message, param=e.param) from None

    @staticmethod
    def _stream_options(body: dict[str, Any]) -> tuple[bool, bool]:
        stream = body.get("stream")
        if stream is not None and not isinstance(stream, bool):
            raise ApiError(400, "stream must be true or false", param="stream")
        opts = body.get("stream_options")
        if opts is not None and not isinstance(opts, dict):
            raise ApiError(400, "stream_options must be an object", param="stream_options")
        usage = bool(opts.get("include_usage")) if opts else False
        return bool(stream), usage

    async def _submit_openai(
        self, prompt: str | list[int], params: SamplingParams, prefix: str, param: str
    ) -> Generation:
        try:
            return await self.submit(prompt, params, prefix)
        except RequestError as e:
            raise ApiError(400, str(e), param=param) from None
        except ShuttingDown as e:
            raise ApiError(503, str(e), type="server_error", code="shutting_down") from None

    def _prompts(self, body: dict[str, Any]) -> list[str | list[int]]:
        p = body.get("prompt")
        bad = ApiError(
            400,
            "prompt must be a string, a list of strings, a list of token ids, or a list of lists "
            "of token ids",
            param="prompt",
        )
        if isinstance(p, str):
            return [p]
        if not isinstance(p, list) or not p:
            raise bad
        if all(_is_int(t) for t in p):
            return [list(p)]
        if all(isinstance(s, str) for s in p) or all(
            isinstance(s, list) and s and all(_is_int(t) for t in s) for s in p
        ):
            if len(p) > self.options.max_prompts:
                raise ApiError(400, f"at most {self.options.max_prompts} prompts", param="prompt")
            return list(p)
        raise bad

    async def handle_completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._openai_body(request)
        for name in ("echo",):
            if body.get(name):
                raise ApiError(400, f"{name} is not supported", param=name)
        if body.get("suffix") is not None:
            raise ApiError(400, "suffix is not supported", param="suffix")
        prompts = self._prompts(body)
        params = self._openai_params(body, max_tokens=16, chat=False)
        stream, include_usage = self._stream_options(body)
        gens: list[Generation] = []
        try:
            for prompt in prompts:
                gens.append(await self._submit_openai(prompt, params, "cmpl", "prompt"))
            cid = f"cmpl-{gens[0].request_id.split('-', 1)[1]}"
            created = int(time.time())
            if stream:
                return await self._stream_completion(
                    request, gens, params, cid, created, include_usage
                )
            outs = await until_answered(request, asyncio.gather(*(g.result() for g in gens)))
        except RequestTimedOut as e:
            raise ApiError(504, str(e), type="server_error", code="timeout") from None
        except RequestFailed as e:
            raise ApiError(500, str(e), type="server_error", code="generation_failed") from None
        except EngineStopped as e:
            raise ApiError(503, str(e), type="server_error", code="engine_stopped") from None
        finally:
            for g in gens:
                self.release(g)
        return web.json_response(
            {
                "id": cid,
                "object": "text_completion",
                "created": created,
                "model": self.model_name,
                "choices": [
                    {
                        "index": i,
                        "text": out.text,
                        "logprobs": self._completion_logprobs(out.logprobs),
                        "finish_reason": out.finish_reason,
                        "token_ids": out.token_ids,
                    }
                    for i, out in enumerate(outs)
                ],
                "usage": _usage(outs),
            },
            dumps=_dumps,
        )

    async def handle_chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._openai_body(request)
        if body.get("tools"):
            raise ApiError(400, "tools are not supported", param="tools")
        fmt = body.get("response_format")
        if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
            raise ApiError(
                400, "only response_format {'type': 'text'} is supported", param="response_format"
            )
        tok = self.engine.tokenizer
        if tok is None or not getattr(tok, "chat_template", None):
            raise ApiError(400, f"model {self.model_name!r} has no chat template", param="messages")
        messages = _chat_messages(body.get("messages"))
        try:
            prompt = tok.apply_chat_template(messages)
        except Exception as e:  # noqa: BLE001 - jinja errors of the model's own template
            raise ApiError(
                400, f"the chat template refused the messages: {e}", param="messages"
            ) from None
        params = self._openai_params(body, max_tokens=self.engine.config.max_model_len, chat=True)
        stream, include_usage = self._stream_options(body)
        gen = await self._submit_openai(prompt, params, "chatcmpl", "messages")
        cid = gen.request_id
        created = int(time.time())
        try:
            if stream:
                return await self._stream_chat(request, gen, params, cid, created, include_usage)
            out = await until_answered(request, gen.result())
        except RequestTimedOut as e:
            raise ApiError(504, str(e), type="server_error", code="timeout") from None
        except RequestFailed as e:
            raise ApiError(500, str(e), type="server_error", code="generation_failed") from None
        except EngineStopped as e:
            raise ApiError(503, str(e), type="server_error", code="engine_stopped") from None
        finally:
            self.release(gen)
        return web.json_response(
            {
                "id": cid,
                "object": "chat.completion",
                "created": created,
                "model": self.model_name,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": out.text},
                        "logprobs": self._chat_logprobs(out.logprobs),
                        "finish_reason": out.finish_reason,
                    }
                ],
                "usage": _usage([out]),
            },
            dumps=_dumps,
        )

    # ------------------------------------------------------------------ server-sent events

    async def _sse_start(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            }
        )
        await resp.prepare(request)
        return resp

    @staticmethod
    async def _sse(resp: web.StreamResponse, payload: Any) -> None:
        data = payload if isinstance(payload, str) else _dumps(payload)
        await resp.write(f"data: {data}\n\n".encode())

    async def _stream_completion(
        self,
        request: web.Request,
        gens: list[Generation],
        params: SamplingParams,
        cid: str,
        created: int,
        include_usage: bool,
    ) -> web.StreamResponse:
        resp = await self._sse_start(request)
        queue: asyncio.Queue[tuple[int, RequestOutput | None, BaseException | None]] = (
            asyncio.Queue()
        )

        async def pump(i: int, g: Generation) -> None:
            try:
                while True:
                    out = await g.next()
                    await queue.put((i, out, None))
                    if out.finished:
                        return
            except Exception as e:  # noqa: BLE001 - handed to the writer
                await queue.put((i, None, e))

        tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
        deltas = [TextDeltas(params.stop) for _ in gens]
        lp_deltas = [LogprobDeltas() for _ in gens]
        finals: list[RequestOutput | None] = [None] * len(gens)
        try:
            while any(f is None for f in finals):
                i, out, err = await queue.get()
                if err is not None:
                    await self._sse_error(resp, err)
                    return resp
                assert out is not None
                text = deltas[i].delta(out.text, out.finished)
                new = lp_deltas[i].take(out)
                if text or out.finished or new:
                    await self._sse(
                        resp,
                        {
                            "id": cid,
                            "object": "text_completion",
                            "created": created,
                            "model": self.model_name,
                            "choices": [
                                {
                                    "index": i,
                                    "text": text,
                                    "logprobs": self._completion_logprobs(new, lp_deltas[i]),
                                    "finish_reason": out.finish_reason if out.finished else None,
                                }
                            ],
                        },
                    )
                if out.finished:
                    finals[i] = out
            if include_usage:
                await self._sse(
                    resp,
                    {
                        "id": cid,
                        "object": "text_completion",
                        "created": created,
                        "model": self.model_name,
                        "choices": [],
                        "usage": _usage([f for f in finals if f is not None]),
                    },
                )
            await self._sse(resp, "[DONE]")
        except ConnectionError:
            pass  # the client went away; release() aborts what still runs
        finally:
            for t in tasks:
                t.cancel()
        return resp

    async def _stream_chat(
        self,
        request: web.Request,
        gen: Generation,
        params: SamplingParams,
        cid: str,
        created: int,
        include_usage: bool,
    ) -> web.StreamResponse:
        resp = await self._sse_start(request)
        deltas = TextDeltas(params.stop)

        def chunk(
            delta: dict[str, Any], finish: str | None, logprobs: Any = None
        ) -> dict[str, Any]:
            return {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": self.model_name,
                "choices": [
                    {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
                ],
            }

        lp_sent = LogprobDeltas()
        try:
            await self._sse(resp, chunk({"role": "assistant", "content": ""}, None))
            while True:
                try:
                    out = await gen.next()
                except (RequestTimedOut, EngineStopped, RequestFailed) as e:
                    await self._sse_error(resp, e)
                    return resp
                text = deltas.delta(out.text, out.finished)
                new = lp_sent.take(out)
                if text or new:
                    await self._sse(resp, chunk({"content": text}, None, self._chat_logprobs(new)))
                if out.finished:
                    await self._sse(resp, chunk({}, out.finish_reason))
                    break
            if include_usage:
                usage = chunk({}, None)
                usage["choices"] = []
                usage["usage"] = _usage([out])
                await self._sse(resp, usage)
            await self._sse(resp, "[DONE]")
        except ConnectionError:
            pass
        return resp

    # ------------------------------------------------------------------ log-probabilities

    def _piece(self, token_id: int) -> str:
        tok = self.engine.tokenizer
        return tok.decode([token_id]) if tok is not None else f"token_id:{token_id}"

    def _completion_logprobs(
        self, lps: list[TokenLogprob] | None, stream: LogprobDeltas | None = None
    ) -> dict[str, Any] | None:
        """OpenAI completions' `logprobs` object for these tokens (None: not asked for). In a
        stream, text offsets go on from the pieces of earlier chunks (`stream` keeps count).
        As in vLLM, top_logprobs holds the generated token too (up to k + 1 entries)."""
        if lps is None:
            return None
        tokens = [self._piece(t.token_id) for t in lps]
        offsets, at = [], stream.offset if stream is not None else 0
        for piece in tokens:
            offsets.append(at)
            at += len(piece)
        if stream is not None:
            stream.offset = at
        return {
            "tokens": tokens,
            "token_logprobs": [t.logprob for t in lps],
            "top_logprobs": [
                {self._piece(i): lp for i, lp in [*t.top, (t.token_id, t.logprob)]} for t in lps
            ],
            "text_offset": offsets,
        }

    def _chat_logprobs(self, lps: list[TokenLogprob] | None) -> dict[str, Any] | None:
        """OpenAI chat's `logprobs` object for these tokens (None: not asked for)."""
        if lps is None:
            return None

        def entry(token_id: int, logprob: float) -> dict[str, Any]:
            piece = self._piece(token_id)
            return {"token": piece, "logprob": logprob, "bytes": list(piece.encode("utf-8"))}

        return {
            "content": [
                {**entry(t.token_id, t.logprob), "top_logprobs": [entry(i, lp) for i, lp in t.top]}
                for t in lps
            ]
        }

    async def _sse_error(self, resp: web.StreamResponse, err: BaseException) -> None:
        if isinstance(err, RequestTimedOut):
            e = ApiError(504, str(err), type="server_error", code="timeout")
        elif isinstance(err, EngineStopped):
            e = ApiError(503, str(err), type="server_error", code="engine_stopped")
        elif isinstance(err, RequestFailed):
            e = ApiError(500, str(err), type="server_error", code="generation_failed")
        else:
            error_id = uuid.uuid4().hex[:12]
            log.error("internal error %s while streaming", error_id, exc_info=err)
            e = ApiError(500, f"internal server error (logged as {error_id})", type="server_error")
        await self._sse(
            resp,
            {"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}},
        )


class LogprobDeltas:
    """What of a request's log-probabilities a stream has sent: each chunk carries those of
    the tokens since the last (so an abort's or a drain's final output repeats none), and
    completions' text offsets go on from there.

    They may run ahead of the chunk's text, which TextDeltas holds back at a stop string's
    possible start or an incomplete character (as in vLLM)."""

    def __init__(self) -> None:
        self.sent = 0
        self.offset = 0

    def take(self, out: RequestOutput) -> list[TokenLogprob] | None:
        if out.logprobs is None or len(out.logprobs) <= self.sent:
            return None
        new = out.logprobs[self.sent :]
        self.sent = len(out.logprobs)
        return new


def _op_id(index: int) -> str:
    return f"op-{index + 1}"


def _rpc_error(rid: Any, code: int, message: str, data: Any = None) -> dict[str, Any]:
    err: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        err["data"] = data
    return {"jsonrpc": "2.0", "error": err, "id": rid}


def _jsonable(obj: Any) -> Any:
    """Plain JSON types (dict keys as strings; numpy scalars as numbers)."""
    return json.loads(json.dumps(obj, default=_json_default))


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if dataclasses.is_dataclass(o) and not isinstance(o, type):
        return dataclasses.asdict(o)
    return str(o)


def _usage(outs: list[RequestOutput]) -> dict[str, int]:
    prompt = sum(len(o.prompt_token_ids) for o in outs)
    completion = sum(len(o.token_ids) for o in outs)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


# The roles of OpenAI chat messages that carry text ("tool" needs tool calls, unsupported).
CHAT_ROLES = ("system", "developer", "user", "assistant")


def _chat_messages(messages: Any) -> list[dict[str, str]]:
    """OpenAI chat messages -> [{"role", "content"}] with text content (parts joined)."""
    bad = "messages must be a non-empty list of {'role': str, 'content': str or text parts}"
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, bad, param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(400, f"messages[{i}]: {bad}", param="messages")
        if m["role"] not in CHAT_ROLES:
            raise ApiError(
                400,
                f"messages[{i}]: unknown role {m['role']!r}; use one of {', '.join(CHAT_ROLES)}",
                param="messages",
            )
        content = m.get("content")
        if content is None and m["role"] != "assistant":  # OpenAI: only an assistant's is optional
            raise ApiError(
                400, f"messages[{i}]: a {m['role']} message needs content", param="messages"
            )
        if content is None:
            content = ""
        elif isinstance(content, list):
            parts = []
            for part in content:
                if (
                    not isinstance(part, dict)
                    or part.get("type") != "text"
                    or not isinstance(part.get("text"), str)
                ):
                    raise ApiError(
                        400,
                        f"messages[{i}]: only text content parts are supported",
                        param="messages",
                    )
                parts.append(part["text"])
            content = "".join(parts)
        elif not isinstance(content, str):
            raise ApiError(400, f"messages[{i}]: {bad}", param="messages")
        if (problem := text_problem(content)) is not None:
            raise ApiError(
                400, f"messages[{i}]: content is not valid text: {problem}", param="messages"
            )
        # OpenAI's "developer" is the system prompt of newer models; the templates know "system".
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": content})
    return out


# ---------------------------------------------------------------------------------- entry points


def create_app(
    engine: Engine, *, token: str, options: ServerOptions | None = None
) -> web.Application:
    """The aiohttp app for `engine`. Starting the app starts the engine loop; shutting it down
    drains in-flight requests (`options.drain_timeout_s`) and stops the loop. The `Frontend` is
    `app[FRONTEND]`."""
    return Frontend(engine, token, options).app


def resolve_token(token_file: str | None = None) -> tuple[str, str | None]:
    """(token, the file it was written to): `$PIPELIVE_RPC_TOKEN` if set (nothing written),
    else a fresh random token written to `token_file` (default `default_token_path()`), mode
    0600, in a directory only the user can enter if it is created here."""
    env = os.environ.get(TOKEN_ENV, "").strip()
    if env:
        return env, None
    path = os.path.abspath(os.path.expanduser(token_file or default_token_path()))
    token = secrets.token_urlsafe(32)
    directory = os.path.dirname(path)
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, (token + "\n").encode())
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        raise ConfigError(f"cannot write the RPC token file {path}: {e.strerror or e}") from e
    return token, path


def _url(address: Any) -> str:
    host, port = address[0], address[1]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class BackgroundServer:
    """Serves an app on its own thread and event loop (tests and benchmarks).

    `with BackgroundServer(app) as srv: ... srv.url ...`; `stop()` shuts down as a signal
    would (drain, then stop the engine loop).
    """

    def __init__(self, app: web.Application, host: str = "127.0.0.1", port: int = 0) -> None:
        self.app = app
        self.host = host
        self.port = port
        self.url = ""
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None

    @property
    def frontend(self) -> Frontend:
        return self.app[FRONTEND]

    def start(self, timeout: float = 120.0) -> BackgroundServer:
        self._thread = threading.Thread(target=self._run, name="pipelive-http", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("the server did not start")
        if self._error is not None:
            raise self._error
        return self

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._main())
        except BaseException as e:  # noqa: BLE001 - reported to start()
            self._error = e
            self._ready.set()
        finally:
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()

    async def _main(self) -> None:
        runner = web.AppRunner(self.app, handle_signals=False, shutdown_timeout=10.0)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self.port)
            await site.start()
            self.url = _url(runner.addresses[0])
            self._stop = asyncio.Event()
            self._ready.set()
            await self._stop.wait()
        finally:
            await runner.cleanup()

    def stop(self, timeout: float = 120.0) -> None:
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(stop.set)
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


async def _serve_until_signal(
    frontend: Frontend, host: str, port: int, announce: Callable[[str], None]
) -> None:
    runner = web.AppRunner(frontend.app, handle_signals=False, shutdown_timeout=10.0)
    await runner.setup()  # starts the engine loop
    try:
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as e:
            raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e
        announce(f"listening on {_url(runner.addresses[0])}")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        signals = 0

        def on_signal() -> None:
            nonlocal signals
            signals += 1
            if signals == 1:
                frontend.draining = True
                stop.set()
            else:
                frontend.force_abort()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)
        await stop.wait()
        n = len(frontend.in_flight)
        announce(
            f"shutting down: {n} request(s) in flight, draining for up to "
            f"{frontend.options.drain_timeout_s:g} s (signal again to abort them now)"
        )
    finally:
        await runner.cleanup()  # closes the listener, drains, stops the engine loop
    announce("stopped")


def serve(
    model: str | LoadedModel,
    plan: Any = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    config: EngineConfig | Mapping[str, Any] | None = None,
    *,
    token_file: str | None = None,
    options: ServerOptions | None = None,
    dtype: str = "float32",
    seed: int = 0,
    announce: Callable[[str], None] | None = None,
) -> int:
    """Loads `model`, builds the engine on `plan`, serves until SIGINT/SIGTERM, returns 0.

    JAX must be set up (devices) before this is called: `pipelive serve` does that.
    """
    from pipelive_jax.models.registry import LoadedModel, load_model
    from pipelive_jax.serving.engine import Engine, EngineConfig

    def say(msg: str) -> None:
        print(f"pipelive serve: {msg}", flush=True)

    announce = announce or say
    if isinstance(config, Mapping):
        try:
            config = EngineConfig(**config)
        except TypeError as e:
            raise ConfigError(f"unknown engine option: {e}") from e
    token, path = resolve_token(token_file)
    loaded = (
        model
        if isinstance(model, LoadedModel)
        else load_model(model, dtype=dtype, progress=True, seed=seed)
    )
    engine = Engine(loaded, plan, config=config)
    frontend = Frontend(engine, token, options)
    announce(f"model {frontend.model_name}, plan {engine.plan}, backend {engine.backend}")
    if path is not None:
        announce(f"RPC token written to {path} (mode 0600)")
    else:
        announce(f"RPC token from ${TOKEN_ENV}")
    if host not in LOOPBACK_HOSTS:
        announce(f"warning: listening on {host}, not loopback: generation and status need no token")
    asyncio.run(_serve_until_signal(frontend, host, port, announce))
    return 0

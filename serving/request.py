"""A request's host-side state and what users see of it (`RequestOutput`)."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import numpy as np

from pipelive_jax.serving.sampling import SamplingParams, TokenLogprob


class RequestState(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class RequestMetrics:
    """Wall-clock times (time.perf_counter seconds) and the derived latencies."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    token_times: list[float] = field(default_factory=list)
    preemptions: int = 0

    @property
    def ttft(self) -> float | None:
        """Time to first token (s)."""
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first (s)."""
        if len(self.token_times) < 2:
            return None
        return (self.token_times[-1] - self.token_times[0]) / (len(self.token_times) - 1)

    @property
    def itl(self) -> list[float]:
        """Inter-token latencies (s)."""
        return list(np.diff(self.token_times)) if len(self.token_times) > 1 else []

    @property
    def e2e(self) -> float | None:
        if self.finished_time is None:
            return None
        return self.finished_time - self.arrival_time


def text_problem(text: str) -> str | None:
    """Why `text` cannot be tokenized (a lone surrogate, which JSON can carry: "\\ud800"), or
    None. The tokenizer would fail with a TypeError that names nothing."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"{e.reason} at character {e.start} ({text[e.start : e.end]!r})"
    return None


@dataclass
class RequestOutput:
    """A snapshot of one request, returned by `Engine.step`, `Engine.stream` and `LLM.generate`.

    finish_reason: "stop" (EOS, a stop token or string), "length" (max_tokens or max_model_len),
    "abort" (aborted: by the caller, a client that hung up, a drain), "error" (ended by a fault
    of the engine, `error` says which; the other requests go on), None while running.
    """

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finished: bool
    finish_reason: str | None
    metrics: RequestMetrics
    new_token_ids: list[int] = field(default_factory=list)
    error: str | None = None  # why, when finish_reason is "error" (a server fault, not the input)
    logprobs: list[TokenLogprob] | None = None  # per token_ids entry, when params.logprobs is set


class Request:
    """A request as the engine tracks it.

    `num_computed` counts tokens whose KV is in the cache; the tokens to feed are
    `all_tokens[num_computed:]`. After a preemption `num_computed` drops to 0 and the prompt
    plus the tokens generated so far are prefilled again (recompute), keeping `output_ids` and
    the sampler's generator, so the request continues exactly where it was.
    """

    def __init__(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        arrival: float | None = None,
    ) -> None:
        self.request_id = request_id
        self.prompt_ids = list(prompt_ids)
        self.output_ids: list[int] = []
        self.params = params
        self.state = RequestState.WAITING
        self.num_computed = 0
        self.finish_reason: str | None = None
        self.text = ""
        self.rng = np.random.default_rng(params.seed)
        self.metrics = RequestMetrics(
            arrival_time=arrival if arrival is not None else time.perf_counter()
        )
        self.new_ids: list[int] = []  # tokens produced by the latest step (for streaming)
        self.error: str | None = None
        self.logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None

    @property
    def all_tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.state is RequestState.FINISHED

    def to_output(self) -> RequestOutput:
        out = RequestOutput(
            request_id=self.request_id,
            prompt_token_ids=list(self.prompt_ids),
            token_ids=list(self.output_ids),
            text=self.text,
            finished=self.finished,
            finish_reason=self.finish_reason,
            metrics=self.metrics,
            new_token_ids=list(self.new_ids),
            error=self.error,
            logprobs=list(self.logprobs) if self.logprobs is not None else None,
        )
        return out

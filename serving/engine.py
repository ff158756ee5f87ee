"""The engine loop: continuous batching over a pipeline of stages, with live reconfiguration.

`Engine.step()` is one iteration: advance a reconfiguration that is in flight (at this step
boundary), schedule, build the packed batch, run the stages, sample, stream. The engine is
single-threaded by design; `start()` runs the loop on its own thread for servers, and every
public method is safe to call from other threads (one lock guards the loop).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pipelive_jax.config import KV_CACHE_DTYPES
from pipelive_jax.errors import ConfigError, ReconfigError, RequestError
from pipelive_jax.kernels import BACKENDS, default_backend
from pipelive_jax.kv.pages import PageTable
from pipelive_jax.kv.pools import StagePools
from pipelive_jax.memory import (
    DeviceBudget,
    ModelShape,
    max_pages,
    round_capacity,
    stage_extra_bytes,
)
from pipelive_jax.models.llama import ModelDefs, split_model
from pipelive_jax.models.registry import LoadedModel
from pipelive_jax.plan import PipelinePlan, parse_plan
from pipelive_jax.serving.pipeline import (
    BatchShape,
    CompileCache,
    PipelineExecutor,
    StageRuntime,
    StepBatch,
    bucket,
    kv_spec_for,
    place_stage_params,
    start_compile_thread,
)
from pipelive_jax.serving.request import Request, RequestOutput, text_problem
from pipelive_jax.serving.sampling import (
    SamplingParams,
    apply_penalties,
    sample_token,
    token_logprob,
)
from pipelive_jax.serving.scheduler import ScheduledSeq, Scheduler, SchedulerConfig

log = logging.getLogger("pipelive.engine")


@dataclass
class EngineConfig:
    """Engine options (also the `**engine_options` of `LLM`).

    num_pages: KV capacity per stage (pages, page 0 included): an int for every stage or a
      list per stage. When None, it comes from `device_memory_bytes` by the admission rule
      (DESIGN.md §4), capped at the pages `max_num_seqs` sequences of `max_model_len` tokens
      can hold (`useful_pages`), or defaults to 512.
    device_memory_bytes: budget per device: an int for all, or {device id: bytes}.
    kv_resize: False pools stages once for the most layers they may hold (the no-resize baseline).
    background_compile: a batch whose shape is not compiled yet runs on a bigger compiled shape
      (padding) while its own compiles on a background thread, instead of waiting for the
      compile (seconds on CPU). Off by default: which shape a step runs on then depends on
      timing, and float results may differ in the last bits between shapes.
    finished_retention: finished requests kept for `get_output` (the most recent ones); older
      ones are dropped, so a server's memory does not grow with every request it ever served.
    kv_cache_dtype: the KV cache's dtype: "auto" is the model's dtype, except on CPU, where it is
      float32 (XLA's CPU scatter into a bf16 pool copies the pool: a decode step's KV write took
      4 ms per layer instead of 0.01 ms); or "float32", "bfloat16", "float16".
    """

    page_size: int = 16
    num_pages: int | list[int] | None = None
    device_memory_bytes: int | dict[int, int] | None = None
    memory_utilization: float = 0.9
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 512
    max_model_len: int = 1024
    backend: str | None = None
    num_microbatches: int = 1
    kv_resize: bool = True
    page_granule: int = 16
    background_compile: bool = False
    finished_retention: int = 10_000
    kv_cache_dtype: str = "auto"

    def __post_init__(self) -> None:
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ConfigError(
                f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}"
            )
        if self.backend is not None and self.backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.page_size < 1 or self.page_size & (self.page_size - 1):
            raise ConfigError(f"page_size must be a power of two, got {self.page_size}")
        if self.num_microbatches < 1:
            raise ConfigError(f"num_microbatches must be >= 1, got {self.num_microbatches}")
        if not isinstance(self.finished_retention, int) or self.finished_retention < 0:
            raise ConfigError(
                f"finished_retention must be an integer >= 0, got {self.finished_retention!r}"
            )
        if not 0 < self.memory_utilization <= 1:
            raise ConfigError(
                f"memory_utilization must be in (0, 1], got {self.memory_utilization}"
            )

    @property
    def useful_pages(self) -> int:
        """The most pages a stage can ever have in use (page 0 included, rounded up to the
        granule): max_num_seqs running sequences of at most max_model_len tokens each. A
        budget-derived capacity stops there: pages past it are never used (no request is
        longer, and no more run at once), and growing pools into them after a reconfiguration
        copied every layer's KV at one step boundary for nothing (seconds, in scale-out)."""
        per_seq = -(-self.max_model_len // self.page_size)
        return round_capacity(1 + self.max_num_seqs * per_seq, self.page_granule, mode="up")

    @property
    def scheduler(self) -> SchedulerConfig:
        return SchedulerConfig(self.max_num_seqs, self.max_num_batched_tokens, self.max_model_len)

    def budget(self, device: int) -> DeviceBudget | None:
        m = self.device_memory_bytes
        if m is None:
            return None
        if isinstance(m, dict):
            if device not in m:
                raise ConfigError(f"device_memory_bytes has no entry for device {device}")
            m = m[device]
        return DeviceBudget(device=device, memory_bytes=int(m), utilization=self.memory_utilization)


def model_shape(defs: ModelDefs, kv_dtype: Any = None) -> ModelShape:
    cfg = defs.cfg
    return ModelShape(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_heads=cfg.num_heads,
        num_kv_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        vocab_size=cfg.vocab_size,
        tie_embeddings=cfg.tie_embeddings,
        dtype_bytes=cfg.jnp_dtype.itemsize,
        kv_dtype_bytes=None if kv_dtype is None else jnp.dtype(kv_dtype).itemsize,
    )


def long_needed(shape: BatchShape) -> int:
    """Sequences with more than one token a batch of `shape` may have (0 for decode shapes)."""
    return 0 if shape.max_q_len == 1 else shape.long_rows


def long_capacity(shape: BatchShape) -> int:
    """How many such sequences a compiled `shape` serves correctly (its attention's bound)."""
    return shape.long_rows


def resolve_kv_dtype(option: str, model_dtype: str, platform: str) -> Any:
    """The KV cache dtype for `EngineConfig.kv_cache_dtype` (see there for "auto")."""
    if option == "auto":
        return jnp.dtype("float32" if platform == "cpu" else model_dtype)
    return jnp.dtype(option)


class Engine:
    """A serving engine over one model and a pipeline plan.

    Public surface: `add_request`, `step`, `has_unfinished`, `abort`, `stream`, `reconfigure`,
    `status`, `start`/`stop` (background loop).
    """

    def __init__(
        self,
        loaded: LoadedModel,
        plan: Any = None,
        config: EngineConfig | None = None,
        **options: Any,
    ) -> None:
        if config is None:
            try:
                config = EngineConfig(**options)
            except TypeError as e:
                raise ConfigError(f"unknown engine option: {e}") from e
        elif options:
            raise ConfigError("pass either config= or engine options, not both")
        self.config = config
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.devices = jax.devices()
        self.backend = config.backend or default_backend()
        defs, embed, states, head = split_model(loaded.model)
        self.defs = defs
        self.kv_dtype = resolve_kv_dtype(
            config.kv_cache_dtype, defs.cfg.dtype, self.devices[0].platform
        )
        self.shape = model_shape(defs, self.kv_dtype)
        # The weights as loaded: where stages take their layers from at start-up and restart.
        self._weights = (embed, states, head)
        self.plan = parse_plan(plan, num_layers=defs.cfg.num_layers, num_devices=len(self.devices))
        self.kv_spec = kv_spec_for(defs, config.page_size, self.kv_dtype)
        self.cache = CompileCache(defs, self.backend)
        self.executor = PipelineExecutor(defs, self._build_stages(self.plan), self.cache)
        self.scheduler = Scheduler(config.scheduler, self.executor.page_tables)
        self._check_capacity()
        self.requests: dict[str, Request] = {}
        self._finished: collections.deque[Request] = collections.deque()
        self._ids = itertools.count()
        self._lock = threading.RLock()
        self._subscribers: dict[str, list[Callable[[RequestOutput], None]]] = {}
        self._thread: threading.Thread | None = None
        self.loop_errors = 0  # steps of the background loop that raised (logged, survived)
        self.last_loop_error: str | None = None
        self.loop_errors_in_a_row = 0  # since the last step that ran through (0: healthy)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self.reconfig: Any = None  # the ReconfigController in flight, if any
        self.reconfig_history: list[Any] = []
        self.step_count = 0
        self.last_step_end: float | None = None
        self.step_hooks: list[Callable[[Engine], None]] = []
        self._shapes_seen: dict[BatchShape, int] = {}
        self._bg_compiles: set[BatchShape] = set()  # shapes compiling in the background
        self._bg_failed: set[BatchShape] = set()  # background compiles that raised
        self._bg_compile_lock = threading.Lock()
        # Set (by `pipelive bench` after its rehearsal) to serve only on compiled shapes: a
        # batch runs padded on the smallest compiled shape that holds it and nothing new is
        # compiled for it, as a server that compiled its shape buckets at start-up; it compiles
        # only when no compiled shape holds the batch.
        self.shapes_frozen = False

    # ------------------------------------------------------------------ stages

    def pages_for_stage(self, plan: PipelinePlan, index: int) -> int:
        """KV capacity of stage `index` of `plan` under the engine's options."""
        c = self.config
        if c.num_pages is not None:
            if isinstance(c.num_pages, list):
                if len(c.num_pages) != plan.num_stages:
                    raise ConfigError(
                        f"num_pages lists {len(c.num_pages)} stages but the plan has {plan.num_stages}"
                    )
                return int(c.num_pages[index])
            return int(c.num_pages)
        spec = plan.stages[index]
        budget = c.budget(spec.devices[0])
        if budget is None:
            return 512
        layers = spec.num_layers
        if not c.kv_resize:
            # The no-resize baseline: size once for the most layers this stage may ever hold.
            layers = self.shape.num_layers
        pages = max_pages(
            budget, self.shape, layers, c.page_size, stage_extra_bytes(self.shape, plan, index)
        )
        return min(round_capacity(pages, c.page_granule), c.useful_pages)

    def _build_stages(
        self, plan: PipelinePlan, num_pages: list[int] | None = None
    ) -> list[StageRuntime]:
        embed, states, head = self._weights
        stages = []
        for i, spec in enumerate(plan.stages):
            dev = self.devices[spec.devices[0]]
            n_pages = num_pages[i] if num_pages is not None else self.pages_for_stage(plan, i)
            if n_pages < 2:
                raise ConfigError(
                    f"stage {i} on device {spec.devices[0]} has room for no KV pages "
                    f"({n_pages}; page 0 is reserved): "
                    + (
                        "give num_pages >= 2"
                        if num_pages is not None or self.config.num_pages is not None
                        else "raise device_memory_bytes or give num_pages"
                    )
                )
            stages.append(
                StageRuntime(
                    index=i,
                    spec=spec,
                    device=dev,
                    params=place_stage_params(embed, states, head, spec, plan.num_layers, dev),
                    pools=StagePools(self.kv_spec, n_pages, dev, spec.layers),
                    pages=PageTable(n_pages, self.config.page_size),
                    is_first=i == 0,
                    is_last=i == plan.num_stages - 1,
                )
            )
        return stages

    def _check_capacity(self) -> None:
        need = -(-self.config.max_model_len // self.config.page_size)
        for st in self.executor.stages:
            if st.pages.num_pages - 1 < need:
                raise ConfigError(
                    f"stage {st.index} has {st.pages.num_pages - 1} usable KV pages but one "
                    f"request of max_model_len={self.config.max_model_len} needs {need}; lower "
                    "max_model_len or give more pages"
                )

    # ------------------------------------------------------------------ requests

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        on_output: Callable[[RequestOutput], None] | None = None,
    ) -> str:
        """Queues a request; returns its id. Raises RequestError for bad input.

        `on_output` is subscribed before the request can be scheduled, so no output is missed.
        """
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise RequestError(f"params must be SamplingParams, got {type(params).__name__}")
        params.validate()
        ids = self.encode_prompt(prompt)
        with self._lock:
            rid = request_id if request_id is not None else str(next(self._ids))
            if rid in self.requests and not self.requests[rid].finished:
                raise RequestError(f"request id {rid!r} is already in use")
            req = Request(rid, ids, params)
            self.requests[rid] = req
            if on_output is not None:
                self._subscribers.setdefault(rid, []).append(on_output)
            self.scheduler.add(req)
        self._wake.set()
        return rid

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("this model has no tokenizer: give prompt token ids")
            if (problem := text_problem(prompt)) is not None:
                raise RequestError(f"prompt is not valid text: {problem}")
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, list | tuple | np.ndarray):
            ids = [int(t) for t in prompt]
            if any(not (0 <= t < self.defs.cfg.vocab_size) for t in ids):
                raise RequestError(f"prompt token ids must be in [0, {self.defs.cfg.vocab_size})")
        else:
            raise RequestError(
                f"prompt must be a string or a list of token ids, got {type(prompt).__name__}"
            )
        if not ids:
            raise RequestError("prompt is empty")
        if len(ids) >= self.config.max_model_len:
            raise RequestError(
                f"prompt has {len(ids)} tokens; max_model_len is {self.config.max_model_len}"
            )
        return ids

    def has_unfinished(self) -> bool:
        with self._lock:
            return self.scheduler.has_unfinished() or self.reconfig is not None

    def abort(self, request_id: str) -> bool:
        """Ends a request now and frees its pages; False if it is unknown or already finished."""
        with self._lock:
            req = self.requests.get(request_id)
            if req is None or req.finished:
                return False
            self._end(req, "abort")
            return True

    def _end(self, req: Request, reason: str, error: str | None = None) -> None:
        """Finishes `req` outside a step's sampling ("abort", "error"): its pages are freed at
        once and its subscribers get an output that adds no token."""
        self.scheduler.finish(req, reason)
        req.new_ids = []
        req.error = error
        self._publish(req)

    def get_output(self, request_id: str) -> RequestOutput:
        """The request's output so far; RequestError if the id is unknown or long finished."""
        with self._lock:
            req = self.requests.get(request_id)
            if req is None:
                raise RequestError(
                    f"unknown request id {request_id!r} (finished requests are kept for the "
                    f"last {self.config.finished_retention})"
                )
            return req.to_output()

    # ------------------------------------------------------------------ the step

    def step(self) -> list[RequestOutput]:
        """One engine iteration; returns the requests that advanced (or finished) in it."""
        with self._lock:
            return self._step()

    def _step(self) -> list[RequestOutput]:
        if self.reconfig is not None:
            self.reconfig.before_step()
        for hook in self.step_hooks:
            hook(self)
        sched = self.scheduler.schedule()
        outputs: list[RequestOutput] = []
        if sched:
            outputs = self._run(sched)
            self.step_count += 1
        self.last_step_end = time.perf_counter()
        if self.reconfig is not None:
            self.reconfig.after_step()
        return outputs

    def _run(self, sched: list[ScheduledSeq]) -> list[RequestOutput]:
        k = min(self.config.num_microbatches, len(sched))
        groups = (
            [list(g) for g in np.array_split(np.array(sched, dtype=object), k)]
            if k > 1
            else [sched]
        )
        batches = [self._build_batch(g) for g in groups]
        results = self.executor.run(batches)
        if self.reconfig is not None:
            # While the device computes this step: a live switch dispatches its final patch here.
            self.reconfig.after_dispatch()
        now_outputs: list[RequestOutput] = []
        failed: list[tuple[Request, str]] = []
        for group, res in zip(groups, results, strict=True):
            logits, argmax = res.fetch()
            now = time.perf_counter()
            for i, s in enumerate(group):
                req = s.request
                req.new_ids = []
                req.num_computed = s.start + s.num_tokens
                if s.completes_prompt:
                    p = req.params
                    lp = None
                    try:
                        if p.greedy and not p.penalized:
                            tok = int(argmax[i])
                        else:
                            assert logits is not None
                            row = logits[i]
                            if p.penalized:
                                row = apply_penalties(row, req.prompt_ids, req.output_ids, p)
                            tok = int(np.argmax(row)) if p.greedy else sample_token(row, p, req.rng)
                        if req.logprobs is not None:
                            assert logits is not None and p.logprobs is not None
                            lp = token_logprob(logits[i], tok, p.logprobs)
                    except Exception as e:  # noqa: BLE001 - one request's fault ends only it
                        log.exception("sampling request %s failed; it ends", req.request_id)
                        failed.append((req, f"sampling failed: {type(e).__name__}: {e}"))
                        continue
                    if lp is not None:
                        assert req.logprobs is not None
                        req.logprobs.append(lp)
                    self._append_token(req, tok, now)
                    now_outputs.append(req.to_output())
                    self._publish(req)
        # Else the step would fail again on every retry, and every other request with it.
        for req, why in failed:
            self._end(req, "error", why)
            now_outputs.append(req.to_output())
        return now_outputs

    def _build_batch(self, seqs: list[ScheduledSeq]) -> StepBatch:
        c = self.config
        n = len(seqs)
        t = sum(s.num_tokens for s in seqs)
        max_q = max(s.num_tokens for s in seqs)
        n_b = bucket(n, 4, c.max_num_seqs)
        t_b = bucket(t, max(8, n_b))
        # A mixed step (prefill chunks among decodes) tells the XLA attention how many rows are
        # chunks, so that it pads only those to max_q_len; the Pallas kernel needs no hint.
        # Only up to a quarter of the rows: each bound is a compiled shape of its own (on 4
        # rows, bounds 1 and 2 and none made 9 shapes of a 4-client load, each compiled inline
        # the first time it came), and the split saves most when chunks are few among many
        # decodes.
        long_b: int | None = None
        if max_q > 1 and self.backend == "xla":
            n_long = sum(1 for s in seqs if s.num_tokens > 1)
            long_b = bucket(n_long, 1, n_b)
            long_b = None if long_b > max(1, n_b // 4) or long_b >= n_b else long_b
            # A bound below the real count would give those sequences wrong attention.
            assert long_b is None or n_long <= long_b, (n_long, long_b)
        # The block table is always max_model_len wide: attention loops over the real context
        # (both backends stop at the longest kv_len), so a narrower table would save nothing but
        # cost a compiled function per width.
        shape = BatchShape(
            num_tokens=t_b,
            max_seqs=n_b,
            pages_per_seq=-(-c.max_model_len // c.page_size),
            max_q_len=bucket(max_q, 1, t_b),
            long_seqs=long_b,
        )
        if c.background_compile or self.shapes_frozen:
            shape = self._compiled_shape(shape)
            t_b = shape.num_tokens
        self._shapes_seen[shape] = self.step_count
        tokens = np.zeros(t_b, np.int32)
        positions = np.zeros(t_b, np.int32)
        cu = np.zeros(n_b + 1, np.int32)
        kv_lens = np.zeros(n_b, np.int32)
        logits_idx = np.zeros(n_b, np.int32)
        off = 0
        for i, s in enumerate(seqs):
            all_toks = s.request.all_tokens
            tokens[off : off + s.num_tokens] = all_toks[s.start : s.start + s.num_tokens]
            positions[off : off + s.num_tokens] = np.arange(s.start, s.start + s.num_tokens)
            off += s.num_tokens
            cu[i + 1] = off
            kv_lens[i] = s.start + s.num_tokens
            logits_idx[i] = off - 1
        cu[n + 1 :] = off
        rids = [s.request.request_id for s in seqs] + [None] * (n_b - n)
        slot_maps, tables = [], []
        for st in self.executor.stages:
            sm = np.full(t_b, -1, np.int32)
            o = 0
            for s in seqs:
                sm[o : o + s.num_tokens] = st.pages.slots(
                    s.request.request_id, s.start, s.num_tokens
                )
                o += s.num_tokens
            slot_maps.append(sm)
            tables.append(st.pages.block_table(rids, shape.pages_per_seq))
        return StepBatch(
            shape=shape,
            token_ids=tokens,
            positions=positions,
            cu_q_lens=cu,
            kv_lens=kv_lens,
            num_seqs=np.array(n, np.int32),
            logits_indices=logits_idx,
            slot_mapping=slot_maps,
            block_tables=tables,
            # Greedy rows take the device's argmax; the logits come back only when a row samples
            # or wants log-probabilities.
            greedy=not any(s.request.params.needs_logits for s in seqs),
        )

    def _compiled_shape(self, exact: BatchShape) -> BatchShape:
        """The shape to run a batch that needs `exact` (`background_compile`): `exact` when every
        stage has it compiled; else the smallest compiled shape that holds the batch (same rows
        and table width, at least as many tokens and as long a query chunk: the extra rows are
        padding), while `exact` compiles on a background thread. A step then never waits seconds
        for a compile when a bigger compiled shape exists; without one it compiles inline."""
        stages = self.executor.stages
        if all(self.cache.has(st, exact) for st in stages):
            return exact
        covering = [
            s
            for s in self.cache.shapes()
            if s.max_seqs == exact.max_seqs
            and s.pages_per_seq == exact.pages_per_seq
            and s.num_tokens >= exact.num_tokens
            and s.max_q_len >= exact.max_q_len
            and long_capacity(s) >= long_needed(exact)
            and all(self.cache.has(st, s) for st in stages)
        ]
        if not covering:
            return exact
        if not self.shapes_frozen:
            self._compile_later(exact, list(stages))
        return min(covering, key=lambda s: (s.num_tokens, s.max_q_len, long_capacity(s)))

    def _compile_later(self, shape: BatchShape, stages: list[StageRuntime]) -> None:
        """Compiles `shape` for `stages` on a background thread (one at a time, each shape
        once); a failure is logged and not retried: the covering shape keeps serving."""
        if shape in self._bg_compiles or shape in self._bg_failed:
            return
        self._bg_compiles.add(shape)

        def work() -> None:
            try:
                with self._bg_compile_lock:
                    for st in stages:
                        self.cache.get(st, shape)
            except Exception:  # noqa: BLE001 - the covering shape keeps serving
                log.exception("background compile of %s failed", shape)
                self._bg_failed.add(shape)
            finally:
                self._bg_compiles.discard(shape)

        start_compile_thread(work)

    def _append_token(self, req: Request, tok: int, now: float) -> None:
        p = req.params
        req.output_ids.append(tok)
        req.new_ids.append(tok)
        m = req.metrics
        if m.first_token_time is None:
            m.first_token_time = now
        m.token_times.append(now)
        if self.tokenizer is not None:
            req.text = self.tokenizer.decode(req.output_ids)
        reason = None
        eos = self.defs.cfg.eos_token_id
        if not p.ignore_eos and eos is not None and tok == eos:
            reason = "stop"
        elif tok in p.stop_token_ids:
            reason = "stop"
        elif p.stop and self.tokenizer is not None:
            for s in p.stop:
                idx = req.text.find(s)
                if idx >= 0:
                    req.text = req.text[:idx]
                    reason = "stop"
                    break
        if reason is None and (
            len(req.output_ids) >= p.max_tokens or req.num_tokens >= self.config.max_model_len
        ):
            reason = "length"
        if reason is not None:
            self.scheduler.finish(req, reason)

    # ------------------------------------------------------------------ streaming

    def _publish(self, req: Request) -> None:
        """Hands a request's output to its subscribers. A subscriber that raises is logged and
        dropped: it runs in the middle of a step, and must not stop the step half-way (the
        other requests of the batch would lose their tokens) or the engine loop."""
        subs = self._subscribers.get(req.request_id, [])
        for cb in list(subs):
            try:
                cb(req.to_output())
            except Exception:  # noqa: BLE001 - user code
                log.exception("output callback of request %s failed; unsubscribed", req.request_id)
                subs.remove(cb)
        if req.finished:
            self._subscribers.pop(req.request_id, None)
            self._retire(req)

    def _retire(self, req: Request) -> None:
        """Keeps the last `finished_retention` finished requests; forgets older ones (an id
        reused since belongs to its new request, which stays)."""
        self._finished.append(req)
        while len(self._finished) > self.config.finished_retention:
            old = self._finished.popleft()
            if self.requests.get(old.request_id) is old:
                del self.requests[old.request_id]

    def subscribe(self, request_id: str, callback: Callable[[RequestOutput], None]) -> None:
        with self._lock:
            self._subscribers.setdefault(request_id, []).append(callback)

    async def stream(
        self, prompt: str | list[int], params: SamplingParams | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Yields a request's output each time it advances, until it finishes.

        With the background loop running (`start()`), this only waits; otherwise it drives
        `step()` itself in a worker thread, so several streams can share one engine.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        rid = self.add_request(
            prompt, params, on_output=lambda out: loop.call_soon_threadsafe(queue.put_nowait, out)
        )
        try:
            while True:
                if self._thread is None:
                    while queue.empty():
                        await asyncio.to_thread(self.step)
                out = await queue.get()
                yield out
                if out.finished:
                    return
        finally:
            req = self.requests.get(rid)
            if req is not None and not req.finished:
                self.abort(rid)

    # ------------------------------------------------------------------ background loop

    def start(self) -> None:
        """Runs the engine loop on its own thread (for servers)."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="pipelive-engine", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                if self.has_unfinished():
                    ran = self.step()
                    if not ran and not self.scheduler.has_unfinished():
                        time.sleep(0.002)  # only a reconfiguration in flight: let its thread work
                else:
                    self._wake.wait(0.05)
                    self._wake.clear()
                self.loop_errors_in_a_row = 0  # a step ran through, or nothing is left to fail
            except Exception as e:  # noqa: BLE001 - the loop of a server must survive a bad step
                self.loop_errors += 1
                self.loop_errors_in_a_row += 1
                self.last_loop_error = f"{type(e).__name__}: {e}"
                log.exception("engine step failed; serving goes on")
                time.sleep(0.1)

    def stop(self, *, drain: bool = False, timeout: float = 30.0) -> None:
        """Stops the background loop; `drain` first lets in-flight requests finish (up to timeout)."""
        if drain:
            deadline = time.monotonic() + timeout
            while self.scheduler.has_unfinished() and time.monotonic() < deadline:
                time.sleep(0.01)
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout)
            self._thread = None
        with self._lock:
            for req in list(self.scheduler.running) + list(self.scheduler.waiting):
                self._end(req, "abort")

    # ------------------------------------------------------------------ reconfiguration

    def reconfigure(
        self,
        plan: Any,
        mode: str = "live",
        pause_budget_ms: float = 10.0,
        max_rounds: int = 8,
        **kw: Any,
    ) -> Any:
        """Starts changing the pipeline plan while serving; returns a ReconfigHandle.

        Modes: "live" (pre-copy + patch rounds + AOT switch), "stop_and_copy", "restart".
        One reconfiguration at a time: a second raises ReconfigError.
        """
        from pipelive_jax.reconfig.controller import ReconfigController

        with self._lock:
            if self.reconfig is not None:
                raise ReconfigError(
                    f"a reconfiguration is already in flight (to {self.reconfig.target}); "
                    "wait for it or abort it"
                )
            ctl = ReconfigController(
                self, plan, mode=mode, pause_budget_ms=pause_budget_ms, max_rounds=max_rounds, **kw
            )
            if not ctl.handle.done():  # a no-op or a failed PREPARE is over already
                self.reconfig = ctl
            self.reconfig_history.append(ctl)
        self._wake.set()
        return ctl.handle

    def executor_shapes(self) -> list[BatchShape]:
        """Batch shapes the current plan serves without compiling (compiled for every stage):
        what a new plan, or a stage's resized pools, must have compiled before taking over.

        All of them, not only the recent ones: a shape last met a while ago (four prompts
        arriving together) comes back, and on a plan without it, it compiles inline, a stall
        of seconds for every request in flight (SmolLM2 on 3 stages: ~5 s). The new plan
        compiles in the background, so more shapes only make PREPARE longer (on 2 CPU cores,
        ~4 s per shape and stage for SmolLM2; a reconfiguration's timeout leaves that out)."""
        stages = self.executor.stages
        return [s for s in self.cache.shapes() if all(self.cache.has(st, s) for st in stages)]

    def shapes_used(self) -> list[BatchShape]:
        """Every batch shape a step has run on, in the order first met."""
        return list(self._shapes_seen)

    # ------------------------------------------------------------------ status

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {
                "plan": self.plan.to_json(),
                "devices": [str(d) for d in self.devices],
                "backend": self.backend,
                "stages": [
                    {
                        "index": st.index,
                        "device": st.device.id,
                        "layers": [st.spec.start, st.spec.end],
                        "kv_pages_total": st.pages.num_pages - 1,
                        "kv_pages_used": st.pages.num_used,
                        "kv_pages_free": st.pages.num_free,
                    }
                    for st in self.executor.stages
                ],
                "running": len(self.scheduler.running),
                "waiting": len(self.scheduler.waiting),
                "preemptions": self.scheduler.num_preemptions,
                "steps": self.step_count,
                "loop_errors": self.loop_errors,
                "loop_errors_in_a_row": self.loop_errors_in_a_row,
                "last_loop_error": self.last_loop_error,
                "reconfig": self.reconfig.handle.status() if self.reconfig is not None else None,
            }

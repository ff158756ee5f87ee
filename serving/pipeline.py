"""The pipeline executor: one compiled step function per stage, each on its own device.

A step runs stage 0..S-1 in order (DESIGN.md §3). Each stage's function is
`stage_forward` (models/llama.py) jitted with its KV pools donated, so KV writes happen in place,
and compiled ahead of time for a `BatchShape` bucket (`lower().compile()`): a reconfiguration
compiles its new stages in the background and swaps them in without compiling in the pause.
Activations move to the next stage with `jax.device_put`; every call is dispatched
asynchronously, so with several micro-batches the stages work at the same time.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pipelive_jax.kv.pages import PageTable
from pipelive_jax.kv.pools import KVSpec, StagePools
from pipelive_jax.models.llama import BatchMeta, ModelDefs, StageParams, stage_forward
from pipelive_jax.plan import PipelinePlan, StageSpec

_COMPILE_THREADS: weakref.WeakSet[threading.Thread] = weakref.WeakSet()

log = logging.getLogger("pipelive.compile")


def start_compile_thread(target: Callable[[], None]) -> threading.Thread:
    """Starts a background AOT compile (a reconfiguration's new stages, a batch shape met for
    the first time). The threads are daemons (a stuck compile must not keep the process alive),
    but one still inside XLA when the interpreter exits aborts the process, so exit waits for
    them (`_join_compile_threads`)."""
    t = threading.Thread(target=target, name="pipelive-aot", daemon=True)
    _COMPILE_THREADS.add(t)
    t.start()
    return t


@atexit.register
def _join_compile_threads() -> None:
    for t in list(_COMPILE_THREADS):
        t.join(timeout=120)


def bucket(n: int, minimum: int = 1, maximum: int | None = None) -> int:
    """Smallest power of two >= max(n, minimum), capped at `maximum`: shapes come in buckets
    because every distinct shape is a separate compiled function."""
    b = max(minimum, 1)
    while b < n:
        b *= 2
    if maximum is not None:
        b = min(b, max(maximum, n))
    return b


@dataclass(frozen=True)
class BatchShape:
    """The static shapes of one step (the compile-cache key besides the stage)."""

    num_tokens: int  # T: packed tokens, padded
    max_seqs: int  # N: sequence rows, padded
    pages_per_seq: int  # M: block table width
    max_q_len: int  # longest query chunk of a sequence
    # Most sequences with more than one token (prefill chunks), when fewer than max_seqs: the
    # XLA attention then pads only those to max_q_len. None: no bound (every row may be long).
    long_seqs: int | None = None

    @property
    def long_rows(self) -> int:
        """How many sequences a step of this shape may give more than one token (its
        attention's bound): `long_seqs`, or every row."""
        return self.max_seqs if self.long_seqs is None else self.long_seqs


@dataclass
class StepBatch:
    """Host arrays of one (micro-)batch; per-stage arrays because each stage has its own page ids.

    token_ids [T], positions [T], cu_q_lens [N+1], kv_lens [N], num_seqs [], logits_indices [N];
    slot_mapping[s] [T] and block_tables[s] [N, M] for stage s.
    """

    shape: BatchShape
    token_ids: np.ndarray
    positions: np.ndarray
    cu_q_lens: np.ndarray
    kv_lens: np.ndarray
    num_seqs: np.ndarray
    logits_indices: np.ndarray
    slot_mapping: list[np.ndarray]
    block_tables: list[np.ndarray]
    greedy: bool = True

    def meta(self, stage: int) -> BatchMeta:
        return BatchMeta(
            positions=self.positions,
            slot_mapping=self.slot_mapping[stage],
            cu_q_lens=self.cu_q_lens,
            kv_lens=self.kv_lens,
            block_tables=self.block_tables[stage],
            num_seqs=self.num_seqs,
            logits_indices=self.logits_indices,
        )


@partial(
    jax.jit,
    static_argnames=("defs", "max_q_len", "backend", "max_long_seqs"),
    donate_argnums=(2,),
)
def _stage_step(defs, params, kv, meta, x, *, max_q_len, backend, max_long_seqs=None):
    """stage_forward, plus the greedy argmax on the last stage (so greedy steps move ints)."""
    kv, out = stage_forward(
        defs,
        params,
        kv,
        meta,
        x,
        max_q_len=max_q_len,
        backend=backend,
        max_long_seqs=max_long_seqs,
    )
    if params.head is not None:
        return kv, (out, jnp.argmax(out, axis=-1).astype(jnp.int32))
    return kv, out


@dataclass
class StageRuntime:
    """One stage as it serves: its plan entry, device, placed weights, KV pools and page table."""

    index: int
    spec: StageSpec
    device: jax.Device
    params: StageParams
    pools: StagePools
    pages: PageTable
    is_first: bool
    is_last: bool

    @property
    def layer_ids(self) -> tuple[int, ...]:
        return tuple(range(self.spec.start, self.spec.end))


def shape_order(s: BatchShape) -> tuple[int, int, int, int, int]:
    """The order shapes are compiled in (smallest first), wherever a set of them is compiled."""
    return (s.num_tokens, s.max_seqs, s.max_q_len, s.long_rows, s.pages_per_seq)


@dataclass(frozen=True)
class _StageSignature:
    """What fixes a stage's compiled function besides the batch shape, holding no arrays (the
    weights as `ShapeDtypeStruct`s), so a cache can compile for a stage that no longer runs."""

    start: int
    end: int
    is_first: bool
    is_last: bool
    device: jax.Device
    num_pages: int
    params: Any = dataclasses.field(compare=False)  # StageParams of ShapeDtypeStruct
    pool_spec: KVSpec = dataclasses.field(compare=False)

    @property
    def key(self) -> tuple:
        return (self.start, self.end, self.is_first, self.is_last, self.device.id, self.num_pages)

    @staticmethod
    def key_of(stage: StageRuntime, num_pages: int | None = None) -> tuple:
        """`of(stage, num_pages).key` without building the signature (the per-step lookup)."""
        n = num_pages if num_pages is not None else stage.pools.num_pages
        s = stage.spec
        return (s.start, s.end, stage.is_first, stage.is_last, stage.device.id, n)

    @staticmethod
    def of(stage: StageRuntime, num_pages: int | None = None) -> _StageSignature:
        sh = jax.sharding.SingleDeviceSharding(stage.device)
        return _StageSignature(
            start=stage.spec.start,
            end=stage.spec.end,
            is_first=stage.is_first,
            is_last=stage.is_last,
            device=stage.device,
            num_pages=num_pages if num_pages is not None else stage.pools.num_pages,
            params=jax.tree.map(
                lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), stage.params
            ),
            pool_spec=stage.pools.spec,
        )


class CompileCache:
    """AOT-compiled stage functions, keyed by what fixes their shapes and placement.

    Thread-safe: reconfiguration compiles on a background thread while the engine serves.
    """

    def __init__(self, defs: ModelDefs, backend: str) -> None:
        self.defs = defs
        self.backend = backend
        self._fns: dict[tuple, Any] = {}
        self._lock = threading.Lock()
        self._inflight: dict[tuple, threading.Event] = {}
        self._stages: dict[tuple, _StageSignature] = {}  # key without the shape -> signature
        self.compiles = 0

    def inherit(self, other: CompileCache) -> None:
        """Takes over what a replaced cache knew, not its functions: every stage it compiled
        for (so that `compile_known` still covers them) and its running count of compiles (so
        that counts taken across a restart stay differences of one counter)."""
        with self._lock:
            for k, sig in other._stages.items():
                self._stages.setdefault(k, sig)
            self.compiles += other.compiles

    @staticmethod
    def key(stage: StageRuntime, shape: BatchShape, num_pages: int | None = None) -> tuple:
        return (*_StageSignature.key_of(stage, num_pages), shape)

    def get(self, stage: StageRuntime, shape: BatchShape, num_pages: int | None = None) -> Any:
        """The compiled function for a key, compiling it at most once: a thread that asks for a
        key another thread is compiling waits for that compile instead of starting its own (the
        engine thread meeting a shape the background AOT thread is busy with)."""
        fn = self._fns.get(self.key(stage, shape, num_pages))
        if fn is not None:
            return fn
        return self._get(_StageSignature.of(stage, num_pages), shape)

    def _get(self, sig: _StageSignature, shape: BatchShape) -> Any:
        k = (*sig.key, shape)
        fn = self._fns.get(k)
        if fn is not None:
            return fn
        with self._lock:
            fn = self._fns.get(k)
            if fn is not None:
                return fn
            event = self._inflight.get(k)
            owner = event is None
            if owner:
                event = self._inflight[k] = threading.Event()
        assert event is not None
        if not owner:
            event.wait()
            fn = self._fns.get(k)
            if fn is not None:
                return fn
            return self._get(sig, shape)  # the other compile failed: try ourselves
        try:
            fn = self._compile(sig, shape)
            with self._lock:
                self._fns[k] = fn
                self._stages.setdefault(sig.key, sig)
            return fn
        finally:
            with self._lock:
                del self._inflight[k]
            event.set()

    def has(self, stage: StageRuntime, shape: BatchShape, num_pages: int | None = None) -> bool:
        return self.key(stage, shape, num_pages) in self._fns

    def shapes(self) -> set[BatchShape]:
        """Every batch shape compiled for some stage."""
        return {k[-1] for k in list(self._fns)}

    def compile_known(self, shapes: list[BatchShape] | None = None) -> int:
        """Compiles every batch shape (default: every shape compiled for some stage) for every
        stage signature this cache has compiled for, or inherited; returns how many compiled.

        Which shapes a reconfiguration compiles for its new stages depends on the shapes the
        plan before it had met, so on timing; a benchmark's rehearsal ends with this so that
        its measured run meets no compile, whatever the timing (`pipelive bench`)."""
        wanted = sorted(self.shapes() if shapes is None else set(shapes), key=shape_order)
        before = self.compiles
        for sig in list(self._stages.values()):
            for shape in wanted:
                self._get(sig, shape)
        return self.compiles - before

    def _compile(self, sig: _StageSignature, shape: BatchShape) -> Any:
        t0 = time.perf_counter()
        cfg = self.defs.cfg
        sh = jax.sharding.SingleDeviceSharding(sig.device)
        params = sig.params
        spec = sig.pool_spec
        pool = jax.ShapeDtypeStruct(spec.pool_shape(sig.num_pages), spec.dtype, sharding=sh)
        kv = [(pool, pool) for _ in range(sig.start, sig.end)]
        i32 = jnp.int32
        t, n, m = shape.num_tokens, shape.max_seqs, shape.pages_per_seq
        meta = BatchMeta(
            positions=jax.ShapeDtypeStruct((t,), i32, sharding=sh),
            slot_mapping=jax.ShapeDtypeStruct((t,), i32, sharding=sh),
            cu_q_lens=jax.ShapeDtypeStruct((n + 1,), i32, sharding=sh),
            kv_lens=jax.ShapeDtypeStruct((n,), i32, sharding=sh),
            block_tables=jax.ShapeDtypeStruct((n, m), i32, sharding=sh),
            num_seqs=jax.ShapeDtypeStruct((), i32, sharding=sh),
            logits_indices=jax.ShapeDtypeStruct((n,), i32, sharding=sh),
        )
        if sig.is_first:
            x = jax.ShapeDtypeStruct((t,), i32, sharding=sh)
        else:
            x = jax.ShapeDtypeStruct((t, cfg.hidden_size), jnp.float32, sharding=sh)
        lowered = _stage_step.lower(
            self.defs,
            params,
            kv,
            meta,
            x,
            max_q_len=shape.max_q_len,
            backend=self.backend,
            max_long_seqs=shape.long_seqs,
        )
        compiled = lowered.compile()
        self.compiles += 1
        # Seconds of compile on the serving thread are a stall every request in flight feels:
        # the log says which shape, for which stage, where, and how long.
        log.info(
            "compiled %s for layers [%d, %d) on %s, %d pages, in %.1f s (thread %s)",
            shape, sig.start, sig.end, sig.device, sig.num_pages, time.perf_counter() - t0,
            threading.current_thread().name,
        )  # fmt: skip
        return compiled


@dataclass
class StepResult:
    """What the last stage returned for one micro-batch (device arrays, fetched lazily)."""

    logits: jax.Array  # [N, vocab] float32
    argmax: jax.Array  # [N] int32
    greedy: bool

    def fetch(self) -> tuple[np.ndarray | None, np.ndarray]:
        """(logits or None for greedy batches, argmax) on the host."""
        if self.greedy:
            return None, np.asarray(self.argmax)
        return np.asarray(self.logits), np.asarray(self.argmax)


class PipelineExecutor:
    """Runs steps over the stages of a plan (host state: the stages and the compiled functions)."""

    def __init__(self, defs: ModelDefs, stages: list[StageRuntime], cache: CompileCache) -> None:
        self.defs = defs
        self.stages = stages
        self.cache = cache

    @property
    def plan(self) -> PipelinePlan:
        return PipelinePlan(tuple(s.spec for s in self.stages))

    @property
    def page_tables(self) -> list[PageTable]:
        return [s.pages for s in self.stages]

    def compile_for(self, shape: BatchShape) -> None:
        for st in self.stages:
            self.cache.get(st, shape)

    def run(self, batches: list[StepBatch]) -> list[StepResult]:
        """Dispatches every micro-batch through every stage; returns without blocking."""
        results: list[StepResult] = []
        for b in batches:
            x: Any = None
            for st in self.stages:
                fn = self.cache.get(st, b.shape)
                meta, xs = jax.device_put(
                    (b.meta(st.index), b.token_ids if st.is_first else None), st.device
                )
                if st.is_first:
                    x = xs
                else:
                    x = jax.device_put(x, st.device)
                kv = st.pools.as_list(st.layer_ids)
                new_kv, x = fn(st.params, kv, meta, x)
                st.pools.set_all(new_kv, st.layer_ids)
            logits, argmax = x
            results.append(StepResult(logits, argmax, b.greedy))
        return results


def place_stage_params(
    embed: jax.Array,
    layer_states: list[Any],
    head: Any,
    spec: StageSpec,
    num_layers: int,
    device: jax.Device,
) -> StageParams:
    """Puts a stage's share of the weights on its device (async device_put)."""
    params = StageParams(
        embed=embed if spec.start == 0 else None,
        layers=list(layer_states[spec.start : spec.end]),
        head=head if spec.end == num_layers else None,
    )
    return jax.device_put(params, device)


def kv_spec_for(defs: ModelDefs, page_size: int, dtype: Any = None) -> KVSpec:
    """The pools' spec: the model's KV shape, in `dtype` (default: the model's dtype)."""
    cfg = defs.cfg
    return KVSpec(
        kv_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        page_size=page_size,
        dtype=cfg.jnp_dtype if dtype is None else jnp.dtype(dtype),
    )

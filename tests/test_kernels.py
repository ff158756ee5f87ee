"""Paged-attention backends and the KV write, against oracles written differently.

The attention oracle is `paged_attention_dense_reference`, a per-token numpy loop over the same
contract. Each backend runs jitted through the public dispatcher `pipelive_jax.kernels.
paged_attention` on ragged batches drawn by hypothesis: random query and context lengths, decodes
mixed with prefill chunks (with and without earlier context), block tables over a shuffled pool
(page 0 reserved as padding), padding sequences (num_seqs < max_seqs) and padding tokens.

Shapes are fixed per `AttnConfig` (so one compilation per config and backend) and only the data
varies between hypothesis examples: that keeps the Pallas interpreter affordable on a small CPU.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipelive_jax.errors import KernelInputError
from pipelive_jax.kernels import (
    paged_attention,
    paged_attention_dense_reference,
    write_kv,
)
from pipelive_jax.kernels.pallas_attention import paged_attention_pallas

BACKENDS = ("xla", "pallas_interpret")
# The interpreter costs more per example; shapes are compiled once per config either way.
MAX_EXAMPLES = {"xla": 30, "pallas_interpret": 15}

# Tolerances against the float32 numpy oracle, which sees the same (already rounded) inputs.
#  float32: only summation order differs (online softmax over pages vs one dense softmax).
#  bfloat16: the output is rounded to bf16 (relative 2^-9) and the Pallas kernel also rounds the
#  softmax weights to bf16 before the P @ V dot (relative 2^-9 each, partly averaging out), the
#  standard flash-attention trade. Outputs are convex mixes of N(0, 1) values, so |out| <~ 3.
TOLERANCE = {
    jnp.dtype(jnp.float32): dict(atol=2e-5, rtol=2e-5),
    jnp.dtype(jnp.bfloat16): dict(atol=2e-2, rtol=2e-2),
}


@dataclasses.dataclass(frozen=True)
class AttnConfig:
    page_size: int
    kv_heads: int
    group: int  # query heads per KV head
    head_dim: int
    dtype: str
    soft_cap: float | None
    max_q_len: int  # static bucket: every chunk is at most this long
    max_seqs: int = 4
    pages_per_seq: int = 5
    num_tokens: int = 40
    q_dtype: str | None = None  # None: the pages' dtype; "float32" over 16-bit pages as served

    @property
    def num_pages(self) -> int:
        # Room for every sequence's full table, plus the reserved page 0.
        return 1 + self.max_seqs * self.pages_per_seq

    @property
    def capacity(self) -> int:
        return self.pages_per_seq * self.page_size

    @property
    def q_heads(self) -> int:
        return self.kv_heads * self.group


# Together these cover page sizes 8/16/32, GQA groups 1/3/4/8, float32 and bfloat16, soft cap on
# both dtypes, decode-only buckets (max_q_len 1) and a non-power-of-two chunk bucket.
CONFIGS = [
    AttnConfig(16, 3, 3, 32, "float32", None, 16),  # SmolLM2's 9/3 GQA
    AttnConfig(8, 1, 8, 16, "bfloat16", None, 13),
    AttnConfig(32, 2, 4, 16, "float32", 2.0, 24),
    AttnConfig(16, 2, 1, 32, "bfloat16", 5.0, 8),
    AttnConfig(8, 1, 3, 16, "float32", None, 1, max_seqs=5, num_tokens=6),
    # Decode again (the XLA backend's own path), with soft cap, bf16 pages under float32
    # queries (as the engine serves a bf16 cache) and contexts that span several of its 32-key
    # chunks and a partly padded last chunk; then fewer tokens than sequences, so that some
    # sequences get none.
    DECODE_BF16 := AttnConfig(
        16, 2, 4, 16, "bfloat16", 5.0, 1, max_seqs=6, pages_per_seq=7, num_tokens=8, q_dtype="float32"
    ),
    AttnConfig(16, 3, 3, 32, "float32", None, 1, max_seqs=6, num_tokens=4),
    # A prefill bucket with float32 queries over bf16 pages.
    AttnConfig(16, 2, 2, 32, "bfloat16", None, 12, q_dtype="float32"),
]
CONFIG_IDS = [
    f"p{c.page_size}-g{c.group}-{c.dtype}-cap{c.soft_cap}-q{c.max_q_len}"
    f"{'-q' + c.q_dtype if c.q_dtype else ''}-s{c.max_seqs}t{c.num_tokens}"
    for c in CONFIGS
]


@dataclasses.dataclass
class RaggedBatch:
    """Host arrays of one call, shapes as in the contract (`kernels/paged_attention.py`)."""

    q: np.ndarray
    k_pages: np.ndarray
    v_pages: np.ndarray
    kv_lens: np.ndarray
    block_tables: np.ndarray
    cu_q_lens: np.ndarray
    num_seqs: np.ndarray

    def args(self) -> tuple[jax.Array, ...]:
        return tuple(jnp.asarray(a) for a in dataclasses.astuple(self))

    @property
    def num_valid_tokens(self) -> int:
        return int(self.cu_q_lens[int(self.num_seqs)])


@st.composite
def ragged_batches(
    draw, cfg: AttnConfig, stale_fill: float = 100.0, cu_padding: str = "repeat"
) -> RaggedBatch:
    """A ragged batch for `cfg`: the structure from hypothesis, the values from a drawn seed.

    Cache slots that no sequence owns (page 0, unused pages, slots past kv_len in a last page)
    hold large garbage (`stale_fill` times N(0, 1), or NaN), so a missing mask shows in the output.
    Padding tokens past cu_q_lens[num_seqs] hold NaN. cu_q_lens past num_seqs repeats its last
    live value ("repeat", what both backends expect) or is zero ("zero").
    """
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    num_seqs = draw(st.integers(0, cfg.max_seqs))
    q_lens, kv_lens = [], []
    budget = cfg.num_tokens
    for _ in range(num_seqs):
        kind = draw(st.sampled_from(["decode", "chunk", "prompt"]))
        hi = max(1, min(cfg.max_q_len, budget))
        q_len = 1 if kind == "decode" else draw(st.integers(1, hi))
        q_len = min(q_len, budget)  # a sequence may get 0 tokens once the budget is spent
        ctx = 0 if kind == "prompt" else draw(st.integers(0, cfg.capacity - q_len))
        q_lens.append(q_len)
        kv_lens.append(ctx + q_len)
        budget -= q_len
    dtype = jnp.dtype(cfg.dtype)

    # Owned pages come from a shuffled pool; page 0 is never handed out.
    free = list(rng.permutation(np.arange(1, cfg.num_pages)))
    block_tables = np.zeros((cfg.max_seqs, cfg.pages_per_seq), np.int32)
    owned = np.zeros((cfg.num_pages, cfg.page_size), bool)
    for i, length in enumerate(kv_lens):
        n = -(-length // cfg.page_size)
        block_tables[i, :n] = [free.pop() for _ in range(n)]
        for p in range(n):
            owned[block_tables[i, p], : min(cfg.page_size, length - p * cfg.page_size)] = True
    # Padding sequences: any lengths and valid page ids; they must be ignored.
    pad_kv_lens = rng.integers(0, cfg.capacity + 1, cfg.max_seqs - num_seqs)
    block_tables[num_seqs:] = rng.integers(0, cfg.num_pages, block_tables[num_seqs:].shape)

    cu = np.zeros(cfg.max_seqs + 1, np.int32)
    cu[1 : num_seqs + 1] = np.cumsum(q_lens)
    cu[num_seqs + 1 :] = cu[num_seqs] if cu_padding == "repeat" else 0

    def pool() -> np.ndarray:
        shape = (cfg.kv_heads, cfg.num_pages, cfg.page_size, cfg.head_dim)
        live = rng.standard_normal(shape)
        stale = stale_fill * rng.standard_normal(shape)
        return np.where(owned[None, :, :, None], live, stale).astype(dtype)

    q = rng.standard_normal((cfg.num_tokens, cfg.q_heads, cfg.head_dim)).astype(np.float32)
    q[cu[num_seqs] :] = np.nan
    return RaggedBatch(
        q=q.astype(jnp.dtype(cfg.q_dtype or cfg.dtype)),
        k_pages=pool(),
        v_pages=pool(),
        kv_lens=np.concatenate([kv_lens, pad_kv_lens]).astype(np.int32),
        block_tables=block_tables,
        cu_q_lens=cu,
        num_seqs=np.int32(num_seqs),
    )


@functools.cache
def _attention_fn(
    backend: str,
    sm_scale: float,
    max_q_len: int,
    soft_cap: float | None,
    max_long_seqs: int | None = None,
):
    return jax.jit(
        functools.partial(
            paged_attention,
            sm_scale=sm_scale,
            max_q_len=max_q_len,
            soft_cap=soft_cap,
            backend=backend,
            max_long_seqs=max_long_seqs,
        )
    )


def _check_against_reference(
    batch: RaggedBatch, cfg: AttnConfig, backend: str, max_long_seqs: int | None = None
) -> None:
    sm_scale = 1.0 / math.sqrt(cfg.head_dim)
    fn = _attention_fn(backend, sm_scale, cfg.max_q_len, cfg.soft_cap, max_long_seqs)
    out = fn(*batch.args())
    assert out.shape == batch.q.shape and out.dtype == batch.q.dtype
    out = np.asarray(out.astype(jnp.float32))
    ref = paged_attention_dense_reference(
        *dataclasses.astuple(batch), sm_scale=sm_scale, soft_cap=cfg.soft_cap
    )
    n = batch.num_valid_tokens
    np.testing.assert_allclose(out[:n], ref[:n], **TOLERANCE[jnp.dtype(cfg.dtype)])
    # Padding tokens come out as exact zeros, whatever they held (NaN here).
    assert np.all(out[n:] == 0.0)


def _hypothesis_settings(backend: str):
    return settings(
        max_examples=MAX_EXAMPLES[backend],
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )


@pytest.mark.parametrize("cfg", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_ragged_attention_matches_dense_reference(backend: str, cfg: AttnConfig) -> None:
    @_hypothesis_settings(backend)
    @given(batch=ragged_batches(cfg))
    def check(batch: RaggedBatch) -> None:
        _check_against_reference(batch, cfg, backend)

    check()


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_batch_of_long_prefills(backend: str) -> None:
    """Every sequence a chunk of max_q_len after earlier context: all q blocks and pages busy."""
    cfg = CONFIGS[0]
    rng = np.random.default_rng(7)
    n = cfg.max_seqs
    q_len = min(cfg.max_q_len, cfg.num_tokens // n)
    ctx = cfg.capacity - q_len
    q_lens = np.full(n, q_len)
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    pages = rng.permutation(np.arange(1, cfg.num_pages)).reshape(n, cfg.pages_per_seq)
    shape = (cfg.kv_heads, cfg.num_pages, cfg.page_size, cfg.head_dim)
    batch = RaggedBatch(
        q=rng.standard_normal((cfg.num_tokens, cfg.q_heads, cfg.head_dim)).astype(np.float32),
        k_pages=rng.standard_normal(shape).astype(np.float32),
        v_pages=rng.standard_normal(shape).astype(np.float32),
        kv_lens=np.full(n, ctx + q_len, np.int32),
        block_tables=pages.astype(np.int32),
        cu_q_lens=cu,
        num_seqs=np.int32(n),
    )
    _check_against_reference(batch, cfg, backend)


def test_pallas_ignores_nan_in_stale_slots_and_cu_padding() -> None:
    """Slots past kv_len of a reused page may hold NaN from an earlier request; they must not
    leak (the kernel zeroes V outside the sequence before P @ V, since 0 * NaN is NaN). Nor may
    cu_q_lens entries past num_seqs matter. (The XLA backend's stale-slot case is the next
    test; it expects cu_q_lens past num_seqs to repeat the last live value.)"""
    cfg = CONFIGS[2]

    @_hypothesis_settings("pallas_interpret")
    @given(batch=ragged_batches(cfg, stale_fill=np.nan, cu_padding="zero"))
    def check(batch: RaggedBatch) -> None:
        _check_against_reference(batch, cfg, "pallas_interpret")

    check()


@pytest.mark.parametrize("cfg", [CONFIGS[0], DECODE_BF16], ids=["general", "decode"])
def test_xla_ignores_nan_in_stale_slots(cfg: AttnConfig) -> None:
    """Both XLA paths, the general one and decode (max_q_len 1), zero V past each sequence's
    end: a reused page's NaN from an earlier request must not reach a step's output."""

    @_hypothesis_settings("xla")
    @given(batch=ragged_batches(cfg, stale_fill=np.nan))
    def check(batch: RaggedBatch) -> None:
        _check_against_reference(batch, cfg, "xla")

    check()


@pytest.mark.parametrize("stale_fill", [100.0, np.nan], ids=["garbage", "nan"])
@pytest.mark.parametrize("cfg", [CONFIGS[0], CONFIGS[2]], ids=["p16-g3", "p32-cap"])
def test_xla_split_of_long_sequences_matches_reference(cfg: AttnConfig, stale_fill) -> None:
    """With `max_long_seqs` below the row count, the XLA backend runs every sequence's last
    token through the decode path and pads only the sequences with longer chunks: the same
    output as the reference, for any bound at or above the number of such sequences."""

    @_hypothesis_settings("xla")
    @given(batch=ragged_batches(cfg, stale_fill=stale_fill), extra=st.integers(0, 2))
    def check(batch: RaggedBatch, extra: int) -> None:
        n = int(batch.num_seqs)
        n_long = int(np.sum(np.diff(batch.cu_q_lens)[:n] > 1))
        bound = min(cfg.max_seqs - 1, max(1, n_long + extra))
        if n_long > bound:
            return  # more long sequences than a split of fewer rows than max_seqs can take
        _check_against_reference(batch, cfg, "xla", max_long_seqs=bound)

    check()


def test_no_sequences_gives_zeros() -> None:
    cfg = CONFIGS[0]
    shape = (cfg.kv_heads, cfg.num_pages, cfg.page_size, cfg.head_dim)
    batch = RaggedBatch(
        q=np.ones((cfg.num_tokens, cfg.q_heads, cfg.head_dim), np.float32),
        k_pages=np.ones(shape, np.float32),
        v_pages=np.ones(shape, np.float32),
        kv_lens=np.full(cfg.max_seqs, 3, np.int32),
        block_tables=np.ones((cfg.max_seqs, cfg.pages_per_seq), np.int32),
        cu_q_lens=np.zeros(cfg.max_seqs + 1, np.int32),
        num_seqs=np.int32(0),
    )
    for backend in BACKENDS:
        fn = _attention_fn(backend, 0.1, cfg.max_q_len, None)
        assert np.all(np.asarray(fn(*batch.args())) == 0.0), backend


@pytest.mark.parametrize(
    "dtype, group, page_size, max_q_len",
    [("float32", 3, 16, 1), ("bfloat16", 3, 16, 128), ("bfloat16", 8, 8, 1), ("float32", 1, 32, 7)],
)
def test_pallas_lowers_to_triton(dtype: str, group: int, page_size: int, max_q_len: int) -> None:
    """No GPU here: lower the compiled (not interpreted) kernel for CUDA, which runs the Pallas ->
    Triton lowering and its checks (power-of-two tensor sizes, supported primitives)."""
    dt = jnp.dtype(dtype)
    kv_heads, head_dim, num_pages, max_seqs = 3, 64, 64, 3  # odd sizes on purpose
    sds = jax.ShapeDtypeStruct
    args = (
        sds((max_seqs * max_q_len, kv_heads * group, head_dim), dt),
        sds((kv_heads, num_pages, page_size, head_dim), dt),
        sds((kv_heads, num_pages, page_size, head_dim), dt),
        sds((max_seqs,), jnp.int32),
        sds((max_seqs, 9), jnp.int32),
        sds((max_seqs + 1,), jnp.int32),
        sds((), jnp.int32),
    )
    fn = functools.partial(
        paged_attention_pallas, sm_scale=0.125, max_q_len=max_q_len, soft_cap=30.0
    )
    lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
    assert "triton" in lowered.as_text()


# --- KV write -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_write_kv_writes_exactly_the_mapped_slots(dtype: str) -> None:
    rng = np.random.default_rng(3)
    kv_heads, num_pages, page_size, head_dim, num_tokens = 2, 12, 8, 16, 20
    total = num_pages * page_size
    shape = (kv_heads, num_pages, page_size, head_dim)
    k_pages = rng.standard_normal(shape).astype(dtype)
    v_pages = rng.standard_normal(shape).astype(dtype)
    k = rng.standard_normal((num_tokens, kv_heads, head_dim)).astype(dtype)
    v = rng.standard_normal((num_tokens, kv_heads, head_dim)).astype(dtype)
    slots = rng.choice(np.arange(page_size, total), num_tokens, replace=False).astype(np.int32)
    slots[rng.random(num_tokens) < 0.3] = -1  # padding tokens: dropped

    new_k, new_v = jax.jit(write_kv)(
        jnp.asarray(k_pages), jnp.asarray(v_pages), jnp.asarray(k), jnp.asarray(v),
        jnp.asarray(slots),
    )  # fmt: skip

    for pages, new, tokens in ((k_pages, new_k, k), (v_pages, new_v, v)):
        expected = pages.reshape(kv_heads, total, head_dim).copy()
        kept = slots >= 0
        expected[:, slots[kept]] = np.swapaxes(tokens[kept], 0, 1)
        got = np.asarray(new)
        assert got.dtype == pages.dtype and got.shape == pages.shape
        # Byte-equal: written slots hold the tokens exactly, every other slot is untouched.
        assert (
            got.reshape(-1).view(np.uint8).tobytes()
            == expected.reshape(-1).view(np.uint8).tobytes()
        )


def test_write_kv_all_padding_is_a_no_op() -> None:
    pages = jnp.arange(2 * 3 * 4 * 16, dtype=jnp.float32).reshape(2, 3, 4, 16)
    new = jnp.ones((5, 2, 16), jnp.float32)
    k2, v2 = write_kv(pages, pages, new, new, jnp.full((5,), -1, jnp.int32))
    assert np.array_equal(np.asarray(k2), np.asarray(pages))
    assert np.array_equal(np.asarray(v2), np.asarray(pages))


# --- Validation -----------------------------------------------------------------------------


def _valid_args(head_dim: int = 16) -> dict[str, jax.Array]:
    return dict(
        q=jnp.zeros((4, 6, head_dim), jnp.float32),
        k_pages=jnp.zeros((2, 5, 8, head_dim), jnp.float32),
        v_pages=jnp.zeros((2, 5, 8, head_dim), jnp.float32),
        kv_lens=jnp.zeros((3,), jnp.int32),
        block_tables=jnp.zeros((3, 2), jnp.int32),
        cu_q_lens=jnp.zeros((4,), jnp.int32),
        num_seqs=jnp.int32(0),
    )


@pytest.mark.parametrize(
    "name, bad, message",
    [
        ("q", jnp.zeros((4, 96), jnp.float32), "q must be"),
        ("q", jnp.zeros((4, 6, 32), jnp.float32), "head_dim"),
        ("q", jnp.zeros((4, 5, 16), jnp.float32), "multiple of kv_heads"),
        ("q", jnp.zeros((4, 6, 16), jnp.int32), "q dtype"),
        ("k_pages", jnp.zeros((2, 5, 8), jnp.float32), "k_pages must be"),
        ("v_pages", jnp.zeros((2, 6, 8, 16), jnp.float32), "v_pages shape"),
        ("k_pages", jnp.zeros((2, 5, 8, 16), jnp.int8), "k_pages dtype"),
        ("v_pages", jnp.zeros((2, 5, 8, 16), jnp.bfloat16), "v_pages dtype"),
        ("block_tables", jnp.zeros((3,), jnp.int32), "block_tables must be"),
        ("block_tables", jnp.zeros((3, 2), jnp.float32), "integer"),
        ("kv_lens", jnp.zeros((4,), jnp.int32), "kv_lens must have shape"),
        ("cu_q_lens", jnp.zeros((3,), jnp.int32), "cu_q_lens must have shape"),
    ],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs_raise_kernel_input_error(backend, name, bad, message) -> None:
    args = _valid_args()
    args[name] = bad
    with pytest.raises(KernelInputError, match=message):
        paged_attention(**args, backend=backend)


def test_unknown_backend_raises() -> None:
    with pytest.raises(KernelInputError, match="unknown attention backend"):
        paged_attention(**_valid_args(), backend="triton")


def test_compiled_pallas_rejects_shapes_triton_cannot_tile() -> None:
    # Checked while tracing, before any GPU lowering, so this runs on CPU too.
    with pytest.raises(KernelInputError, match="power of two"):
        paged_attention(**_valid_args(head_dim=24), backend="pallas")
    # The interpreter has no such limit.
    out = paged_attention(**_valid_args(head_dim=24), backend="pallas_interpret")
    assert out.shape == (4, 6, 24)


def test_pallas_rejects_empty_query_bucket() -> None:
    with pytest.raises(KernelInputError, match="max_q_len"):
        paged_attention(**_valid_args(), max_q_len=0, backend="pallas_interpret")

"""Kernel micro-benchmarks on the CPU serving path; writes `benchmarks/results/kernels.json`.

Section "attention": one decode step's attention for one layer (one query token per sequence)
on the XLA backend, SmolLM2-135M shapes (9 query heads, 3 KV heads, head_dim 64), page size 16,
float32, at batch 1/8/32 and context 256/1024/4096. Each case is jitted, warmed up, then timed
as the median of repeats. Block tables point at shuffled pages, as a long-running pool's would.

Section "mixed": one mixed step's attention for one layer: `batch` sequences, `long` of them
prefilling a 128-token chunk after 128 cached tokens, the rest decoding at context 256, timed
with and without the `max_long_seqs` hint (the split: decodes through the decode path, only the
chunks padded to 128 queries), alternating, as a ratio in the same run.

Sections are registered in `SECTIONS` (name -> function of the parsed args returning a
JSON-ready value); each lands under its own key of the output, next to `machine`, `versions` and
`config` (machine and versions from `benchmarks/common.py`). Add a section by writing its function and registering it there.

    python benchmarks/kernel_bench.py            # full run
    python benchmarks/kernel_bench.py --quick    # fewer cases and repeats (smoke test)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from common import machine_info, versions  # benchmarks/common.py, beside this script

from pipelive_jax.kernels import paged_attention

# SmolLM2-135M attention shapes.
Q_HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64
PAGE_SIZE = 16
DTYPE = jnp.float32

BATCHES = (1, 8, 32)
CONTEXTS = (256, 1024, 4096)
QUICK_BATCHES = (1, 8)
QUICK_CONTEXTS = (256, 1024)

RESULTS = Path(__file__).resolve().parent / "results" / "kernels.json"


def time_call(fn: Callable[[], jax.Array], warmup: int, repeats: int) -> list[float]:
    """Wall seconds of `repeats` calls of `fn` after `warmup` calls, each waited on."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return times


def decode_batch(batch: int, context: int, seed: int = 0) -> tuple[jax.Array, ...]:
    """Arguments of one decode step: every sequence at `context` tokens, its last one new.

    Returns (q, k_pages, v_pages, kv_lens, block_tables, cu_q_lens, num_seqs) as in the
    contract (`kernels/paged_attention.py`); the pool holds exactly the pages in use plus page 0.
    """
    rng = np.random.default_rng(seed)
    pages_per_seq = -(-context // PAGE_SIZE)
    num_pages = 1 + batch * pages_per_seq
    block_tables = rng.permutation(np.arange(1, num_pages)).reshape(batch, pages_per_seq)
    pool_shape = (KV_HEADS, num_pages, PAGE_SIZE, HEAD_DIM)
    return (
        jnp.asarray(rng.standard_normal((batch, Q_HEADS, HEAD_DIM)), DTYPE),
        jnp.asarray(rng.standard_normal(pool_shape), DTYPE),
        jnp.asarray(rng.standard_normal(pool_shape), DTYPE),
        jnp.full((batch,), context, jnp.int32),
        jnp.asarray(block_tables, jnp.int32),
        jnp.arange(batch + 1, dtype=jnp.int32),
        jnp.int32(batch),
    )


def bench_attention(args: argparse.Namespace) -> list[dict[str, object]]:
    batches = QUICK_BATCHES if args.quick else BATCHES
    contexts = QUICK_CONTEXTS if args.quick else CONTEXTS
    fn = jax.jit(lambda *a: paged_attention(*a, max_q_len=1, backend="xla"))
    itemsize = jnp.dtype(DTYPE).itemsize
    rows = []
    for batch in batches:
        for context in contexts:
            call_args = decode_batch(batch, context)
            times = time_call(lambda a=call_args: fn(*a), args.warmup, args.repeats)
            median = statistics.median(times)
            # K and V of every live token, each read once.
            kv_bytes = 2 * batch * context * KV_HEADS * HEAD_DIM * itemsize
            row = {
                "batch": batch,
                "context": context,
                "median_ms": round(median * 1e3, 4),
                "min_ms": round(min(times) * 1e3, 4),
                "max_ms": round(max(times) * 1e3, 4),
                "kv_bytes": kv_bytes,
                "kv_gb_per_s": round(kv_bytes / median / 1e9, 3),
            }
            rows.append(row)
            print(
                f"attention  batch {batch:3d}  context {context:5d}  "
                f"{row['median_ms']:9.3f} ms  {row['kv_gb_per_s']:7.2f} GB/s KV",
                flush=True,
            )
            del call_args
    return rows


def mixed_batch(batch: int, long: int, chunk: int = 128, context: int = 256, seed: int = 0):
    """Arguments of a mixed step: `long` sequences with a `chunk`-token prefill chunk ending at
    `context`, then `batch - long` decodes at `context` (q, pools, kv_lens, tables, cu, n)."""
    rng = np.random.default_rng(seed)
    pages_per_seq = -(-context // PAGE_SIZE)
    num_pages = 1 + batch * pages_per_seq
    block_tables = rng.permutation(np.arange(1, num_pages)).reshape(batch, pages_per_seq)
    q_lens = np.array([chunk] * long + [1] * (batch - long))
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    pool_shape = (KV_HEADS, num_pages, PAGE_SIZE, HEAD_DIM)
    return (
        jnp.asarray(rng.standard_normal((int(cu[-1]), Q_HEADS, HEAD_DIM)), DTYPE),
        jnp.asarray(rng.standard_normal(pool_shape), DTYPE),
        jnp.asarray(rng.standard_normal(pool_shape), DTYPE),
        jnp.full((batch,), context, jnp.int32),
        jnp.asarray(block_tables, jnp.int32),
        jnp.asarray(cu),
        jnp.int32(batch),
    )


def bench_mixed(args: argparse.Namespace) -> list[dict[str, object]]:
    cases = [(8, 1), (32, 1), (32, 4)] if not args.quick else [(8, 1)]
    rows = []
    for batch, long in cases:
        call_args = mixed_batch(batch, long)
        padded = jax.jit(lambda *a: paged_attention(*a, max_q_len=128, backend="xla"))
        split = jax.jit(
            lambda *a, n=long: paged_attention(*a, max_q_len=128, backend="xla", max_long_seqs=n)
        )
        same = float(jnp.max(jnp.abs(padded(*call_args) - split(*call_args))))
        times: dict[str, list[float]] = {"padded": [], "split": []}
        for _ in range(args.repeats):  # alternate, so that drift falls on both alike
            for name, fn in (("padded", padded), ("split", split)):
                times[name] += time_call(lambda f=fn, a=call_args: f(*a), 1, 1)
        p, s = statistics.median(times["padded"]), statistics.median(times["split"])
        row = {
            "batch": batch,
            "long_seqs": long,
            "padded_ms": round(p * 1e3, 4),
            "split_ms": round(s * 1e3, 4),
            "split_over_padded": round(s / p, 4),
            "max_abs_difference": same,
        }
        rows.append(row)
        print(
            f"mixed  batch {batch:3d}  long {long}  padded {row['padded_ms']:8.3f} ms  "
            f"split {row['split_ms']:8.3f} ms  ratio {row['split_over_padded']:.3f}",
            flush=True,
        )
    return rows


# Section name -> function of the parsed args returning the section's JSON value.
SECTIONS: dict[str, Callable[[argparse.Namespace], object]] = {
    "attention": bench_attention,
    "mixed": bench_mixed,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer cases and repeats")
    parser.add_argument("--sections", nargs="+", choices=sorted(SECTIONS), default=list(SECTIONS))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.warmup, args.repeats = (1, 5) if args.quick else (3, 20)

    machine = machine_info()
    # Other work on the machine skews CPU timings; the load at the start says how much.
    machine["load_average_1_5_15"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    report: dict[str, object] = {
        "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine,
        "versions": versions(),
        "config": {
            "model_shapes": "SmolLM2-135M",
            "q_heads": Q_HEADS,
            "kv_heads": KV_HEADS,
            "head_dim": HEAD_DIM,
            "page_size": PAGE_SIZE,
            "dtype": jnp.dtype(DTYPE).name,
            "attention_backend": "xla",
            "attention_mode": "decode, one query token per sequence, one layer per call",
            "warmup": args.warmup,
            "repeats": args.repeats,
            "statistic": "median wall time, jitted, block_until_ready",
            "quick": args.quick,
        },
    }
    for name in args.sections:
        report[name] = SECTIONS[name](args)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

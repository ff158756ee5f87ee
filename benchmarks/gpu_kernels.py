"""GPU check of the Pallas attention kernel: compile, compare with XLA, time both.

On a GPU machine, for each case (decode batches 8/32 at context 1024/4096, a mixed batch of
prefill chunks and decodes, a Llama-3-8B-shaped decode; float32 and bfloat16) this compiles the
Pallas kernel (Triton, not interpreted), checks it against the XLA backend (run at "highest"
matmul precision so that TF32 does not blur the comparison), times both backends (median of
`--repeats` calls after warm-up, each waited on with block_until_ready) and reports the KV
bandwidth achieved: bytes of live K and V read / median time.

Writes JSON to `$OUT/gpu_check.json` if $OUT is set, else `results/gpu_check.json`, with the jax
version, device, block sizes and every case (errors included: one failing case does not stop
the others). Exits 1 if any case failed or mismatched.

    python benchmarks/gpu_kernels.py              # on the GPU machine
    python benchmarks/gpu_kernels.py --interpret  # CPU smoke test of this script (tiny shapes)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
try:
    import pipelive_jax.kernels  # noqa: F401
except ImportError:  # not pip-installed: map the source tree as pyproject's package-dir does
    sys.path.insert(0, str(ROOT))
    import pipelive_jax

    pipelive_jax.__path__.append(str(ROOT))

from kernel_bench import time_call  # noqa: E402  (benchmarks/, beside this script)

from pipelive_jax.kernels import paged_attention  # noqa: E402
from pipelive_jax.kernels.pallas_attention import DEFAULT_BLOCK_SIZES  # noqa: E402

# Largest |pallas - xla| accepted, per dtype. float32: the kernel's dots are IEEE float32, the
# reference runs at "highest" precision; only summation order differs. bfloat16: inputs are the
# same bf16 values, but the kernel rounds softmax weights to bf16 before P @ V and both round
# the output to bf16 (2^-8 relative on |out| <~ 3 for N(0, 1) values).
ATOL = {"float32": 1e-3, "bfloat16": 4e-2}


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    q_lens: tuple[int, ...]  # new tokens per sequence
    kv_lens: tuple[int, ...]  # cached tokens per sequence, including the new ones
    q_heads: int = 9  # SmolLM2-135M by default
    kv_heads: int = 3
    head_dim: int = 64
    page_size: int = 16

    @property
    def max_q_len(self) -> int:
        return max(self.q_lens)


def decode(batch: int, context: int, **shape) -> Case:
    name = f"decode_b{batch}_ctx{context}" + ("_" + shape.pop("tag") if "tag" in shape else "")
    return Case(name, (1,) * batch, (context,) * batch, **shape)


def mixed(prefills: int, chunk: int, decodes: int, context: int) -> Case:
    """`prefills` chunks of `chunk` tokens after growing earlier context, and `decodes` decodes."""
    q_lens = (chunk,) * prefills + (1,) * decodes
    kv_lens = tuple(chunk * (i + 1) for i in range(prefills)) + (context,) * decodes
    return Case(f"mixed_{prefills}x{chunk}_plus_{decodes}_decodes", q_lens, kv_lens)


GPU_CASES = [
    decode(8, 1024),
    decode(8, 4096),
    decode(32, 1024),
    decode(32, 4096),
    mixed(4, 256, 28, 2048),
    decode(32, 4096, q_heads=32, kv_heads=8, head_dim=128, tag="llama3_8b"),
]
INTERPRET_CASES = [
    decode(2, 64, page_size=8, head_dim=16),
    Case("mixed_small", (12, 1, 1), (40, 17, 5), head_dim=16, page_size=8),
]


def make_inputs(case: Case, dtype: str, seed: int = 0) -> tuple[tuple[jax.Array, ...], int]:
    """Contract arguments for `case` over a shuffled pool, and the bytes of live K and V."""
    rng = np.random.default_rng(seed)
    pages = [-(-n // case.page_size) for n in case.kv_lens]
    width = max(pages)
    num_pages = 1 + sum(pages)
    free = list(rng.permutation(np.arange(1, num_pages)))
    block_tables = np.zeros((len(pages), width), np.int32)
    for i, n in enumerate(pages):
        block_tables[i, :n] = [free.pop() for _ in range(n)]
    cu = np.concatenate([[0], np.cumsum(case.q_lens)]).astype(np.int32)
    pool_shape = (case.kv_heads, num_pages, case.page_size, case.head_dim)
    dt = jnp.dtype(dtype)
    args = (
        jnp.asarray(rng.standard_normal((int(cu[-1]), case.q_heads, case.head_dim)), dt),
        jnp.asarray(rng.standard_normal(pool_shape), dt),
        jnp.asarray(rng.standard_normal(pool_shape), dt),
        jnp.asarray(case.kv_lens, jnp.int32),
        jnp.asarray(block_tables),
        jnp.asarray(cu),
        jnp.int32(len(pages)),
    )
    kv_bytes = 2 * sum(case.kv_lens) * case.kv_heads * case.head_dim * dt.itemsize
    return args, kv_bytes


def run_case(case: Case, dtype: str, pallas_backend: str, args: argparse.Namespace) -> dict:
    inputs, kv_bytes = make_inputs(case, dtype)
    sm_scale = 1.0 / math.sqrt(case.head_dim)
    fns = {
        backend: jax.jit(
            lambda *a, b=backend: paged_attention(
                *a, sm_scale=sm_scale, max_q_len=case.max_q_len, backend=b
            )
        )
        for backend in ("xla", pallas_backend)
    }
    shape = {k: v for k, v in dataclasses.asdict(case).items() if k != "name"}
    row: dict = {"case": case.name, "dtype": dtype, **shape}
    row.update(num_tokens=int(inputs[0].shape[0]), kv_bytes=kv_bytes)

    start = time.perf_counter()
    out = jax.block_until_ready(fns[pallas_backend](*inputs))
    row["pallas_compile_and_first_run_s"] = round(time.perf_counter() - start, 3)
    with jax.default_matmul_precision("highest"):
        ref = jax.jit(lambda *a: paged_attention(*a, sm_scale=sm_scale, max_q_len=case.max_q_len))(
            *inputs
        )
    err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32))))
    row["max_abs_err_vs_xla"] = err
    row["finite"] = bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))
    row["ok"] = row["finite"] and err <= ATOL[dtype]

    for backend, fn in fns.items():
        key = "pallas" if backend == pallas_backend else "xla"
        times = time_call(lambda f=fn: f(*inputs), args.warmup, args.repeats)
        median = statistics.median(times)
        row[f"{key}_median_us"] = round(median * 1e6, 2)
        row[f"{key}_min_us"] = round(min(times) * 1e6, 2)
        row[f"{key}_kv_gb_per_s"] = round(kv_bytes / median / 1e9, 2)
    row["speedup_vs_xla"] = round(row["xla_median_us"] / row["pallas_median_us"], 3)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interpret", action="store_true", help="CPU smoke test, tiny shapes")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    if args.interpret:
        pallas_backend, cases = "pallas_interpret", INTERPRET_CASES
        args.repeats, args.warmup = min(args.repeats, 3), 1
    elif jax.default_backend() != "gpu":
        print(f"no GPU: jax runs on {jax.default_backend()!r}; use --interpret for a CPU smoke run")
        return 2
    else:
        pallas_backend, cases = "pallas", GPU_CASES

    out_path = args.out or (
        Path(os.environ["OUT"]) / "gpu_check.json"
        if os.environ.get("OUT")
        else ROOT / "results" / "gpu_check.json"
    )
    device = jax.devices()[0]
    report: dict = {
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "python": sys.version.split()[0],
        "backend": jax.default_backend(),
        "device": getattr(device, "device_kind", str(device)),
        "pallas_backend": pallas_backend,
        "block_sizes": dataclasses.asdict(DEFAULT_BLOCK_SIZES),
        "config": {"repeats": args.repeats, "warmup": args.warmup, "atol": ATOL},
        "cases": [],
    }
    print(f"{report['device']}  jax {jax.__version__}  {pallas_backend}", flush=True)

    failures = 0
    for case in cases:
        for dtype in args.dtypes:
            try:
                row = run_case(case, dtype, pallas_backend, args)
            except Exception as e:  # record and go on: device time is scarce
                row = {"case": case.name, "dtype": dtype, "ok": False, "error": repr(e)}
                row["traceback"] = traceback.format_exc(limit=8)
            report["cases"].append(row)
            failures += not row["ok"]
            if "error" in row:
                print(f"{case.name:36s} {dtype:8s} ERROR {row['error'][:300]}", flush=True)
            else:
                print(
                    f"{case.name:36s} {dtype:8s} err {row['max_abs_err_vs_xla']:.2e} "
                    f"{'ok ' if row['ok'] else 'BAD'}  pallas {row['pallas_median_us']:9.1f} us "
                    f"({row['pallas_kv_gb_per_s']:7.1f} GB/s)  xla {row['xla_median_us']:9.1f} us "
                    f"({row['xla_kv_gb_per_s']:7.1f} GB/s)  x{row['speedup_vs_xla']}",
                    flush=True,
                )
            out_path.parent.mkdir(parents=True, exist_ok=True)
            out_path.write_text(json.dumps(report, indent=2) + "\n")  # partial results survive
    report["all_ok"] = failures == 0
    out_path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'all ok' if failures == 0 else f'{failures} case(s) failed'}; wrote {out_path}")
    return 0 if failures == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())

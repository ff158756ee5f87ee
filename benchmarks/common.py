"""Shared helpers of the benchmark scripts: machine and version info, timing, JSON results.

Each script writes `benchmarks/results/NAME.json` with
{"machine", "versions", "config", "results", "timestamp"}.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from pipelive_jax.bench.machine import CpuWatch, git_commit, machine_info

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(ROOT, "benchmarks", "results")

# The peer must never try to reach a model hub: every file it reads is local.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def _version(module: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(module)
    except metadata.PackageNotFoundError:
        pass
    try:
        mod = importlib.import_module(module)
    except Exception:  # noqa: BLE001 - absent or broken: report None
        return None
    return getattr(mod, "__version__", None)


def versions() -> dict[str, Any]:
    out: dict[str, Any] = {"python": sys.version.split()[0]}
    for name in (
        "jax",
        "jaxlib",
        "flax",
        "numpy",
        "torch",
        "transformers",
        "accelerate",
        "gguf",
        "tokenizers",
    ):
        out[name] = _version(name)
    try:
        import jax

        out["jax_backend"] = jax.default_backend()
        out["jax_devices"] = [str(d) for d in jax.devices()]
    except Exception:  # noqa: BLE001
        pass
    try:
        import torch

        out["torch_num_threads"] = torch.get_num_threads()
    except Exception:  # noqa: BLE001
        pass
    out["xla_flags"] = os.environ.get("XLA_FLAGS")
    out["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY")
    out["omp_num_threads"] = os.environ.get("OMP_NUM_THREADS")
    g = git_commit()
    out["git_commit"] = g["commit"]
    out["git_dirty"] = g["dirty"]
    return out


def write_results(name: str, config: dict[str, Any], results: dict[str, Any]) -> str:
    """Writes benchmarks/results/NAME.json and returns its path."""
    os.makedirs(RESULTS_DIR, exist_ok=True)
    doc = {
        "machine": machine_info(),
        "versions": versions(),
        "config": config,
        "results": results,
        "timestamp": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
    path = os.path.join(RESULTS_DIR, f"{name}.json")
    with open(path, "w") as f:
        json.dump(doc, f, indent=2, default=_json_default)
        f.write("\n")
    return path


def _json_default(o: Any) -> Any:
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:
        pass
    return str(o)


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """(fn(), seconds)."""
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def random_prompts(
    batch: int, length: int, vocab: int, seed: int = 0, low: int = 3
) -> list[list[int]]:
    """Fixed-seed random token ids (ids below `low`, the special tokens, are avoided)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return rng.integers(low, vocab, size=(batch, length)).tolist()


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 3)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------- the peer: HF transformers


def load_hf_peer(gguf_path: str, *, tokenizer: bool = True, dtype: str = "float32") -> tuple[Any, Any]:
    """(model, tokenizer or None) from the same GGUF file, torch CPU in `dtype`, eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, name = os.path.dirname(gguf_path), os.path.basename(gguf_path)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name) if tokenizer else None
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=getattr(torch, dtype))
    model.eval()
    return model, tok


# ---------------------------------------------------------------- contention on a shared machine


def other_load(seconds: float = 1.0) -> float | None:
    """Cores busy with other processes over the next `seconds`."""
    with CpuWatch() as w:
        time.sleep(seconds)
    return w.other_cores


def wait_for_quiet(max_wait_s: float = 120.0, threshold: float = 0.2, window_s: float = 1.0) -> dict[str, Any]:
    """Waits (up to max_wait_s) until other processes use under `threshold` cores; says how it went."""
    t0 = time.perf_counter()
    load = other_load(window_s)
    while load is not None and load > threshold and time.perf_counter() - t0 < max_wait_s:
        time.sleep(2.0)
        load = other_load(window_s)
    return {"waited_s": round(time.perf_counter() - t0, 1), "other_cores_before": load}

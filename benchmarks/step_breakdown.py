"""Where a float32 decode step's time goes on SmolLM2, and how close it is to the machine's floor:
the evidence behind the throughput target's status (README, "Throughput").

For each batch size B (default 8 and 32), one stage, B requests of 128 random prompt tokens
decoding greedily; a step's time is the median over `steps` decode steps at contexts ~130-170.

  full            the engine's decode step, as served
  no-attention    the same engine with paged attention replaced by passing the queries through
                  (the KV cache is still written): full - this = attention's share
  no-lm-head      the LM head replaced by a broadcast that reads no weights (sampling still
                  takes the argmax over the vocabulary): full - this = the head's share
  linears-xla     only the step's matmuls: the 30 layers' 7 projections and the LM head at
                  M = B rows, the model's own weights, one jitted function (XLA, as we run them)
  linears-torch   the same matmuls with torch.nn.functional.linear (as the peer runs them)
  stream          one pass of jnp.sum over as many float32 bytes as the weights: the time the
                  weights alone take to come from memory at the machine's streaming bandwidth
  dot_backends    linears-xla again under each of XLA's CPU dot back ends (XLA_FLAGS, each in
                  its own process): whether another library runs the step's matmuls faster

The three engine variants run in separate processes (a patch must be in place before anything
is traced); the variants are not models anyone should serve, they only split the time.

Usage: .venv/bin/python benchmarks/step_breakdown.py [--batches 8,32] [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
from kernel_bench import time_call  # noqa: E402

VARIANTS = ("full", "no-attention", "no-lm-head")
# XLA_FLAGS of the CPU dot back ends: the default (YNNPACK), oneDNN (two ways), XNNPACK, and
# Eigen (the YNNPACK fusion turned off).
DOT_BACKENDS = {
    "default (YNNPACK)": "",
    "oneDNN": "--xla_cpu_use_onednn=true",
    "oneDNN fusion": "--xla_cpu_experimental_onednn_fusion_type=dot",
    "XNNPACK fusion": "--xla_cpu_experimental_xnn_fusion_type=dot",
    "Eigen": "--xla_cpu_experimental_ynn_fusion_type=",
}
PROMPT_LEN = 128


def engine_steps(variant: str, batches: list[int], steps: int) -> dict[str, float]:
    """Median decode-step ms per batch size for one engine variant (run in its own process)."""
    import jax.numpy as jnp

    import pipelive_jax.models.llama as llama

    if variant == "no-attention":
        llama.paged_attention = lambda q, *a, **kw: q  # type: ignore[assignment]
    elif variant == "no-lm-head":

        def no_head(self: Any, h: Any) -> Any:
            return jnp.broadcast_to(h[:, :1], (h.shape[0], self.weight.shape[0]))

        llama.LMHead.__call__ = no_head  # type: ignore[method-assign]
    from pipelive_jax.models.registry import load_model
    from pipelive_jax.serving.llm import LLM
    from pipelive_jax.serving.sampling import SamplingParams

    loaded = load_model("smollm2-135m")
    out = {}
    for b in batches:
        llm = LLM(
            loaded,
            max_num_seqs=b,
            max_num_batched_tokens=2048,
            max_model_len=512,
            num_pages=b * 16 + 32,
        )
        eng = llm.engine
        prompts = common.random_prompts(b, PROMPT_LEN, loaded.config.vocab_size)
        sp = SamplingParams(max_tokens=steps + 12, ignore_eos=True)
        for p in prompts:
            eng.add_request(p, sp)
        times = []
        while eng.has_unfinished():
            t = time.perf_counter()
            eng.step()
            times.append(time.perf_counter() - t)
        # The first steps prefill and compile; the last ones run as requests finish.
        decode = times[-(steps + 4) : -4]
        out[str(b)] = round(statistics.median(decode) * 1e3, 2)
        del llm, eng
    return out


def linears(batches: list[int], repeats: int = 7, with_torch: bool = True) -> dict[str, Any]:
    """The step's matmuls alone, XLA and torch, and the weights' streaming floor."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from pipelive_jax.models.registry import load_model

    loaded = load_model("smollm2-135m")
    sd = loaded.model.hf_state_dict()  # [out, in] float32
    names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    layers = [
        {
            n: sd[f"model.layers.{i}.{'self_attn' if n[0] in 'qkvo' else 'mlp'}.{n}.weight"]
            for n in names
        }
        for i in range(loaded.config.num_layers)
    ]
    head = sd["model.embed_tokens.weight"]
    nbytes = sum(w.nbytes for lay in layers for w in lay.values()) + head.nbytes

    def step(mm: Any, add: Any, silu: Any, x: Any, ws: list[dict[str, Any]], hw: Any) -> Any:
        # The data flow of a layer without attention: q's output stands in for attention's.
        for w in ws:
            q = mm(x, w["q_proj"])
            k, v = mm(x, w["k_proj"]), mm(x, w["v_proj"])
            x = add(x, mm(q, w["o_proj"]) * 0.01) + (k.sum() + v.sum()) * 1e-9
            x = add(x, mm(silu(mm(x, w["gate_proj"])) * mm(x, w["up_proj"]), w["down_proj"]) * 0.01)
        return mm(x, hw)

    jws = [{n: jnp.asarray(w.T) for n, w in lay.items()} for lay in layers]  # [in, out], ours
    jhead = jnp.asarray(head)
    jstep = jax.jit(
        lambda x, ws, hw: step(
            lambda a, b: a @ b if b.shape[0] == a.shape[1] else jnp.einsum("rh,vh->rv", a, b),
            jnp.add,
            jax.nn.silu,
            x,
            ws,
            hw,
        )
    )
    tws = [{n: torch.from_numpy(w.copy()) for n, w in lay.items()} for lay in layers]
    thead = torch.from_numpy(head.copy())
    f = torch.nn.functional

    def tstep(x: Any) -> Any:
        with torch.no_grad():
            return step(f.linear, torch.add, f.silu, x, tws, thead)

    def best(fn: Any) -> float:
        return round(min(time_call(fn, 1, repeats)) * 1e3, 2)

    flat = jnp.ones((nbytes // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    out: dict[str, Any] = {
        "weight_bytes": nbytes,
        "stream_ms": best(lambda: total(flat)),
    }
    out["stream_gb_s"] = round(nbytes / out["stream_ms"] / 1e6, 1)
    rng = np.random.default_rng(0)
    for b in batches:
        x = rng.standard_normal((b, loaded.config.hidden_size)).astype(np.float32)
        xj, xt = jnp.asarray(x), torch.from_numpy(x)
        out[str(b)] = {"linears_xla_ms": best(lambda xj=xj: jstep(xj, jws, jhead))}
        if with_torch:
            out[str(b)]["linears_torch_ms"] = best(lambda xt=xt: tstep(xt))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--batches", default="8,32")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--linears-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    if args.variant:  # a child: print one JSON line
        print("RESULT " + json.dumps(engine_steps(args.variant, batches, args.steps)), flush=True)
        return
    if args.linears_only:  # a child under a dot back end's XLA_FLAGS
        lin = linears(batches, with_torch=False)
        print("RESULT " + json.dumps({b: lin[str(b)]["linears_xla_ms"] for b in batches}))
        return

    def child(extra: list[str], env: dict[str, str], what: str) -> dict[str, float]:
        cmd = [sys.executable, os.path.abspath(__file__), *extra, "--batches", args.batches,
               "--steps", str(args.steps)]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not line:
            sys.exit(f"{what} failed:\n{proc.stderr[-3000:]}")
        result: dict[str, float] = json.loads(line[-1][len("RESULT ") :])
        return result

    config = {"model": "smollm2-135m", "dtype": "float32", "plan": "one stage",
              "prompt_len": PROMPT_LEN, "batches": batches, "decode_steps_timed": args.steps}  # fmt: skip
    steps: dict[str, dict[str, float]] = {}
    for v in VARIANTS:
        common.log(f"engine variant {v} ...")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        steps[v] = child(["--variant", v], env, f"variant {v}")
        common.log(f"  {steps[v]}")
    dots: dict[str, dict[str, Any]] = {}
    for name, flags in DOT_BACKENDS.items():
        common.log(f"matmuls alone under {name} ({flags or 'no flags'}) ...")
        env = dict(os.environ, PYTHONUNBUFFERED="1", XLA_FLAGS=flags)
        dots[name] = {"xla_flags": flags, "ms": child(["--linears-only"], env, name)}
        common.log(f"  {dots[name]['ms']}")
    base = dots["default (YNNPACK)"]["ms"]
    for d in dots.values():
        d["vs_default"] = {b: common.ratio(ms, base[b]) for b, ms in d["ms"].items()}
    common.log("matmuls alone (XLA, torch) and the streaming floor ...")
    lin = linears(batches)
    results: dict[str, Any] = {"stream_ms": lin["stream_ms"], "stream_gb_s": lin["stream_gb_s"],
                               "weight_bytes": lin["weight_bytes"], "by_batch": {},
                               "dot_backends": dots}  # fmt: skip
    for b in map(str, batches):
        full = steps["full"][b]
        row = {
            "step_ms": full,
            "attention_ms": round(full - steps["no-attention"][b], 2),
            "lm_head_ms": round(full - steps["no-lm-head"][b], 2),
            **lin[b],
        }
        row["rest_ms"] = round(full - row["attention_ms"] - row["linears_xla_ms"], 2)
        row["linears_xla_vs_torch"] = common.ratio(row["linears_xla_ms"], row["linears_torch_ms"])
        row["step_vs_linears_xla"] = common.ratio(full, row["linears_xla_ms"])
        row["linears_xla_vs_stream"] = common.ratio(row["linears_xla_ms"], lin["stream_ms"])
        results["by_batch"][b] = row
    common.log(json.dumps(results["by_batch"]))
    path = common.write_results("step_breakdown", config, results)
    common.log(f"wrote {path}")


if __name__ == "__main__":
    main()

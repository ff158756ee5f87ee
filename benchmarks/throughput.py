"""Offline throughput (output tokens/s) on SmolLM2-135M: our engine (1 and 2 stages) against
Hugging Face transformers `generate`, same prompts, same weights, float32, in the same run.

Workload: `batch` prompts of `prompt_len` random token ids (fixed seed, the same ids for every
system), `new_tokens` greedy tokens each with EOS ignored. Throughput = batch * new_tokens / wall
time of the whole call (prefill included on both sides).

  ours-1stage   LLM(loaded) with plan=None (one stage on device 0)
  ours-2stage   LLM(loaded, plan=[15, 15]) (stage i on CPU device i; the script asks XLA for two
                host devices)
  transformers  AutoModelForCausalLM from the same GGUF, torch CPU float32, left padding,
                greedy `generate` with min_new_tokens = max_new_tokens.
  ours-1stage-bf16   one stage with the weights in bfloat16 (bf16 matmul inputs, float32 sums
                and activations: `LLM(dtype="bfloat16")`); the KV cache is the engine's
                default, float32 on CPU (`kv_cache_dtype="auto"`)
  transformers-bf16  the same peer with the model in torch.bfloat16

Each of ours is compared with the peer of its own dtype (the issue's target is float32 against
float32): in a row of the JSON, `ratio_vs_transformers_*` and `greedy_prefix_vs_transformers`
are against that peer (`transformers-bf16` for a bf16 row); bf16 rows also carry
`*_vs_transformers_f32` against the float32 peer. The summary names both sides.

Each configuration runs once untimed with the same shapes (compiles excluded; compile time is
measured separately), then `repeats` timed runs, the systems taking turns so that load from
other processes falls on all of them alike. Before each timed run the script waits (bounded)
for the machine to be quiet, and records how many cores other processes used during the run.

`--profile` also records, for our engine, where a step's time goes: scheduling, host batch
building, dispatch (device_put + compiled calls issued), waiting for the device (fetch), and
the host work after it (appending tokens, detokenizing, stop checks).

Usage: .venv/bin/python benchmarks/throughput.py [--quick] [--profile] [--batches 1,8,32]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

# Two host devices for the two-stage plan; must be set before jax is imported.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip()

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

PLANS: dict[str, Any] = {"ours-1stage": None, "ours-2stage": [15, 15], "ours-1stage-bf16": None}
DTYPES: dict[str, str] = {
    "ours-1stage": "float32",
    "ours-2stage": "float32",
    "ours-1stage-bf16": "bfloat16",
    "transformers": "float32",
    "transformers-bf16": "bfloat16",
}
PEERS = ("transformers", "transformers-bf16")


def peer_of(name: str) -> str:
    """The transformers row of the same dtype as `name`."""
    return "transformers-bf16" if DTYPES[name] == "bfloat16" else "transformers"


# ---------------------------------------------------------------- step profiler (ours)


class StepProfiler:
    """Wraps an engine's parts (instance attributes only) to time each phase of a step."""

    PHASES = ("schedule", "build_batch", "dispatch", "device_wait", "post")

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.steps: list[dict[str, float]] = []
        self.enabled = False
        self._cur: dict[str, float] = {}
        e = engine

        def wrap(obj: Any, name: str, phase: str) -> None:
            orig = getattr(obj, name)

            def inner(*a: Any, **kw: Any) -> Any:
                t = time.perf_counter()
                try:
                    return orig(*a, **kw)
                finally:
                    self._cur[phase] = self._cur.get(phase, 0.0) + time.perf_counter() - t

            setattr(obj, name, inner)

        wrap(e.scheduler, "schedule", "schedule")
        wrap(e, "_build_batch", "build_batch")
        run = e.executor.run

        def run_wrapped(batches: list[Any]) -> Any:
            t = time.perf_counter()
            results = run(batches)
            self._cur["dispatch"] = self._cur.get("dispatch", 0.0) + time.perf_counter() - t
            for r in results:
                wrap(r, "fetch", "device_wait")
            self._cur["tokens"] = self._cur.get("tokens", 0) + sum(int(b.token_ids.shape[0]) for b in batches)
            self._cur["rows"] = self._cur.get("rows", 0) + sum(int(b.num_seqs) for b in batches)
            return results

        e.executor.run = run_wrapped
        step = e.step

        def step_wrapped() -> Any:
            self._cur = {}
            t = time.perf_counter()
            out = step()
            total = time.perf_counter() - t
            if self.enabled:
                rec = dict(self._cur)
                rec["total"] = total
                rec["post"] = total - sum(rec.get(p, 0.0) for p in self.PHASES if p != "post")
                self.steps.append(rec)
            return out

        e.step = step_wrapped

    def summary(self) -> dict[str, Any]:
        if not self.steps:
            return {}
        decode = [s for s in self.steps if s.get("rows", 0) and s.get("tokens", 0) <= 2 * s["rows"] + 8]
        prefill = [s for s in self.steps if s not in decode]

        def agg(steps: list[dict[str, float]]) -> dict[str, Any]:
            if not steps:
                return {"steps": 0}
            tot = sum(s["total"] for s in steps)
            out: dict[str, Any] = {"steps": len(steps), "total_s": round(tot, 3), "mean_step_ms": round(1e3 * tot / len(steps), 2)}
            for p in self.PHASES:
                v = sum(s.get(p, 0.0) for s in steps)
                out[f"{p}_ms"] = round(1e3 * v / len(steps), 3)
                out[f"{p}_frac"] = round(v / tot, 3) if tot else None
            return out

        return {"decode_steps": agg(decode), "prefill_steps": agg(prefill)}


# ---------------------------------------------------------------- systems


class Ours:
    def __init__(self, loaded: Any, plan: Any, batch: int, max_model_len: int, profile: bool) -> None:
        from pipelive_jax.serving.llm import LLM

        # batch * 256 / 16 + 16 (the sizing), and at least one max_model_len request + 16.
        self.num_pages = max(batch * 256 // 16 + 16, -(-max_model_len // 16) + 17)
        self.options = {
            "max_num_seqs": max(batch, 1),
            "max_num_batched_tokens": 2048,
            "max_model_len": max_model_len,
            "num_pages": self.num_pages,
        }
        t0 = time.perf_counter()
        self.llm = LLM(loaded, plan=plan, **self.options)
        self.build_s = time.perf_counter() - t0
        self.compile_times: list[float] = []
        cache = self.llm.engine.cache
        orig = cache._compile

        def timed_compile(*a: Any, **kw: Any) -> Any:
            t = time.perf_counter()
            fn = orig(*a, **kw)
            self.compile_times.append(time.perf_counter() - t)
            return fn

        cache._compile = timed_compile
        self.profiler = StepProfiler(self.llm.engine) if profile else None

    def run(self, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        from pipelive_jax.serving.sampling import SamplingParams

        sp = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
        outs = self.llm.generate(prompts, sp)
        assert all(len(o.token_ids) == new_tokens for o in outs)
        return [o.token_ids for o in outs]


class HF:
    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model = model
        self.pad = model.config.pad_token_id if model.config.pad_token_id is not None else 2
        if tokenizer is not None:
            tokenizer.padding_side = "left"
        self.tokenizer = tokenizer

    def run(self, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        import torch

        # Left padding (all prompts have the same length here, so the mask is all ones; the
        # padding path is kept so ragged prompts would work the same way).
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=False,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                pad_token_id=self.pad,
            )
        return out[:, width:].tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="batches 1 and 8, 32 new tokens, 1 repeat")
    ap.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,8,32)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--systems", default=",".join(DTYPES))
    ap.add_argument("--profile", action="store_true", help="time the phases of our engine's steps")
    ap.add_argument("--quiet-wait", type=float, default=90.0, help="max seconds to wait for a quiet machine before each timed run")
    ap.add_argument("--name", default=None, help="results file name (default throughput[_quick])")
    args = ap.parse_args()
    batches = [int(b) for b in (args.batches or ("1,8" if args.quick else "1,8,32")).split(",")]
    new_tokens = args.new_tokens or (32 if args.quick else 128)
    repeats = args.repeats or (1 if args.quick else 2)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in systems if s not in DTYPES]
    if unknown:
        raise SystemExit(f"unknown system(s) {unknown}: choose from {', '.join(DTYPES)}")
    max_model_len = 512
    if args.prompt_len + new_tokens > max_model_len:
        max_model_len = args.prompt_len + new_tokens + 16

    import jax

    from pipelive_jax.models.registry import load_model, smollm2_path

    common.log(f"jax devices: {jax.devices()}")
    loaded: dict[str, Any] = {}
    load_s: dict[str, float] = {}
    for dtype in sorted({DTYPES[s] for s in systems if s in PLANS}):
        t0 = time.perf_counter()
        loaded[dtype] = load_model("smollm2-135m", dtype=dtype)
        load_s[f"ours_{dtype}"] = round(time.perf_counter() - t0, 2)
    hf: dict[str, Any] = {}
    for name in (s for s in systems if s in PEERS):
        t0 = time.perf_counter()
        model, tok = common.load_hf_peer(smollm2_path(), tokenizer=False, dtype=DTYPES[name])
        load_s[name] = round(time.perf_counter() - t0, 2)
        hf[name] = HF(model, tok)
    if loaded:
        vocab = next(iter(loaded.values())).config.vocab_size
    else:
        vocab = next(iter(hf.values())).model.config.vocab_size

    config = {
        "model": "smollm2-135m",
        "dtypes": {s: DTYPES[s] for s in systems},
        "batches": batches,
        "prompt_len": args.prompt_len,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "systems": systems,
        "plans": {k: PLANS[k] for k in systems if k in PLANS},
        "prompts": "random token ids in [3, vocab), numpy default_rng(1234 + batch)",
        "quick": args.quick,
        "profile": args.profile,
    }
    out_name = args.name or ("throughput_quick" if args.quick else "throughput")
    results: dict[str, Any] = {"load_s": load_s, "by_batch": {}}
    for batch in batches:
        prompts = common.random_prompts(batch, args.prompt_len, vocab, seed=1234 + batch)
        runners: dict[str, Any] = {}
        row: dict[str, Any] = {}
        for name in systems:
            if name in PLANS:
                o = Ours(loaded[DTYPES[name]], PLANS[name], batch, max_model_len, args.profile)
                runners[name] = o
                row[name] = {"engine_options": o.options, "engine_build_s": round(o.build_s, 2)}
            else:
                runners[name] = hf[name]
                row[name] = {}
        tokens: dict[str, list[list[int]]] = {}
        for name, r in runners.items():
            common.log(f"batch {batch}: warm-up {name}")
            t0 = time.perf_counter()
            tokens[name] = r.run(prompts, new_tokens)
            row[name]["warmup_s"] = round(time.perf_counter() - t0, 2)
            if isinstance(r, Ours):
                row[name]["compile_s"] = round(sum(r.compile_times), 2)
                row[name]["compiles"] = len(r.compile_times)
                r.compiles_after_warmup = len(r.compile_times)
        for name in runners:
            row[name]["runs"] = []
        for rep in range(repeats):
            for name, r in runners.items():
                quiet = common.wait_for_quiet(args.quiet_wait)
                if isinstance(r, Ours) and r.profiler is not None:
                    r.profiler.enabled = rep == repeats - 1
                with common.CpuWatch() as w:
                    r.run(prompts, new_tokens)
                tps = batch * new_tokens / w.wall
                row[name]["runs"].append(
                    {"wall_s": round(w.wall, 3), "tok_s": round(tps, 2), "other_cores": w.other_cores, "own_cores": w.own_cores, **quiet}
                )
                common.log(f"batch {batch} rep {rep}: {name} {tps:.1f} tok/s (other procs {w.other_cores} cores)")
        for name, r in runners.items():
            tps = [x["tok_s"] for x in row[name]["runs"]]
            row[name]["tok_s_median"] = round(statistics.median(tps), 2)
            row[name]["tok_s_best"] = round(max(tps), 2)
            if isinstance(r, Ours):
                row[name]["recompiles_during_timing"] = len(r.compile_times) - r.compiles_after_warmup
                if r.profiler is not None:
                    row[name]["step_profile"] = r.profiler.summary()
        for name in runners:
            if name in PEERS:
                continue
            # vs the peer of the same dtype, and (bf16 rows) vs the float32 peer of the target
            for peer, key in ((peer_of(name), "transformers"), ("transformers", "transformers_f32")):
                if peer not in runners or (key == "transformers_f32" and peer == peer_of(name)):
                    continue
                row[name][f"ratio_vs_{key}_best"] = common.ratio(row[name]["tok_s_best"], row[peer]["tok_s_best"])
                row[name][f"ratio_vs_{key}_median"] = common.ratio(row[name]["tok_s_median"], row[peer]["tok_s_median"])
                # greedy agreement: mean common-prefix length over the batch
                pref = []
                for a, b in zip(tokens[name], tokens[peer], strict=True):
                    n = 0
                    while n < min(len(a), len(b)) and a[n] == b[n]:
                        n += 1
                    pref.append(n)
                row[name][f"greedy_prefix_vs_{key}"] = {"min": min(pref), "mean": round(sum(pref) / len(pref), 1), "of": new_tokens}
        if "ours-1stage" in tokens and "ours-2stage" in tokens:
            row["stages_agree"] = tokens["ours-1stage"] == tokens["ours-2stage"]
        results["by_batch"][str(batch)] = row
        del runners
        results["complete"] = False
        common.write_results(out_name, config, results)  # partial results survive an interrupted run
    summary = {}
    for b, row in results["by_batch"].items():
        summary[b] = {n: row[n]["tok_s_best"] for n in systems}
        for n in systems:
            if n in PEERS:
                continue
            if "ratio_vs_transformers_best" in row.get(n, {}):
                summary[b][f"{n}/{peer_of(n)}"] = row[n]["ratio_vs_transformers_best"]
            if "ratio_vs_transformers_f32_best" in row.get(n, {}):
                summary[b][f"{n}/transformers"] = row[n]["ratio_vs_transformers_f32_best"]
    results["summary_best_tok_s"] = summary
    results["target"] = "ours >= 1.5x transformers at batch >= 8 (float32 against float32)"
    common.log(f"summary: {summary}")
    results["complete"] = True
    path = common.write_results(out_name, config, results)
    common.log(f"wrote {path}")


if __name__ == "__main__":
    main()

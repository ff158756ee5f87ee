"""Batch-1 prefill and decode speed on SmolLM2-135M: our engine against Hugging Face transformers.

Both sides use the same GGUF weights (dequantized to float32) and the same prompt token ids.

  ours          LLM("smollm2-135m") with one stage (the XLA backend on CPU).
                prefill tok/s = prompt_len / TTFT of a request with max_tokens=1;
                decode tok/s = (n - 1) / (time from the first to the last token) for n=128 new
                tokens with ignore_eos. A warm-up of both runs comes first, so compiles are
                excluded; compile time is measured separately (wrapped around CompileCache).
  transformers  AutoModelForCausalLM.from_pretrained(dir, gguf_file=name), torch CPU float32.
                prefill tok/s = prompt_len / one forward of the prompt (use_cache=True);
                decode tok/s = (n - 1) / (first to last new token) of greedy `generate` with
                min_new_tokens = max_new_tokens = n, token times taken by a streamer.

Also checks that both produce the same first greedy tokens (the common prefix length is reported:
float32 differences in summation order can flip a late token where two logits are close).

Usage: .venv/bin/python benchmarks/generate.py [--quick] [--prompt-len 128] [--new-tokens 128]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402  (sets the offline environment before transformers is imported)

TEXT = (
    "The history of computing is a story of abstraction layered on abstraction. Early machines "
    "were programmed by rewiring panels; stored programs replaced the wires with numbers in memory; "
    "assemblers replaced the numbers with names, and compilers replaced the names with languages "
    "closer to mathematics. Each step traded a little efficiency for a great deal of reach. Today "
    "a language model runs as a pipeline of layers spread over several accelerators, and the "
    "serving system that schedules its requests decides how many layers each device holds, how "
    "much memory is left for the attention cache, and when to move work from one device to "
    "another. Write a short essay explaining why memory bandwidth, rather than arithmetic, limits "
    "the speed at which such a model produces one token at a time, and what batching changes."
)


def make_prompt(tokenizer: Any, length: int, vocab: int) -> list[int]:
    """`length` token ids: the text above (repeated as needed) through our tokenizer."""
    ids: list[int] = []
    if tokenizer is not None:
        while len(ids) < length:
            ids += tokenizer.encode(TEXT)
        return ids[:length]
    return common.random_prompts(1, length, vocab)[0]


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


# ---------------------------------------------------------------- ours


class OursGen:
    """Our engine, one stage; `prefill()` and `decode()` each run one timed request."""

    def __init__(self, loaded: Any, prompt: list[int], new_tokens: int) -> None:
        from pipelive_jax.serving.llm import LLM
        from pipelive_jax.serving.sampling import SamplingParams

        t0 = time.perf_counter()
        self.llm = LLM(loaded, max_num_seqs=4, max_num_batched_tokens=512, max_model_len=512, num_pages=64)
        self.build_s = time.perf_counter() - t0
        self.prompt = prompt
        self.compile_times: list[float] = []
        cache = self.llm.engine.cache
        orig = cache._compile

        def timed_compile(*a: Any, **kw: Any) -> Any:
            t = time.perf_counter()
            fn = orig(*a, **kw)
            self.compile_times.append(time.perf_counter() - t)
            return fn

        cache._compile = timed_compile  # instance attribute: counts and times every AOT compile
        self.p1 = SamplingParams(max_tokens=1)
        self.pn = SamplingParams(max_tokens=new_tokens, ignore_eos=True)

    def warmup(self) -> None:
        self.llm.generate([self.prompt], self.p1)
        self.llm.generate([self.prompt], self.pn)
        self.compiles_after_warmup = len(self.compile_times)

    def prefill(self) -> float:
        """Seconds to the first token (max_tokens=1)."""
        out = self.llm.generate([self.prompt], self.p1)[0]
        return out.metrics.ttft

    def decode(self) -> tuple[float, list[int]]:
        """(decode tok/s after the first token, the tokens)."""
        out = self.llm.generate([self.prompt], self.pn)[0]
        tt = out.metrics.token_times
        return (len(tt) - 1) / (tt[-1] - tt[0]), out.token_ids


# ---------------------------------------------------------------- transformers


class Stamps:
    """A streamer that notes when each new token arrives (the first put is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.seen_prompt = False

    def put(self, value: Any) -> None:
        if not self.seen_prompt:
            self.seen_prompt = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


class HFGen:
    def __init__(self, gguf: str, prompt: list[int], new_tokens: int) -> None:
        import torch

        t0 = time.perf_counter()
        self.model, self.tok = common.load_hf_peer(gguf)
        self.load_s = time.perf_counter() - t0
        self.torch = torch
        self.ids = torch.tensor([prompt], dtype=torch.long)
        self.mask = torch.ones_like(self.ids)
        self.prompt_len = len(prompt)
        self.new_tokens = new_tokens

    def warmup(self) -> None:
        self.prefill()
        self.decode()

    def prefill(self) -> float:
        """Seconds for one forward of the prompt (use_cache=True, so the cache is built)."""
        t0 = time.perf_counter()
        with self.torch.inference_mode():
            self.model(input_ids=self.ids, attention_mask=self.mask, use_cache=True)
        return time.perf_counter() - t0

    def decode(self) -> tuple[float, list[int]]:
        s = Stamps()
        with self.torch.inference_mode():
            out = self.model.generate(
                input_ids=self.ids,
                attention_mask=self.mask,
                do_sample=False,
                max_new_tokens=self.new_tokens,
                min_new_tokens=self.new_tokens,
                pad_token_id=self.model.config.pad_token_id,
                streamer=s,
            )
        return (len(s.times) - 1) / (s.times[-1] - s.times[0]), out[0, self.prompt_len :].tolist()


def measure(runner: Any, repeats: int, quiet_wait: float, prompt_len: int) -> dict[str, Any]:
    """`repeats` prefills and decodes, each after waiting (bounded) for a quiet machine."""
    pf, dec, toks = [], [], []
    for _ in range(repeats):
        quiet = common.wait_for_quiet(quiet_wait)
        with common.CpuWatch() as w:
            t = runner.prefill()
        pf.append({"s": round(t, 4), "tok_s": round(prompt_len / t, 1), "other_cores": w.other_cores, **quiet})
    for _ in range(max(1, repeats // 2)):
        quiet = common.wait_for_quiet(quiet_wait)
        with common.CpuWatch() as w:
            tps, toks = runner.decode()
        dec.append({"tok_s": round(tps, 2), "other_cores": w.other_cores, **quiet})
    pf_tps = [x["tok_s"] for x in pf]
    dec_tps = [x["tok_s"] for x in dec]
    return {
        "prefill_runs": pf,
        "decode_runs": dec,
        "prefill_tok_s_best": max(pf_tps),
        "prefill_tok_s_median": round(statistics.median(pf_tps), 1),
        "decode_tok_s_best": max(dec_tps),
        "decode_tok_s_median": round(statistics.median(dec_tps), 2),
        "tokens": toks,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="32 new tokens, fewer repeats")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--check-tokens", type=int, default=16)
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers peer")
    ap.add_argument("--rounds", type=int, default=None, help="alternating rounds of ours / transformers")
    ap.add_argument("--quiet-wait", type=float, default=60.0, help="max seconds to wait for a quiet machine before each timed run")
    ap.add_argument("--name", default=None, help="results file name (default generate[_quick])")
    args = ap.parse_args()
    new_tokens = args.new_tokens or (32 if args.quick else 128)
    repeats = args.repeats or (2 if args.quick else 4)
    args.rounds = args.rounds or (1 if args.quick else 2)

    from pipelive_jax.models.registry import load_model, smollm2_path

    gguf = smollm2_path()
    t0 = time.perf_counter()
    loaded = load_model("smollm2-135m")
    model_load_s = time.perf_counter() - t0
    our_tok = loaded.tokenizer
    prompt = make_prompt(our_tok, args.prompt_len, 49152)

    common.log(f"prompt {len(prompt)} tokens, {new_tokens} new, {repeats} repeats")
    ours = OursGen(loaded, prompt, new_tokens)
    t0 = time.perf_counter()
    ours.warmup()
    ours_warm = time.perf_counter() - t0
    hf = None
    if not args.no_hf:
        common.log("transformers: loading the same GGUF")
        hf = HFGen(gguf, prompt, new_tokens)
        t0 = time.perf_counter()
        hf.warmup()
        hf_warm = time.perf_counter() - t0
    # Alternate rounds so that load from other processes falls on both alike.
    rounds: dict[str, list[dict[str, Any]]] = {"ours": [], "transformers": []}
    for r in range(args.rounds):
        common.log(f"round {r}: ours")
        rounds["ours"].append(measure(ours, repeats, args.quiet_wait, len(prompt)))
        if hf is not None:
            common.log(f"round {r}: transformers")
            rounds["transformers"].append(measure(hf, repeats, args.quiet_wait, len(prompt)))

    def merge(ms: list[dict[str, Any]]) -> dict[str, Any]:
        pf = [x for m in ms for x in m["prefill_runs"]]
        dec = [x for m in ms for x in m["decode_runs"]]
        return {
            "prefill_tok_s_best": max(x["tok_s"] for x in pf),
            "prefill_tok_s_median": round(statistics.median(x["tok_s"] for x in pf), 1),
            "decode_tok_s_best": max(x["tok_s"] for x in dec),
            "decode_tok_s_median": round(statistics.median(x["tok_s"] for x in dec), 2),
            "prefill_runs": pf,
            "decode_runs": dec,
            "tokens": ms[-1]["tokens"],
        }

    o = merge(rounds["ours"])
    o.update(
        {
            "model_load_s": round(model_load_s, 2),
            "engine_build_s": round(ours.build_s, 2),
            "warmup_s": round(ours_warm, 2),
            "compile_s": round(sum(ours.compile_times), 2),
            "compiles": len(ours.compile_times),
            "recompiles_during_timing": len(ours.compile_times) - ours.compiles_after_warmup,
            "engine": {"backend": ours.llm.engine.backend, "plan": ours.llm.engine.plan.to_json()},
        }
    )
    results: dict[str, Any] = {"ours": o}
    common.log(f"ours: prefill {o['prefill_tok_s_best']} tok/s, decode {o['decode_tok_s_best']} tok/s (best)")
    if hf is not None:
        h = merge(rounds["transformers"])
        h.update({"load_s": round(hf.load_s, 2), "warmup_s": round(hf_warm, 2), "torch_threads": hf.torch.get_num_threads()})
        results["transformers"] = h
        common.log(f"transformers: prefill {h['prefill_tok_s_best']} tok/s, decode {h['decode_tok_s_best']} tok/s (best)")
        n = min(args.check_tokens, new_tokens)
        match = common_prefix(o["tokens"], h["tokens"])
        results["greedy_check"] = {
            "compared": n,
            "match_len": min(match, n),
            "match_len_full": match,
            "of": new_tokens,
            "same_first_n": match >= n,
        }
        if our_tok is not None and hf.tok is not None:
            hf_ids = hf.tok(TEXT, add_special_tokens=False).input_ids
            results["tokenizer_check"] = {"same_ids_for_text": our_tok.encode(TEXT) == hf_ids}
        results["ratios_ours_over_transformers"] = {
            "prefill_best": common.ratio(o["prefill_tok_s_best"], h["prefill_tok_s_best"]),
            "decode_best": common.ratio(o["decode_tok_s_best"], h["decode_tok_s_best"]),
            "prefill_median": common.ratio(o["prefill_tok_s_median"], h["prefill_tok_s_median"]),
            "decode_median": common.ratio(o["decode_tok_s_median"], h["decode_tok_s_median"]),
        }
        common.log(f"greedy check: {results['greedy_check']}; ratios {results['ratios_ours_over_transformers']}")
    config = {
        "model": "smollm2-135m",
        "gguf": os.path.basename(gguf),
        "dtype": "float32",
        "batch": 1,
        "prompt_len": len(prompt),
        "prompt_ids": prompt,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "rounds": args.rounds,
        "measures": "best of the runs (least disturbed by other processes) and the median; other_cores per run",
        "quick": args.quick,
    }
    path = common.write_results(args.name or ("generate_quick" if args.quick else "generate"), config, results)
    common.log(f"wrote {path}")


if __name__ == "__main__":
    main()

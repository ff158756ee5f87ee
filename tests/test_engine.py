"""The engine end to end: greedy tokens equal a one-sequence reference under any pipeline plan,
batch composition, chunked prefill, micro-batches and preemption; abort, sampling, stop
conditions, streaming, the outputs' fields, and clear errors for bad input.

The reference is greedy decoding with `full_sequence_logits` (the whole model as one stage, a
fresh cache, one sequence), token by token, computed once per prompt. Every distinct plan and
batch shape is a separate compile, so tests reuse engines (module fixtures) and pick prompt
sets whose batch shapes the engine has already compiled.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelive_jax.errors import ConfigError, PlanError, RequestError
from pipelive_jax.models.llama import full_sequence_logits
from pipelive_jax.models.registry import TINY_RANDOM, tiny_random
from pipelive_jax.serving.engine import Engine
from pipelive_jax.serving.llm import LLM
from pipelive_jax.serving.sampling import SamplingParams, apply_penalties, sample_token

N_NEW = 8
GREEDY = SamplingParams(max_tokens=N_NEW, ignore_eos=True)

# Tiny-random prompts: random ids (not bos/eos) of mixed lengths, and one at the length limit.
_rng = np.random.default_rng(1234)
TINY_PROMPTS = [_rng.integers(3, 512, size=n).tolist() for n in (1, 3, 7, 12, 20, 27, 33, 40)]
LONG_PROMPT = _rng.integers(3, 512, size=63).tolist()
TINY_OPTIONS = dict(num_pages=64, max_model_len=64)
# Two stages on devices that are neither 0 nor in order.
TWO_STAGES = {"stages": [{"devices": [5], "layers": [0, 2]}, {"devices": [2], "layers": [2, 6]}]}

SMOL_PROMPTS = ["The capital of France is", "Once upon a time, there was"]
SMOL_OTHERS = [
    "Hi",
    "The quick brown fox jumps over the lazy dog and then",
    "1, 2, 3, 4, 5,",
    "def add(a, b):",
    "Water boils at",
    "My favourite colour is blue because",
]
SMOL_OPTIONS = dict(num_pages=64, max_model_len=64)


# ------------------------------------------------------------------ the reference


def _logits(model, ids: list[int], pad_to: int) -> np.ndarray:
    """Reference logits [len(ids), vocab]: padded to one length so that one compile serves all
    (the attention is causal, so padding after the sequence changes none of its rows)."""
    out = full_sequence_logits(model, list(ids) + [0] * (pad_to - len(ids)))
    return out[: len(ids)]


def greedy_reference(model, prompts: list[list[int]], n: int, pad_to: int) -> list[list[int]]:
    out = []
    for prompt in prompts:
        ids = list(prompt)
        for _ in range(n):
            ids.append(int(np.argmax(_logits(model, ids, pad_to)[-1])))
        out.append(ids[len(prompt) :])
    return out


@pytest.fixture(scope="module")
def tiny_ref(tiny):
    """Greedy continuations of TINY_PROMPTS (by index) and LONG_PROMPT ("long")."""
    refs = greedy_reference(tiny.model, [*TINY_PROMPTS, LONG_PROMPT], N_NEW, pad_to=80)
    return {**dict(enumerate(refs[:-1])), "long": refs[-1]}


@pytest.fixture(scope="module")
def tiny_llm(tiny):
    """The tiny model on two uneven stages, shared by the tests that need no special options."""
    return LLM(tiny, plan=TWO_STAGES, **TINY_OPTIONS)


def _assert_idle(engine: Engine) -> None:
    """Nothing left to run, every page back in every stage's pool, tables consistent."""
    assert not engine.has_unfinished()
    for stage in engine.executor.stages:
        stage.pages.check()
        assert stage.pages.num_used == 0, f"stage {stage.index} leaked pages"


def _tokens(outputs) -> list[list[int]]:
    return [o.token_ids for o in outputs]


# ------------------------------------------------------------------ greedy == reference: plans

# One token per step: every step has the same shape, so a plan costs one compile per stage.
SINGLE_TOKEN_STEPS = dict(max_num_batched_tokens=1)


@st.composite
def tiny_plans(draw):
    """Random contiguous splits of the 6 layers onto distinct devices among the 8."""
    cuts = sorted(draw(st.sets(st.integers(1, 5))))
    bounds = [0, *cuts, 6]
    devices = draw(st.permutations(range(8)))
    return {
        "stages": [
            {"devices": [devices[i]], "layers": [a, b]}
            for i, (a, b) in enumerate(itertools.pairwise(bounds))
        ]
    }


@settings(max_examples=8, deadline=None)
@given(plan=tiny_plans())
def test_tiny_greedy_matches_reference_under_any_plan(tiny, tiny_ref, plan):
    llm = LLM(tiny, plan=plan, **TINY_OPTIONS, **SINGLE_TOKEN_STEPS)
    assert llm.engine.plan.to_json() == plan
    picks = [0, 2, 4]
    outs = llm.generate([TINY_PROMPTS[i] for i in picks], GREEDY)
    assert _tokens(outs) == [tiny_ref[i] for i in picks]
    _assert_idle(llm.engine)


@pytest.fixture(scope="module")
def smol_ref(smollm2):
    """Greedy continuations of SMOL_PROMPTS (the one SmolLM2 reference of this module)."""
    ids = [smollm2.tokenizer.encode(p) for p in SMOL_PROMPTS]
    return greedy_reference(smollm2.model, ids, N_NEW, pad_to=32)


@pytest.fixture(scope="module")
def smol_llm(smollm2):
    return LLM(smollm2, plan=[30], **SMOL_OPTIONS)


@pytest.mark.smollm2
@pytest.mark.parametrize("plan", [[30], [10, 20], [7, 13, 10], [3, 9, 6, 8, 4]], ids=str)
def test_smollm2_greedy_matches_reference_under_plans(smollm2, smol_ref, smol_llm, plan):
    llm = smol_llm if plan == [30] else LLM(smollm2, plan=plan, **SMOL_OPTIONS)
    assert [s.num_layers for s in llm.engine.plan.stages] == plan
    outs = llm.generate(SMOL_PROMPTS, GREEDY)
    assert _tokens(outs) == smol_ref
    for o in outs:
        assert o.text == smollm2.tokenizer.decode(o.token_ids)
    _assert_idle(llm.engine)


# ------------------------------------------------------------------ batch composition


def test_tiny_request_alone_and_in_a_batch_of_eight(tiny_llm, tiny_ref):
    (alone,) = tiny_llm.generate(TINY_PROMPTS[3], GREEDY)  # one list of ids is one prompt
    assert alone.token_ids == tiny_ref[3]
    batch = tiny_llm.generate(TINY_PROMPTS, GREEDY)
    assert _tokens(batch) == [tiny_ref[i] for i in range(len(TINY_PROMPTS))]
    _assert_idle(tiny_llm.engine)


@pytest.mark.smollm2
def test_smollm2_request_alone_and_in_a_batch_of_eight(smol_llm, smol_ref):
    (alone,) = smol_llm.generate(SMOL_PROMPTS[0], GREEDY)
    assert alone.token_ids == smol_ref[0]
    batch = smol_llm.generate([SMOL_PROMPTS[0], *SMOL_OTHERS, SMOL_PROMPTS[1]], GREEDY)
    assert len(batch) == 8
    assert batch[0].token_ids == smol_ref[0]
    assert batch[-1].token_ids == smol_ref[1]
    _assert_idle(smol_llm.engine)


def test_chunked_prefill_keeps_tokens(tiny, tiny_ref):
    llm = LLM(tiny, plan=[6], max_num_batched_tokens=8, **TINY_OPTIONS)
    # 63 tokens: 8 chunks; the first token reaches max_model_len = 64, so it ends there
    (long,) = llm.generate(LONG_PROMPT, GREEDY)
    assert long.token_ids == tiny_ref["long"][:1]
    assert long.finish_reason == "length"
    assert llm.engine.step_count >= 8
    outs = llm.generate([TINY_PROMPTS[6], TINY_PROMPTS[4], TINY_PROMPTS[1]], GREEDY)
    assert _tokens(outs) == [tiny_ref[6], tiny_ref[4], tiny_ref[1]]
    _assert_idle(llm.engine)


def test_two_microbatches_on_two_stages_keep_tokens(tiny, tiny_ref):
    llm = LLM(tiny, plan=[3, 3], num_microbatches=2, **TINY_OPTIONS)
    executor = llm.engine.executor
    run, sizes = executor.run, []

    def counting_run(batches):
        sizes.append(len(batches))
        return run(batches)

    executor.run = counting_run
    outs = llm.generate(TINY_PROMPTS, GREEDY)
    assert _tokens(outs) == [tiny_ref[i] for i in range(len(TINY_PROMPTS))]
    assert max(sizes) == 2  # the steps really were split
    _assert_idle(llm.engine)


def test_preemption_under_a_small_pool_keeps_tokens(tiny, tiny_ref):
    # 11 usable pages of 4 tokens; the four requests need 5 + 7 + 9 + 11 pages at their ends.
    llm = LLM(tiny, plan=[6], num_pages=12, page_size=4, max_model_len=44, max_num_seqs=8)
    picks = [3, 4, 5, 6]
    outs = llm.generate([TINY_PROMPTS[i] for i in picks], GREEDY)
    assert _tokens(outs) == [tiny_ref[i] for i in picks]  # what a large pool gives
    engine = llm.engine
    assert engine.scheduler.num_preemptions > 0
    assert sum(o.metrics.preemptions for o in outs) == engine.scheduler.num_preemptions
    assert all(o.finish_reason == "length" for o in outs)
    _assert_idle(engine)
    # With log-probabilities: one per token through the preemptions, as a large pool gives.
    lp = SamplingParams(max_tokens=N_NEW, ignore_eos=True, logprobs=2)
    before = engine.scheduler.num_preemptions
    small = llm.generate([TINY_PROMPTS[i] for i in picks], lp)
    assert engine.scheduler.num_preemptions > before
    large = LLM(tiny, plan=[6], **TINY_OPTIONS).generate([TINY_PROMPTS[i] for i in picks], lp)
    for a, b in zip(small, large, strict=True):
        assert a.token_ids == b.token_ids and a.logprobs is not None and b.logprobs is not None
        assert [t.token_id for t in a.logprobs] == a.token_ids
        np.testing.assert_allclose([t.logprob for t in a.logprobs], [t.logprob for t in b.logprobs], atol=1e-5)



def test_background_compile_runs_a_new_shape_padded_and_keeps_tokens(tiny, tiny_ref):
    """A step whose shape is not compiled runs on a compiled bigger one (no inline compile) and
    gives the same tokens; its own shape compiles in the background and is used once ready."""
    llm = LLM(tiny, plan=[2, 4], background_compile=True, **TINY_OPTIONS)
    eng = llm.engine
    # 40 + 33 prompt tokens: a 128-token prefill shape; then decodes at 4 rows.
    outs = llm.generate([TINY_PROMPTS[7], TINY_PROMPTS[6]], GREEDY)
    assert _tokens(outs) == [tiny_ref[7], tiny_ref[6]]
    seen = set(eng._shapes_seen)
    compiled = eng.cache.compiles
    used: list = []
    run = eng.executor.run

    def recording_run(batches):
        used.extend(b.shape for b in batches)
        # nothing compiles inside the step: its shape was compiled before it started
        assert all(eng.cache.has(st, b.shape) for st in eng.executor.stages for b in batches)
        return run(batches)

    eng.executor.run = recording_run
    # 20 + 12 tokens: a 32-token prefill, a shape this engine has not compiled
    outs = llm.generate([TINY_PROMPTS[4], TINY_PROMPTS[3]], GREEDY)
    assert _tokens(outs) == [tiny_ref[4], tiny_ref[3]]
    first = used[0]
    assert first in seen and first.num_tokens > 32  # ran padded on a compiled shape
    deadline = time.monotonic() + 120
    exact = dataclasses.replace(first, num_tokens=32, max_q_len=32)
    while not all(eng.cache.has(st, exact) for st in eng.executor.stages):
        assert time.monotonic() < deadline, "the background compile never finished"
        time.sleep(0.05)
    assert eng.cache.compiles > compiled  # in the background: no step compiled inline
    used.clear()
    outs = llm.generate([TINY_PROMPTS[4], TINY_PROMPTS[3]], GREEDY)
    assert _tokens(outs) == [tiny_ref[4], tiny_ref[3]]
    assert used[0] == exact
    while eng._bg_compiles:  # leave no compile running into the next tests
        assert time.monotonic() < deadline, "a background compile never finished"
        time.sleep(0.05)
    _assert_idle(eng)



def test_compile_known_fills_every_shape_met_for_every_stage_met(tiny, tiny_ref):
    """After `compile_known`, going back to an earlier plan and serving a shape that plan never
    ran compiles nothing (what `pipelive bench`'s rehearsal relies on to make runs repeatable)."""
    llm = LLM(tiny, plan=[6], **TINY_OPTIONS)
    eng = llm.engine

    def reconfigure(plan):
        h = eng.reconfigure(plan, mode="live")
        while not h.done():
            eng.step()
        assert h.report().ok, h.report().reason

    assert _tokens(llm.generate([TINY_PROMPTS[7]], GREEDY)) == [tiny_ref[7]]
    reconfigure([2, 4])
    # 20 + 12 prompt tokens: a 32-token prefill, a shape the one-stage plan never ran
    pair = [TINY_PROMPTS[4], TINY_PROMPTS[3]]
    assert _tokens(llm.generate(pair, GREEDY)) == [tiny_ref[4], tiny_ref[3]]
    assert eng.cache.compile_known() == 1  # that shape, for the one-stage plan's stage
    assert eng.cache.compile_known() == 0
    compiled = eng.cache.compiles
    reconfigure([6])
    assert _tokens(llm.generate(pair, GREEDY)) == [tiny_ref[4], tiny_ref[3]]
    assert eng.cache.compiles == compiled
    # Frozen shapes: a 12-token prefill (a 16-token shape, never compiled) runs padded on a
    # compiled shape, with the same tokens, and nothing compiles, now or in the background.
    eng.shapes_frozen = True
    used: list = []
    run = eng.executor.run
    eng.executor.run = lambda batches: used.extend(b.shape for b in batches) or run(batches)
    assert _tokens(llm.generate([TINY_PROMPTS[3]], GREEDY)) == [tiny_ref[3]]
    assert used[0].num_tokens == 32 and not eng._bg_compiles
    assert eng.cache.compiles == compiled
    _assert_idle(eng)


def test_a_failed_background_compile_is_not_retried_and_serving_goes_on(tiny, tiny_ref):
    llm = LLM(tiny, plan=[6], background_compile=True, **TINY_OPTIONS)
    eng = llm.engine
    outs = llm.generate([TINY_PROMPTS[7], TINY_PROMPTS[6]], GREEDY)  # compiles a big shape
    assert _tokens(outs) == [tiny_ref[7], tiny_ref[6]]
    get, failed = eng.cache.get, []

    def failing_get(stage, shape, num_pages=None):
        if not eng.cache.has(stage, shape, num_pages):
            failed.append(shape)
            raise RuntimeError("injected compile failure")
        return get(stage, shape, num_pages)

    eng.cache.get = failing_get
    for _ in range(2):  # the second request meets the same uncompiled shape
        outs = llm.generate([TINY_PROMPTS[4], TINY_PROMPTS[3]], GREEDY)
        assert _tokens(outs) == [tiny_ref[4], tiny_ref[3]]
        deadline = time.monotonic() + 60
        while eng._bg_compiles:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert failed and len(failed) == len(set(failed))  # each shape tried once, never again
    _assert_idle(eng)


# ------------------------------------------------------------------ abort


def test_a_failing_output_callback_does_not_cost_other_requests_their_tokens(tiny_llm, tiny_ref):
    """A subscriber that raises runs mid-step: it is dropped, and every request of the batch,
    its own included, still gets exactly the reference tokens."""
    engine = tiny_llm.engine
    calls = []

    def bad(out):
        calls.append(out.request_id)
        raise RuntimeError("client went away")

    seen = []
    a = engine.add_request(TINY_PROMPTS[2], GREEDY, on_output=bad)
    b = engine.add_request(TINY_PROMPTS[4], GREEDY, on_output=seen.append)
    while engine.has_unfinished():
        engine.step()
    assert calls == [a]  # called once, then unsubscribed
    assert engine.get_output(a).token_ids == tiny_ref[2]
    assert engine.get_output(b).token_ids == tiny_ref[4]
    assert seen[-1].finished and len(seen) == N_NEW


def test_abort_waiting_and_running_frees_exactly_their_pages(tiny_llm, tiny_ref):
    engine = tiny_llm.engine
    assert engine.abort("no-such-request") is False

    rid = engine.add_request(TINY_PROMPTS[3], GREEDY)
    used = [s.pages.num_used for s in engine.executor.stages]
    assert engine.abort(rid) is True
    assert [s.pages.num_used for s in engine.executor.stages] == used
    out = engine.get_output(rid)
    assert (out.finished, out.finish_reason, out.token_ids) == (True, "abort", [])
    assert engine.abort(rid) is False  # already finished
    assert not engine.has_unfinished()

    a = engine.add_request(TINY_PROMPTS[3], GREEDY)
    b = engine.add_request(TINY_PROMPTS[1], GREEDY)
    seen = []
    engine.subscribe(a, seen.append)
    engine.step()  # both prompts prefilled, one token each
    stages = engine.executor.stages
    used = [s.pages.num_used for s in stages]
    owned_a = [len(s.pages.pages[a]) for s in stages]
    assert all(n > 0 for n in owned_a)
    assert engine.abort(a) is True
    assert [s.pages.num_used for s in stages] == [u - n for u, n in zip(used, owned_a, strict=True)]
    for s in stages:
        assert a not in s.pages.pages
        s.pages.check()
    out = engine.get_output(a)
    assert (out.finished, out.finish_reason, out.token_ids) == (True, "abort", tiny_ref[3][:1])
    assert seen[-1].finished and seen[-1].finish_reason == "abort"
    while engine.has_unfinished():
        engine.step()
    assert engine.get_output(b).token_ids == tiny_ref[1]
    _assert_idle(engine)


def test_only_the_last_finished_requests_are_kept_and_generate_still_returns_all(
    tiny_llm, tiny_ref, monkeypatch
):
    engine = tiny_llm.engine
    monkeypatch.setattr(engine.config, "finished_retention", 2)
    outs = tiny_llm.generate(TINY_PROMPTS[:5], GREEDY)
    # Every output, in input order, though the engine now holds two finished requests only.
    assert _tokens(outs) == [tiny_ref[i] for i in range(5)]
    assert all(o.finished for o in outs)
    kept = [o for o in outs if o.request_id in engine.requests]
    assert len(kept) == 2 and len(engine.requests) == 2
    for o in kept:
        assert engine.get_output(o.request_id).token_ids == o.token_ids
    gone = next(o for o in outs if o.request_id not in engine.requests)
    with pytest.raises(RequestError, match="unknown request id .*kept for the last 2"):
        engine.get_output(gone.request_id)
    _assert_idle(engine)


# ------------------------------------------------------------------ sampling


def _sampled(seed: int | None, **kw) -> SamplingParams:
    return SamplingParams(
        max_tokens=N_NEW, temperature=1.0, top_k=40, top_p=0.9, seed=seed, ignore_eos=True, **kw
    )


def test_seeded_sampling_is_reproducible_across_batches(tiny, tiny_llm, tiny_ref):
    prompt = TINY_PROMPTS[3]
    (first,) = tiny_llm.generate(prompt, _sampled(7))
    (again,) = tiny_llm.generate(prompt, _sampled(7))
    assert again.token_ids == first.token_ids
    # the same request among a greedy and another sampled one (the same batch shapes)
    mixed = tiny_llm.generate(
        [prompt, TINY_PROMPTS[0], TINY_PROMPTS[1]], [_sampled(7), GREEDY, _sampled(8)]
    )
    assert mixed[0].token_ids == first.token_ids
    assert mixed[1].token_ids == tiny_ref[0]
    others = [tiny_llm.generate(prompt, _sampled(s))[0].token_ids for s in (1, 2, 3)]
    assert all(o != first.token_ids for o in others)
    # every sampled token lies in the top-k and the nucleus of the reference's logits
    logits = _logits(tiny.model, prompt + first.token_ids, pad_to=80)
    for j, tok in enumerate(first.token_ids):
        row = logits[len(prompt) + j - 1].astype(np.float64)
        order = np.argsort(-row, kind="stable")
        assert tok in order[:40].tolist()
        p = np.exp(row[order[:40]] - row[order[0]])
        p /= p.sum()
        nucleus = order[: int(np.searchsorted(np.cumsum(p), 0.9)) + 1]
        assert tok in nucleus.tolist()
    _assert_idle(tiny_llm.engine)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def _chi_square(draws: list[int], p: np.ndarray) -> float:
    counts = np.bincount(draws, minlength=len(p))
    assert counts[p == 0].sum() == 0, "drew a token of probability 0"
    n = len(draws)
    keep = p > 0
    return float((((counts - n * p) ** 2)[keep] / (n * p[keep])).sum())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sample_token_top_k_one_and_tiny_top_p_are_greedy(seed):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=300).astype(np.float32)
    best = int(np.argmax(logits))
    for params in (
        SamplingParams(temperature=1.0, top_k=1),
        SamplingParams(temperature=0.3, top_p=1e-6),
        SamplingParams(temperature=5.0, top_k=1, top_p=0.5),
        SamplingParams(temperature=0.0, top_k=7, top_p=0.2),
    ):
        assert [sample_token(logits, params, rng) for _ in range(20)] == [best] * 20


def test_sample_token_tiny_temperature_is_the_greedy_limit():
    """logits / 1e-310 overflow; the sampler must still give the argmax, not NaN odds."""
    logits = np.random.default_rng(4).normal(size=300).astype(np.float32) * 30
    rng = np.random.default_rng(0)
    for t in (5e-324, 1e-310, 1e-30):
        for params in (SamplingParams(temperature=t), SamplingParams(temperature=t, top_k=5)):
            assert sample_token(logits, params, rng) == int(np.argmax(logits))


def test_a_request_whose_sampling_fails_ends_alone(tiny_llm, tiny_ref, monkeypatch):
    """A sampling failure (here: forced for the request seeded 13) ends that request with
    finish_reason "error" and the reason, frees its pages and lets the others of its batch
    finish with their tokens; before, the step failed on every retry, stalling every request."""
    from pipelive_jax.serving import engine as engine_mod

    real = engine_mod.sample_token

    def failing(logits, params, rng):
        if params.seed == 13:
            raise FloatingPointError("probabilities contain NaN")
        return real(logits, params, rng)

    monkeypatch.setattr(engine_mod, "sample_token", failing)
    eng = tiny_llm.engine
    bad = eng.add_request(TINY_PROMPTS[0], SamplingParams(max_tokens=N_NEW, temperature=1.0, seed=13))
    ok = [
        eng.add_request(TINY_PROMPTS[i], SamplingParams(max_tokens=N_NEW, ignore_eos=True))
        for i in (1, 2)
    ]
    seen_bad = []
    for _ in range(200):
        if not eng.has_unfinished():
            break
        seen_bad += [o for o in eng.step() if o.request_id == bad]
    assert [o.finish_reason for o in seen_bad] == ["error"]
    failed = eng.get_output(bad)
    assert failed.token_ids == [] and failed.error is not None
    assert "FloatingPointError: probabilities contain NaN" in failed.error
    assert [eng.get_output(r).token_ids for r in ok] == [tiny_ref[1], tiny_ref[2]]
    _assert_idle(eng)


def test_logprobs_match_the_reference_and_leave_tokens_alone(tiny, tiny_llm, tiny_ref):
    """Each generated token's log-probability and the top 3 are the log-softmax of the reference
    forward pass's logits at that position; asking for them changes no token (greedy rows still
    take the device argmax) and a sampled row reports its sampled token."""
    greedy = SamplingParams(max_tokens=N_NEW, ignore_eos=True, logprobs=3)
    sampled = SamplingParams(max_tokens=N_NEW, ignore_eos=True, logprobs=0, temperature=1.0, seed=5)
    outs = tiny_llm.generate([TINY_PROMPTS[2], TINY_PROMPTS[4], TINY_PROMPTS[4]], [greedy, greedy, sampled])
    assert [o.token_ids for o in outs[:2]] == [tiny_ref[2], tiny_ref[4]]
    for out, prompt, k in zip(outs, (TINY_PROMPTS[2], TINY_PROMPTS[4], TINY_PROMPTS[4]), (3, 3, 0), strict=True):
        ref = _logits(tiny.model, prompt + out.token_ids, pad_to=80).astype(np.float64)
        assert out.logprobs is not None and len(out.logprobs) == len(out.token_ids)
        for j, lp in enumerate(out.logprobs):
            row = ref[len(prompt) - 1 + j]
            log_sm = row - row.max() - np.log(np.sum(np.exp(row - row.max())))
            assert lp.token_id == out.token_ids[j]
            np.testing.assert_allclose(lp.logprob, log_sm[lp.token_id], atol=2e-4)
            assert len(lp.top) == k
            if k:
                ids = [t for t, _ in lp.top]
                np.testing.assert_allclose([v for _, v in lp.top], log_sm[ids], atol=2e-4)
                np.testing.assert_allclose([v for _, v in lp.top], np.sort(log_sm)[::-1][:k], atol=2e-4)
                assert lp.top[0][0] == lp.token_id  # greedy: the most likely one
    plain = tiny_llm.generate([TINY_PROMPTS[2]], SamplingParams(max_tokens=N_NEW, ignore_eos=True))
    assert plain[0].logprobs is None and plain[0].token_ids == tiny_ref[2]
    with pytest.raises(RequestError, match="logprobs"):
        SamplingParams(logprobs=21)


def test_apply_penalties_by_hand():
    logits = np.array([2.0, -1.0, 0.5, 3.0, -2.0], np.float32)
    p = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=2.0)
    # prompt has token 1; output has 3 twice and 2 once
    got = apply_penalties(logits, [1], [3, 2, 3], p)
    want = [2.0, -1.0 * 2, 0.5 / 2 - 0.25 - 0.5, 3.0 / 2 - 0.5 - 0.5, -2.0]
    np.testing.assert_allclose(got, want)
    assert logits[3] == 3.0  # the input is left alone
    np.testing.assert_array_equal(apply_penalties(logits, [1], [3], SamplingParams()), logits)
    for bad in (dict(presence_penalty=2.5), dict(frequency_penalty=-3), dict(repetition_penalty=0)):
        with pytest.raises(RequestError, match=next(iter(bad))):
            SamplingParams(**bad)


def test_penalized_greedy_follows_the_reference(tiny, tiny_llm, tiny_ref):
    """Greedy decoding under presence, frequency and repetition penalties equals a reference
    loop that applies them (written here again) to the reference forward pass's logits."""
    params = dict(presence_penalty=0.5, frequency_penalty=1.0, repetition_penalty=1.5)
    prompt = TINY_PROMPTS[5]
    ids: list[int] = list(prompt)
    for _ in range(N_NEW):
        row = _logits(tiny.model, ids, pad_to=80)[-1].astype(np.float64)
        for t in set(ids):
            row[t] = row[t] / 1.5 if row[t] > 0 else row[t] * 1.5
        out = ids[len(prompt) :]
        for t in set(out):
            row[t] -= 1.0 * out.count(t) + 0.5
        ids.append(int(np.argmax(row)))
    want = ids[len(prompt) :]
    assert want != tiny_ref[5]  # the penalties change the greedy continuation
    (got,) = tiny_llm.generate([prompt], SamplingParams(max_tokens=N_NEW, ignore_eos=True, **params))
    assert got.token_ids == want
    sampled = SamplingParams(max_tokens=N_NEW, ignore_eos=True, temperature=1.0, seed=9, **params)
    a, b = tiny_llm.generate([prompt, prompt], [sampled, sampled])
    assert a.token_ids == b.token_ids  # seeded sampling stays reproducible
    _assert_idle(tiny_llm.engine)


def test_sample_token_greedy_draws_no_random_numbers():
    a, b = np.random.default_rng(5), np.random.default_rng(5)
    logits = np.array([0.1, 3.0, -1.0], np.float32)
    assert sample_token(logits, SamplingParams(), a) == 1
    assert a.random() == b.random()


def test_sample_token_same_seed_same_draws():
    logits = np.random.default_rng(0).normal(size=50).astype(np.float32)
    p = SamplingParams(temperature=1.0, top_k=20, top_p=0.95)
    a, b = np.random.default_rng(11), np.random.default_rng(11)
    assert [sample_token(logits, p, a) for _ in range(100)] == [
        sample_token(logits, p, b) for _ in range(100)
    ]


# chi-square with 5 degrees of freedom exceeds 35 with probability about 2e-6
CHI2_BOUND = 35.0
LOGITS6 = np.array([1.0, 0.5, 0.0, -0.5, 2.0, -1.0], np.float32)


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        (SamplingParams(temperature=1.0), _softmax(LOGITS6.astype(np.float64))),
        (SamplingParams(temperature=2.0), _softmax(LOGITS6.astype(np.float64) / 2)),
        # top_k 3 keeps logits 2.0, 1.0, 0.5
        (
            SamplingParams(temperature=2.0, top_k=3),
            _softmax(np.where(LOGITS6 >= 0.5, LOGITS6 / 2, -np.inf).astype(np.float64)),
        ),
    ],
    ids=["t1", "t2", "t2-topk3"],
)
def test_sample_token_follows_the_softmax(params, expected):
    rng = np.random.default_rng(42)
    draws = [sample_token(LOGITS6, params, rng) for _ in range(20000)]
    assert _chi_square(draws, expected) < CHI2_BOUND


def test_sample_token_top_p_keeps_the_smallest_nucleus():
    p = np.array([0.5, 0.3, 0.15, 0.05])
    logits = np.log(p).astype(np.float32)
    rng = np.random.default_rng(3)
    for top_p, kept in ((0.7, 2), (0.85, 3), (0.4, 1)):
        draws = [
            sample_token(logits, SamplingParams(temperature=1.0, top_p=top_p), rng)
            for _ in range(6000)
        ]
        expected = np.where(np.arange(4) < kept, p, 0.0)
        expected /= expected.sum()
        assert _chi_square(draws, expected) < 25.0, top_p


# ------------------------------------------------------------------ stop conditions


def test_stop_token_ids_and_max_tokens(tiny_llm, tiny_ref):
    ref = tiny_ref[3]
    stop_tok = ref[4]
    j = ref.index(stop_tok)
    (out,) = tiny_llm.generate(
        TINY_PROMPTS[3],
        SamplingParams(max_tokens=N_NEW, stop_token_ids=[stop_tok], ignore_eos=True),
    )
    assert out.token_ids == ref[: j + 1]  # the stop token is kept
    assert out.finish_reason == "stop"
    (out,) = tiny_llm.generate(TINY_PROMPTS[3], SamplingParams(max_tokens=3, ignore_eos=True))
    assert out.token_ids == ref[:3]
    assert out.finish_reason == "length"
    _assert_idle(tiny_llm.engine)


def test_eos_stops_unless_ignored(tiny_ref):
    ref = tiny_ref[3]
    eos = ref[2]
    j = ref.index(eos)
    # the same seeded weights, with one of the reference's tokens as end of sequence
    model = tiny_random(0, dataclasses.replace(TINY_RANDOM, eos_token_id=eos))
    llm = LLM(model, plan=[6], **TINY_OPTIONS)
    (out,) = llm.generate(TINY_PROMPTS[3], SamplingParams(max_tokens=N_NEW))
    assert (out.token_ids, out.finish_reason) == (ref[: j + 1], "stop")
    (out,) = llm.generate(TINY_PROMPTS[3], SamplingParams(max_tokens=N_NEW, ignore_eos=True))
    assert (out.token_ids, out.finish_reason) == (ref, "length")
    _assert_idle(llm.engine)


@pytest.mark.smollm2
def test_smollm2_logprobs_match_the_reference(smollm2, smol_llm, smol_ref):
    (out,) = smol_llm.generate(
        SMOL_PROMPTS[0], SamplingParams(max_tokens=N_NEW, ignore_eos=True, logprobs=5)
    )
    assert out.token_ids == smol_ref[0]
    prompt = smollm2.tokenizer.encode(SMOL_PROMPTS[0])
    ref = _logits(smollm2.model, prompt + out.token_ids, pad_to=32).astype(np.float64)
    assert out.logprobs is not None
    for j, lp in enumerate(out.logprobs):
        row = ref[len(prompt) - 1 + j]
        log_sm = row - row.max() - np.log(np.sum(np.exp(row - row.max())))
        np.testing.assert_allclose(lp.logprob, log_sm[lp.token_id], atol=1e-3)
        np.testing.assert_allclose([v for _, v in lp.top], np.sort(log_sm)[::-1][:5], atol=1e-3)
        assert lp.top[0][0] == lp.token_id
    assert smollm2.tokenizer.decode([out.token_ids[0]]).strip() == "Paris"
    assert out.logprobs[0].logprob > np.log(0.3)  # the model is sure of it
    _assert_idle(smol_llm.engine)


@pytest.mark.smollm2
def test_smollm2_stop_string_cuts_the_text(smollm2, smol_llm, smol_ref):
    tok = smollm2.tokenizer
    (full,) = smol_llm.generate(SMOL_PROMPTS[0], GREEDY)
    assert full.token_ids == smol_ref[0]
    text = full.text
    # a stop string that starts inside the greedy text, after its third token
    start = len(tok.decode(full.token_ids[:3]))
    stop = text[start : start + 3]
    assert stop.strip(), f"pick another prompt: {text!r}"
    cut = text.index(stop)
    (out,) = smol_llm.generate(
        SMOL_PROMPTS[0], SamplingParams(max_tokens=N_NEW, stop=[stop], ignore_eos=True)
    )
    assert out.finish_reason == "stop"
    assert out.text == text[:cut]
    assert stop not in out.text
    n = len(out.token_ids)
    assert out.token_ids == full.token_ids[:n]  # ends at the token that completed the stop
    assert stop in tok.decode(out.token_ids) and stop not in tok.decode(out.token_ids[:-1])
    _assert_idle(smol_llm.engine)


# ------------------------------------------------------------------ streaming


async def _collect(engine: Engine, prompt, params) -> list:
    return [out async for out in engine.stream(prompt, params)]


def _check_stream(outs, ref: list[int]) -> None:
    assert [len(o.token_ids) for o in outs] == list(range(1, len(ref) + 1))
    for k, o in enumerate(outs):
        assert o.token_ids == ref[: k + 1]
        assert o.new_token_ids == [ref[k]]
        assert o.finished == (k == len(outs) - 1)
    assert outs[-1].finish_reason == "length"


def test_stream_yields_growing_outputs_then_finished(tiny_llm, tiny_ref):
    outs = asyncio.run(_collect(tiny_llm.engine, TINY_PROMPTS[3], GREEDY))
    _check_stream(outs, tiny_ref[3])
    _assert_idle(tiny_llm.engine)


def test_two_concurrent_streams_complete(tiny_llm, tiny_ref):
    async def both():
        return await asyncio.gather(
            _collect(tiny_llm.engine, TINY_PROMPTS[3], GREEDY),
            _collect(tiny_llm.engine, TINY_PROMPTS[1], GREEDY),
        )

    a, b = asyncio.run(asyncio.wait_for(both(), timeout=120))
    _check_stream(a, tiny_ref[3])
    _check_stream(b, tiny_ref[1])
    _assert_idle(tiny_llm.engine)


def test_closing_a_stream_early_aborts_its_request(tiny_llm, tiny_ref):
    engine = tiny_llm.engine

    async def first_only():
        async with contextlib.aclosing(engine.stream(TINY_PROMPTS[3], GREEDY)) as stream:
            async for out in stream:
                return out

    out = asyncio.run(first_only())
    assert out.token_ids == tiny_ref[3][:1]
    assert engine.get_output(out.request_id).finish_reason == "abort"
    _assert_idle(engine)


def test_stream_with_the_background_loop_sees_a_request_that_ends_at_once(tiny_llm, monkeypatch):
    engine = tiny_llm.engine
    subscribe = engine.subscribe

    def late_subscribe(request_id, callback):
        # A subscription made after add_request returns could miss outputs; stream must
        # register its callback with the request itself, never through a later subscribe.
        time.sleep(0.5)
        subscribe(request_id, callback)

    monkeypatch.setattr(engine, "subscribe", late_subscribe)
    engine.start()
    try:
        one = SamplingParams(max_tokens=1, ignore_eos=True)
        outs = asyncio.run(asyncio.wait_for(_collect(engine, TINY_PROMPTS[3], one), timeout=3))
    finally:
        engine.stop()
    assert outs[-1].finished


# ------------------------------------------------------------------ outputs


def test_generate_returns_outputs_in_input_order_with_their_fields(tiny_llm, tiny_ref):
    picks = [3, 0, 1]  # the shapes of the requests alone and of the abort test
    params = [SamplingParams(max_tokens=m, ignore_eos=True) for m in (N_NEW, 1, 3)]
    outs = tiny_llm.generate([TINY_PROMPTS[i] for i in picks], params)
    assert len({o.request_id for o in outs}) == 3
    for o, i, p in zip(outs, picks, params, strict=True):
        assert o.prompt_token_ids == TINY_PROMPTS[i]
        assert o.token_ids == tiny_ref[i][: p.max_tokens]
        assert o.text == ""  # tiny-random has no tokenizer
        assert (o.finished, o.finish_reason) == (True, "length")
        m = o.metrics
        assert m.ttft is not None and m.ttft > 0
        assert m.e2e is not None and m.e2e >= m.ttft
        assert len(m.token_times) == p.max_tokens
        if p.max_tokens > 1:
            assert m.tpot is not None and m.tpot >= 0
            assert len(m.itl) == p.max_tokens - 1
        else:
            assert m.tpot is None and m.itl == []
    _assert_idle(tiny_llm.engine)


def test_user_vocabulary_is_importable_from_the_package():
    import pipelive_jax
    from pipelive_jax import LLM as TopLLM
    from pipelive_jax import SamplingParams as TopParams

    assert TopLLM is LLM and TopParams is SamplingParams
    with pytest.raises(AttributeError, match="no attribute 'Engine'"):
        pipelive_jax.Engine  # noqa: B018


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(max_tokens=-1), "max_tokens=-1: must be an integer >= 1"),
        (dict(max_tokens=0), "max_tokens=0"),
        (dict(top_p=0.0), r"top_p=0.0: must be in \(0, 1\]"),
        (dict(temperature=-1.0), "temperature=-1.0: must be a finite number >= 0"),
        (dict(temperature=float("nan")), "temperature=nan"),
        (dict(top_k=-2), "top_k=-2"),
        (dict(seed=-1), "seed=-1"),
        (dict(stop=[""]), "stop"),
        (dict(stop_token_ids=[-3]), "stop_token_ids"),
    ],
)
def test_bad_sampling_params(kwargs, match):
    with pytest.raises(RequestError, match=match):
        SamplingParams(**kwargs)


def test_bad_requests_are_refused_and_the_engine_still_serves(tiny_llm, tiny_ref):
    engine = tiny_llm.engine
    known = set(engine.requests)
    mutated = SamplingParams()
    mutated.max_tokens = -5  # changed after construction: add_request validates again
    bad = [
        (([],), RequestError, "prompt is empty"),
        (([5, 512],), RequestError, r"prompt token ids must be in \[0, 512\)"),
        (([5, -1],), RequestError, r"\[0, 512\)"),
        (([7] * 64,), RequestError, "prompt has 64 tokens; max_model_len is 64"),
        (("hello",), RequestError, "no tokenizer"),
        ((3.5,), RequestError, "prompt must be a string or a list of token ids"),
        (([5], mutated), RequestError, "max_tokens=-5"),
        (([5], {"max_tokens": 3}), RequestError, "params must be SamplingParams"),
    ]
    for args, exc, match in bad:
        with pytest.raises(exc, match=match):
            engine.add_request(*args)
        assert set(engine.requests) == known and not engine.has_unfinished()
    rid = engine.add_request(TINY_PROMPTS[0], GREEDY, request_id="mine")
    with pytest.raises(RequestError, match="request id 'mine' is already in use"):
        engine.add_request(TINY_PROMPTS[1], GREEDY, request_id="mine")
    engine.abort(rid)
    with pytest.raises(RequestError, match="non-empty list"):
        tiny_llm.generate([])
    with pytest.raises(RequestError, match="2 SamplingParams for 1 prompts"):
        tiny_llm.generate([TINY_PROMPTS[0]], [GREEDY, GREEDY])
    (out,) = tiny_llm.generate([TINY_PROMPTS[0]], GREEDY)
    assert out.token_ids == tiny_ref[0]
    _assert_idle(engine)


def test_a_refused_batch_leaves_nothing_queued(tiny_llm):
    engine = tiny_llm.engine
    try:
        with pytest.raises(RequestError, match="prompt is empty"):
            tiny_llm.generate([TINY_PROMPTS[0], []])
        assert not engine.has_unfinished()
    finally:
        while engine.has_unfinished():  # leave the shared engine clean for the next tests
            engine.step()


@pytest.mark.parametrize(
    ("plan", "options", "exc", "match"),
    [
        (None, dict(flavour="vanilla"), ConfigError, "unknown engine option"),
        (None, dict(page_size=12), ConfigError, "page_size must be a power of two, got 12"),
        (None, dict(num_microbatches=0), ConfigError, "num_microbatches must be >= 1"),
        (None, dict(memory_utilization=1.5), ConfigError, "memory_utilization"),
        (None, dict(finished_retention=-1), ConfigError, "finished_retention must be"),
        (None, dict(backend="cuda"), ConfigError, "backend must be one of"),
        (
            [3, 3],
            dict(num_pages=[64, 64, 64]),
            ConfigError,
            "num_pages lists 3 stages but the plan has 2",
        ),
        (
            None,
            dict(num_pages=4, page_size=16, max_model_len=128),
            ConfigError,
            "stage 0 has 3 usable KV pages but one request of max_model_len=128 needs 8",
        ),
        (
            {"stages": [{"devices": [0], "layers": [0, 2]}, {"devices": [1], "layers": [3, 6]}]},
            {},
            PlanError,
            r"gap between stage 0 .* and stage 1",
        ),
        (
            {"stages": [{"devices": [0], "layers": [0, 4]}, {"devices": [1], "layers": [3, 6]}]},
            {},
            PlanError,
            "stage 0 and stage 1 overlap on layers",
        ),
        (
            {"stages": [{"devices": [0], "layers": [0, 3]}, {"devices": [9], "layers": [3, 6]}]},
            {},
            PlanError,
            "stage 1 uses unknown device 9: there are 8 devices",
        ),
        (
            {"stages": [{"devices": [1], "layers": [0, 3]}, {"devices": [1], "layers": [3, 6]}]},
            {},
            PlanError,
            "device 1 is used by stage 0 and stage 1",
        ),
        ([3, 4], {}, PlanError, "the model has 6 layers"),
        ([6, 0], {}, PlanError, "stage 1 is empty"),
    ],
    ids=[
        "unknown-option",
        "page-size",
        "microbatches",
        "utilization",
        "finished-retention",
        "backend",
        "num-pages-list",
        "max-model-len-too-large",
        "plan-gap",
        "plan-overlap",
        "plan-unknown-device",
        "plan-device-twice",
        "plan-too-many-layers",
        "plan-empty-stage",
    ],
)
def test_bad_engine_options_and_plans(tiny, plan, options, exc, match):
    opts = {**TINY_OPTIONS, **options}
    with pytest.raises(exc, match=match):
        LLM(tiny, plan=plan, **opts)


def test_engine_config_and_options_are_exclusive(tiny):
    from pipelive_jax.serving.engine import EngineConfig

    with pytest.raises(ConfigError, match="either config= or engine options"):
        Engine(tiny, None, EngineConfig(**TINY_OPTIONS), page_size=8)


def test_covering_rule_counts_prefill_rows_and_lets_decodes_borrow_mixed_shapes():
    """`background_compile` may run a batch on a compiled shape only if that shape's attention
    bound covers the batch's sequences with more than one token; a decode step has none, so a
    compiled mixed shape covers it, while a mixed batch needs a bound at least as high."""
    from pipelive_jax.serving.engine import long_capacity, long_needed
    from pipelive_jax.serving.pipeline import BatchShape

    decode = BatchShape(num_tokens=8, max_seqs=8, pages_per_seq=4, max_q_len=1)
    mixed2 = BatchShape(num_tokens=128, max_seqs=8, pages_per_seq=4, max_q_len=64, long_seqs=2)
    mixed4 = dataclasses.replace(mixed2, long_seqs=4)
    unbounded = dataclasses.replace(mixed2, long_seqs=None)
    assert long_needed(decode) == 0 <= long_capacity(mixed2)
    assert long_capacity(mixed2) < long_needed(mixed4) <= long_capacity(unbounded) == 8
    assert long_needed(unbounded) == 8 > long_capacity(mixed4)


def test_mixed_steps_bound_their_prefill_rows_only_up_to_a_quarter_of_the_batch(tiny, tiny_ref):
    """One prompt arriving among 7 decodes gets the decode path for the 7 (bound 1); three
    arriving together exceed a quarter of the 8 rows and the whole step pads (no bound): each
    bound is a compiled shape of its own, worth it only where chunks are few. Tokens stay
    those of the reference either way."""
    llm = LLM(tiny, plan=[6], max_num_seqs=8, **TINY_OPTIONS)
    eng = llm.engine
    used: list = []
    run = eng.executor.run

    def recording_run(batches):
        used.extend(b.shape for b in batches)
        return run(batches)

    eng.executor.run = recording_run
    long = SamplingParams(max_tokens=20, ignore_eos=True)
    ids = [eng.add_request(TINY_PROMPTS[k], long) for k in (0, 1, 2, 3)]
    for _ in range(3):
        eng.step()
    used.clear()
    ids.append(eng.add_request(TINY_PROMPTS[4], GREEDY))  # 1 prefill among 4 decodes
    eng.step()
    assert [s.long_seqs for s in used] == [1]
    used.clear()
    ids += [eng.add_request(TINY_PROMPTS[k], GREEDY) for k in (5, 6, 7)]  # 3 among 5
    eng.step()
    assert [(s.max_seqs, s.long_seqs) for s in used] == [(8, None)]
    while eng.has_unfinished():
        eng.step()
    for rid, k in zip(ids[4:], (4, 5, 6, 7), strict=True):
        assert eng.get_output(rid).token_ids == tiny_ref[k]

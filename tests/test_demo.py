"""`pipelive demo`: requests stream through the whole live reconfiguration, KV pages really move,
and every output equals its prompt's tokens from a run that never reconfigured.

On the tiny model: the demo's own path on SmolLM2 costs 3 minutes of compiling on 2 cores, and
live reconfiguration on SmolLM2 has its end-to-end test in test_reconfig.py. The tiny model's
PREPARE (ahead-of-time compile of the 3-stage plan) still lasts far longer than a fixed handful
of requests would, which is what the demo must outlast."""

from __future__ import annotations

import copy
import io

import pytest
from rich.console import Console

from pipelive_jax.demo import live_demo, plans, print_result


def test_demo_plans_scale_with_the_layer_count():
    assert plans(30) == (
        [15, 15],
        {
            "stages": [
                {"devices": [0], "layers": [0, 8]},
                {"devices": [1], "layers": [8, 20]},
                {"devices": [2], "layers": [20, 30]},
            ]
        },
    )
    src, tgt = plans(6)
    assert src == [3, 3]
    assert [s["layers"] for s in tgt["stages"]] == [[0, 2], [2, 4], [4, 6]]


@pytest.mark.slow
def test_demo_streams_through_the_reconfiguration_and_matches_the_reference(tiny):
    out = io.StringIO()
    con = Console(file=out, width=120)
    res = live_demo(tiny, max_tokens=6, con=con)
    rep = res.report
    assert rep.ok, rep.reason
    # Requests were in flight for the whole reconfiguration, so KV of moved layers really moved:
    # in the pre-copy, or (6-token requests on a fast machine can all be new by then, holding no
    # pages when it starts) in the patch rounds that follow.
    assert res.served_during > 4
    assert rep.bytes_kv_precopy + rep.bytes_kv_patched > 0
    assert rep.verified_pages and rep.verified_pages > 0
    assert rep.compiled_in_pause == 0
    assert res.mismatched == [], res.mismatched
    assert len(res.outputs) == len(res.prompt_index) > len(res.expected) // 2
    assert all(len(o.token_ids) == 6 or o.finish_reason == "stop" for o in res.outputs)
    print_result(res, con)
    assert "pages verified byte-identical" in out.getvalue()

    # The comparison would catch a changed token.
    bad = copy.copy(res)
    bad.expected = [list(t) for t in res.expected]
    k = res.prompt_index[0]
    bad.expected[k][-1] = (bad.expected[k][-1] + 1) % tiny.config.vocab_size
    assert 0 in bad.mismatched and not bad.ok

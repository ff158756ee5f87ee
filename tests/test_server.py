"""`pipelive serve` end to end: a real server on a loopback port, real HTTP clients.

- Every JSON-RPC error code, each produced by the input that should produce it; notifications
  and batches; the body limit; the per-request time limit; a server that is draining.
- Hypothesis throws random bytes, random JSON and ill-typed calls (wrong types, huge numbers, deep
  nesting) at /rpc: always a JSON-RPC error or result, never an internal error, and the server
  serves on afterwards.
- Mutating methods without the token (or with a wrong one) are refused and change nothing.
- Greedy `generate` calls running while a live reconfiguration [3,3] -> [2,1,3] goes through RPC
  all complete with the tokens of a run without reconfiguration.
- The official `openai` client, unchanged: completions, chat completions (the model's chat
  template), streaming, errors. /health, and /metrics through prometheus_client's parser.
- `python -m pipelive_jax.cli_server serve --config` in a subprocess: token file 0600, `rpc` exit codes,
  SIGTERM with a request in flight -> the request is answered and the process exits 0.

Cost: every (stage, batch shape) is a compile. The module shares one server on tiny-random with a
byte-level tokenizer and a ChatML template, max_num_seqs=4, max_model_len=64, so that one-token
prompts and decodes share one batch shape; the chat prompt adds one more. The aborted
reconfiguration compiles the [2,1,3] stages, which the live one then finds in the cache.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipelive_jax.serving.engine import Engine
from pipelive_jax.serving.request import RequestMetrics, RequestOutput
from pipelive_jax.serving.sampling import SamplingParams, TokenLogprob
from pipelive_jax.serving.server import (
    GENERATE_KEYS,
    BackgroundServer,
    LogprobDeltas,
    ServerOptions,
    TextDeltas,
    create_app,
)

TOKEN = "test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TWO, THREE = [3, 3], [2, 1, 3]
# Device 7's budget cannot even hold three layers' weights: any plan that puts layers there is
# refused by admission. The others are large (and num_pages fixes the pools, so nothing is sized
# from them).
BUDGETS = {**{d: 1 << 30 for d in range(7)}, 7: 300_000}
ON_DEVICE_7 = {"stages": [{"devices": [0], "layers": [0, 3]}, {"devices": [7], "layers": [3, 6]}]}
SERVER_CODES = {-32700, -32600, -32601, -32602, -32001, -32002, -32003, -32004, -32005}
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_tokenizer():
    """Byte-level BPE without merges over tiny-random's 512 ids: 5 specials (EOS = 2, as the
    model's config says), the 256 bytes, then filler specials; a ChatML template."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    from pipelive_jax.models.tokenizer import Tokenizer

    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    vocab = {s: i for i, s in enumerate(specials)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    filler = [f"<extra_{i}>" for i in range(512 - len(vocab))]
    for s in filler:
        vocab[s] = len(vocab)
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens(
        [AddedToken(s, special=True, normalized=False) for s in specials + filler]
    )
    return Tokenizer(hf, bos_token_id=1, eos_token_id=2, chat_template=CHATML)


# ------------------------------------------------------------------ HTTP helpers


def http(
    url: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    method: str | None = None,
) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, data=body, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def post_rpc(
    srv: BackgroundServer, payload: Any, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    status, _, raw = http(
        srv.url + "/rpc", body, {"Content-Type": "application/json", **(headers or {})}
    )
    return status, (json.loads(raw) if raw else None)


def rpc(
    srv: BackgroundServer, method: str, params: Any = None, *, token: str | None = None
) -> dict[str, Any]:
    """One call; the response object (with "result" or "error")."""
    payload: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": 7}
    if params is not None:
        payload["params"] = params
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    status, doc = post_rpc(srv, payload, headers)
    assert status == 200, (status, doc)
    assert doc["jsonrpc"] == "2.0" and doc["id"] == 7
    return doc


def result(
    srv: BackgroundServer, method: str, params: Any = None, *, token: str | None = None
) -> Any:
    doc = rpc(srv, method, params, token=token)
    assert "error" not in doc, doc["error"]
    return doc["result"]


def error(
    srv: BackgroundServer, method: str, params: Any = None, *, token: str | None = None
) -> dict[str, Any]:
    doc = rpc(srv, method, params, token=token)
    assert "error" in doc, doc
    return doc["error"]


def generate_ids(srv: BackgroundServer, ids: list[int], max_tokens: int = 24) -> dict[str, Any]:
    return result(
        srv, "generate", {"prompt_token_ids": ids, "max_tokens": max_tokens, "ignore_eos": True}
    )


def wait_done(srv: BackgroundServer, op_id: str, timeout: float = 180.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        st_ = result(srv, "reconfig_status", {"op_id": op_id})
        if st_["done"]:
            return st_
        assert time.monotonic() < deadline, f"reconfiguration stuck in {st_['phase']}"
        time.sleep(0.05)


def plan_counts(srv: BackgroundServer) -> list[int]:
    stages = result(srv, "status")["plan"]["stages"]
    return [s["layers"][1] - s["layers"][0] for s in stages]


# ------------------------------------------------------------------ the shared server


@pytest.fixture(scope="module")
def tiny_chat(tiny):
    return dataclasses.replace(tiny, name="tiny-chat", tokenizer=byte_tokenizer())


@pytest.fixture(scope="module")
def srv(tiny_chat):
    engine = Engine(
        tiny_chat,
        TWO,
        num_pages=16,
        max_model_len=64,
        max_num_seqs=4,
        kv_resize=False,
        device_memory_bytes=BUDGETS,
    )
    app = create_app(engine, token=TOKEN, options=ServerOptions(drain_timeout_s=5.0))
    with BackgroundServer(app) as server:
        yield server


@pytest.fixture(scope="module")
def openai_client(srv):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)


# ------------------------------------------------------------------ basics


def test_health_models_and_status(srv):
    status, _, raw = http(srv.url + "/health")
    assert status == 200 and json.loads(raw)["status"] == "ok"
    status, _, raw = http(srv.url + "/v1/models")
    assert [m["id"] for m in json.loads(raw)["data"]] == ["tiny-chat"]
    s = result(srv, "status")
    assert s["model"] == "tiny-chat" and s["server"]["engine_loop_alive"]
    assert plan_counts(srv) == TWO
    assert result(srv, "reconfig_status") is None  # nothing yet


def test_generate_returns_tokens_text_and_metrics(srv):
    r = generate_ids(srv, [17], max_tokens=5)
    assert len(r["token_ids"]) == 5 and r["finish_reason"] == "length"
    assert isinstance(r["text"], str)
    m = r["metrics"]
    assert m["prompt_tokens"] == 1 and m["completion_tokens"] == 5 and m["ttft_ms"] > 0
    # The server drops finished requests from the engine's table (it would grow forever).
    assert r["request_id"] not in srv.frontend.engine.requests


# ------------------------------------------------------------------ error codes

_deep = b"[" * 100_000 + b"]" * 100_000


@pytest.mark.parametrize(
    "payload, code",
    [
        (b"{not json", -32700),
        (b"\xff\xfe\x00garbage", -32700),
        (_deep, -32700),
        (b'{"jsonrpc": "2.0", "method": "status", "id": NaN}', -32700),
        (b'{"jsonrpc": "2.0", "method": "status", "id": 1e999}', -32700),
        (b"1" * 5000, -32700),  # more digits than Python turns into an int
        (b"42", -32600),
        (b"[]", -32600),
        ({"jsonrpc": "1.0", "method": "status", "id": 1}, -32600),
        ({"jsonrpc": "2.0", "method": 5, "id": 1}, -32600),
        ({"jsonrpc": "2.0", "method": "status", "params": "x", "id": 1}, -32600),
        ({"jsonrpc": "2.0", "method": "status", "id": {"a": 1}}, -32600),
        ({"jsonrpc": "2.0", "method": "status", "id": True}, -32600),
        ({"jsonrpc": "2.0", "method": "no_such_method", "id": 1}, -32601),
        ({"jsonrpc": "2.0", "method": "status", "params": {"x": 1}, "id": 1}, -32602),
        ({"jsonrpc": "2.0", "method": "status", "params": [1], "id": 1}, -32602),
    ],
)
def test_rpc_request_level_errors(srv, payload, code):
    status, doc = post_rpc(srv, payload)
    assert status == 200
    assert doc["error"]["code"] == code, doc
    assert doc["jsonrpc"] == "2.0"
    # The id comes back when it can be read, else null (parse errors, invalid ids).
    rid = payload.get("id") if isinstance(payload, dict) else None
    assert doc["id"] == (rid if type(rid) is int else None)


@pytest.mark.parametrize(
    "params, param",
    [
        ({"prompt_token_ids": [5], "max_tokens": -1}, "max_tokens"),
        ({"prompt_token_ids": [5], "max_tokens": 1.5}, "max_tokens"),
        ({"prompt_token_ids": [5], "temperature": "hot"}, "temperature"),
        ({"prompt_token_ids": [5], "temperature": 10**400}, "temperature"),
        ({"prompt_token_ids": [5], "top_p": 0}, "top_p"),
        ({"prompt_token_ids": [5], "seed": -3}, "seed"),
        ({"prompt_token_ids": [5], "stop": [1, 2]}, "stop"),
        ({"prompt_token_ids": [5], "stop_token_ids": 5}, "stop_token_ids"),
        ({"prompt_token_ids": [5], "colour": "red"}, "colour"),
        ({"prompt_token_ids": [5], "prompt": "x"}, "prompt"),
        ({}, "prompt"),
        ({"prompt_token_ids": []}, "prompt_token_ids"),
        ({"prompt_token_ids": [True]}, "prompt_token_ids"),
        ({"prompt_token_ids": [10**30]}, None),  # out of the vocabulary: the engine says so
        ({"prompt_token_ids": [5] * 64}, None),  # longer than max_model_len
    ],
)
def test_generate_invalid_params(srv, params, param):
    err = error(srv, "generate", params)
    assert err["code"] == -32602, err
    assert err["data"]["param"] == param and err["data"]["reason"]


def test_plan_errors_are_invalid_params(srv):
    err = error(srv, "validate_plan", {"plan": [3, 4]})  # 7 layers, the model has 6
    assert err["code"] == -32602 and err["data"]["param"] == "plan"
    err = error(srv, "validate_plan", {"plan": "¹"})  # parse_plan leaks a bare ValueError here
    assert err["code"] == -32602
    for bad in (
        {"plan": [3, 4]},
        {"plan": TWO, "mode": "sideways"},
        {"plan": TWO, "max_rounds": 0},
    ):
        assert error(srv, "reconfigure", bad, token=TOKEN)["code"] == -32602
    assert error(srv, "reconfig_status", {"op_id": "op-999"})["code"] == -32602
    assert error(srv, "abort_reconfig", {"op_id": "nope"}, token=TOKEN)["code"] == -32602
    assert error(srv, "abort_reconfig", {}, token=TOKEN)["code"] == -32602
    assert srv.frontend.engine.reconfig_history == []


def test_infeasible_plan_is_refused_with_the_admission_numbers(srv):
    history = list(srv.frontend.engine.reconfig_history)
    for params in ({"plan": ON_DEVICE_7}, {"plan": ON_DEVICE_7, "dry_run": True}):
        err = error(srv, "reconfigure", params, token=TOKEN)
        assert err["code"] == -32002, err
        assert err["data"]["device"] == 7 and err["data"]["pages_that_fit"] == 0
        assert "devices" in err["data"]
    verdict = result(srv, "validate_plan", {"plan": ON_DEVICE_7})
    assert verdict["ok"] is False and verdict["numbers"]["device"] == 7 and verdict["reason"]
    ok = result(srv, "validate_plan", {"plan": THREE})
    assert ok["ok"] is True and ok["estimate"]["moved_layers"] == [2, 3, 4, 5]
    dry = result(srv, "reconfigure", {"plan": THREE, "dry_run": True}, token=TOKEN)
    assert dry["dry_run"] and dry["admission"]["ok"]
    assert srv.frontend.engine.reconfig_history == history
    assert plan_counts(srv) == TWO


def test_internal_errors_do_not_leak(srv, monkeypatch):
    def boom() -> dict:
        raise RuntimeError("secret detail /etc/passwd")

    monkeypatch.setattr(srv.frontend.engine, "status", boom)
    status, _, raw = http(
        srv.url + "/rpc", json.dumps({"jsonrpc": "2.0", "method": "status", "id": 1}).encode()
    )
    doc = json.loads(raw)
    assert status == 200 and doc["error"]["code"] == -32603 and doc["error"]["data"]["error_id"]
    assert b"secret" not in raw and b"Traceback" not in raw
    status, _, raw = http(srv.url + "/metrics")
    assert status == 500 and b"secret" not in raw and b"Traceback" not in raw


def test_request_time_limit_and_draining(srv, monkeypatch):
    monkeypatch.setattr(srv.frontend.options, "request_timeout_s", 0.05)
    err = error(srv, "generate", {"prompt_token_ids": [9], "max_tokens": 60, "ignore_eos": True})
    assert err["code"] == -32004 and err["data"]["timeout_s"] == 0.05
    monkeypatch.undo()
    monkeypatch.setattr(srv.frontend, "draining", True)
    assert error(srv, "generate", {"prompt_token_ids": [9]})["code"] == -32005
    assert http(srv.url + "/health")[0] == 503
    monkeypatch.undo()
    deadline = time.monotonic() + 30
    while srv.frontend.engine.scheduler.has_unfinished():  # the timed-out request is aborted
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert not srv.frontend.in_flight


def test_notifications_and_batches(srv):
    status, doc = post_rpc(srv, {"jsonrpc": "2.0", "method": "status"})
    assert status == 204 and doc is None
    status, doc = post_rpc(srv, {"jsonrpc": "2.0", "method": "no_such_method"})
    assert status == 204 and doc is None  # not even errors answer a notification
    status, doc = post_rpc(srv, [{"jsonrpc": "2.0", "method": "status"}] * 3)
    assert status == 204 and doc is None
    batch = [
        {"jsonrpc": "2.0", "method": "status", "id": "a"},
        {"jsonrpc": "2.0", "method": "metrics"},  # notification: no answer
        {
            "jsonrpc": "2.0",
            "method": "generate",
            "params": {"prompt_token_ids": [11], "max_tokens": 3},
            "id": 2,
        },
        {"jsonrpc": "2.0", "method": "nope", "id": 3},
        17,
        {"jsonrpc": "2.0", "method": "reconfigure", "params": {"plan": THREE}, "id": 4},
    ]
    status, doc = post_rpc(srv, batch)
    assert status == 200 and len(doc) == 5
    by_id = {d["id"]: d for d in doc if d["id"] is not None}
    assert "result" in by_id["a"] and len(by_id[2]["result"]["token_ids"]) == 3
    assert by_id[3]["error"]["code"] == -32601 and by_id[4]["error"]["code"] == -32003
    assert [d["error"]["code"] for d in doc if d["id"] is None] == [-32600]
    status, doc = post_rpc(
        srv, [{"jsonrpc": "2.0", "method": "status", "id": i} for i in range(65)]
    )
    assert doc["error"]["code"] == -32600


def test_body_size_limit(srv):
    big = json.dumps(
        {"jsonrpc": "2.0", "method": "status", "id": 1, "pad": "x" * (1 << 21)}
    ).encode()
    status, doc = post_rpc(srv, big)
    assert status == 413 and doc["error"]["code"] == -32600 and doc["id"] is None
    status, _, raw = http(srv.url + "/v1/completions", big, {"Content-Type": "application/json"})
    assert status == 413 and json.loads(raw)["error"]["code"] == "request_too_large"


# ------------------------------------------------------------------ fuzzing /rpc

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**40), max_value=10**40)
    | st.sampled_from([10**4000, -(10**4000), 2**63, 2**64, -1, 0])
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
_json = st.recursive(
    _scalars,
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    max_leaves=25,
)


def _deep(depth: int) -> Any:
    x: Any = 0
    for _ in range(depth):
        x = [x]
    return x


_values = _json | st.integers(1, 500).map(_deep)
_methods = st.sampled_from(
    [
        "generate",
        "reconfigure",
        "reconfig_status",
        "abort_reconfig",
        "validate_plan",
        "status",
        "metrics",
        "nope",
        "",
    ]
)


def _no_valid_prompt(params: dict[str, Any]) -> bool:
    # A valid prompt would really run (and compile a batch shape per prompt length).
    ids = params.get("prompt_token_ids")
    return not (isinstance(ids, list) and all(isinstance(t, int) for t in ids))


_params = (
    st.dictionaries(
        st.sampled_from(sorted(GENERATE_KEYS - {"prompt"})), _values, max_size=5
    ).filter(_no_valid_prompt)
    | st.dictionaries(
        st.sampled_from(["plan", "op_id", "mode", "dry_run", "max_rounds"]), _values, max_size=3
    )
    | _values
)
_calls = st.fixed_dictionaries(
    {},
    optional={
        "jsonrpc": st.just("2.0") | _scalars,
        "method": _methods | _scalars,
        "params": _params,
        "id": st.integers() | st.text(max_size=5) | st.none() | _values,
    },
)
_bodies = (
    st.binary(max_size=300)
    | _json.map(lambda v: json.dumps(v).encode())
    | _calls.map(lambda c: json.dumps(c).encode())
    | st.lists(_calls, min_size=1, max_size=4).map(lambda c: json.dumps(c).encode())
)


def _check_rpc_answer(doc: Any) -> None:
    for item in doc if isinstance(doc, list) else [doc]:
        assert item["jsonrpc"] == "2.0" and "id" in item
        assert ("result" in item) != ("error" in item)
        if "error" in item:
            assert item["error"]["code"] in SERVER_CODES, item  # never -32603
            assert isinstance(item["error"]["message"], str)


@settings(max_examples=250, suppress_health_check=list(HealthCheck), deadline=None)
@given(body=_bodies)
def test_fuzzed_rpc_bodies_get_json_rpc_answers(srv, body):
    status, _, raw = http(srv.url + "/rpc", body, {"Content-Type": "application/json"})
    assert status in (200, 204), (status, raw[:300])
    if status == 200:
        _check_rpc_answer(json.loads(raw))
    else:
        assert raw == b""


def test_server_still_serves_after_fuzzing(srv):
    assert result(srv, "status")["server"]["engine_loop_alive"]
    assert len(generate_ids(srv, [23], max_tokens=4)["token_ids"]) == 4
    assert srv.frontend.engine.reconfig_history == []
    assert not srv.frontend.engine.scheduler.has_unfinished()


# ------------------------------------------------------------------ auth


def test_mutating_methods_need_the_token(srv):
    history = list(srv.frontend.engine.reconfig_history)
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": TOKEN},
        {"Authorization": f"Bearer {TOKEN}x"},
    ):
        for method, params in (
            ("reconfigure", {"plan": THREE}),
            ("abort_reconfig", {"op_id": "op-1"}),
        ):
            status, doc = post_rpc(
                srv, {"jsonrpc": "2.0", "method": method, "params": params, "id": 1}, headers
            )
            assert doc["error"]["code"] == -32003, (headers, doc)
            assert TOKEN not in json.dumps(doc)
    assert srv.frontend.engine.reconfig_history == history
    assert plan_counts(srv) == TWO
    # Reading needs no token.
    assert "result" in rpc(srv, "validate_plan", {"plan": THREE})


# ------------------------------------------------------------------ reconfiguration over RPC


def test_busy_then_abort_rolls_back(srv):
    started = result(srv, "reconfigure", {"plan": THREE}, token=TOKEN)
    op = started["op_id"]
    assert started["estimate"]["moved_layers"] == [2, 3, 4, 5]
    # Compiling the new stages takes seconds: the reconfiguration is still in flight.
    for params in ({"plan": [6]}, {"plan": [6], "dry_run": True}):
        err = error(srv, "reconfigure", params, token=TOKEN)
        assert err["code"] == -32001 and err["data"]["op_id"] == op
    assert result(srv, "reconfig_status")["op_id"] == op
    aborted = result(srv, "abort_reconfig", {"op_id": op}, token=TOKEN)
    assert aborted["abort_requested"] is True
    final = wait_done(srv, op)
    assert final["ok"] is False and final["report"]["aborted_in"] is not None
    assert "error_traceback" not in final["report"]
    assert plan_counts(srv) == TWO
    again = result(srv, "abort_reconfig", {"op_id": op}, token=TOKEN)
    assert again["abort_requested"] is False


def test_generate_during_a_live_reconfiguration_keeps_greedy_tokens(srv):
    rng = np.random.default_rng(7)
    prompts = [[int(t)] for t in rng.integers(3, 512, size=8)]
    with ThreadPoolExecutor(8) as pool:
        base = list(pool.map(lambda p: generate_ids(srv, p), prompts))
    expected = {tuple(p): r["token_ids"] for p, r in zip(prompts, base, strict=True)}
    before = result(srv, "metrics")["reconfigurations"]
    assert all(len(v) == 24 for v in expected.values())

    done = threading.Event()
    records: list[tuple[tuple[int, ...], dict[str, Any], float, float]] = []

    def client(k: int) -> None:
        i = k
        while not done.is_set():
            p = prompts[i % len(prompts)]
            i += 3
            t0 = time.monotonic()
            r = generate_ids(srv, p)
            records.append((tuple(p), r, t0, time.monotonic()))

    with ThreadPoolExecutor(4) as pool:
        clients = [pool.submit(client, k) for k in range(4)]
        deadline = time.monotonic() + 60
        while result(srv, "status")["running"] == 0:
            assert time.monotonic() < deadline
        t_start = time.monotonic()
        op = result(srv, "reconfigure", {"plan": THREE}, token=TOKEN)["op_id"]
        final = wait_done(srv, op)
        t_done = time.monotonic()
        while not any(t0 > t_done for _, _, t0, _ in records):  # some entirely on the new plan
            assert time.monotonic() < t_done + 60
            time.sleep(0.01)
        done.set()
        for c in clients:
            c.result(timeout=120)

    assert final["ok"] is True, final["report"]["reason"]
    report = final["report"]
    assert report["pause_ms"] is not None
    # KV pages moved: requests were running across the switch, not only around it.
    assert report["bytes_kv_precopy"] + report["bytes_kv_final"] > 0, report
    assert plan_counts(srv) == THREE
    assert len(records) >= 8
    for prompt, r, _, _ in records:
        assert r["finish_reason"] == "length"
        assert r["token_ids"] == expected[prompt], prompt
    assert any(t0 < t_start and t1 > t_start for _, _, t0, t1 in records)  # in flight at the start
    assert any(t0 > t_done for _, _, t0, _ in records)  # served by the new plan
    m = result(srv, "metrics")
    assert m["reconfigurations"]["ok"] == before["ok"] + 1
    assert m["reconfigurations"]["in_flight"] is False
    assert m["last_pause_ms"] == final["report"]["pause_ms"]
    assert m["ttft_ms"]["count"] > 0 and m["itl_ms"]["p99"] is not None
    assert len(m["kv_utilization"]) == 3


# ------------------------------------------------------------------ the OpenAI-compatible API


def test_openai_completions(srv, openai_client):
    c = openai_client.completions.create(model="tiny-chat", prompt="a", max_tokens=6, temperature=0)
    assert c.object == "text_completion" and len(c.choices) == 1
    same = result(srv, "generate", {"prompt": "a", "max_tokens": 6})
    assert c.usage.prompt_tokens == 1 and c.usage.completion_tokens == len(same["token_ids"])
    assert c.choices[0].text == same["text"] and c.choices[0].finish_reason == same["finish_reason"]
    # Token ids as the prompt, and two prompts at once.
    two = openai_client.completions.create(
        model="tiny-chat",
        prompt=[[69], [70]],
        max_tokens=3,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert [ch.index for ch in two.choices] == [0, 1] and two.usage.completion_tokens == 6


def test_openai_completion_stream(srv, openai_client):
    kw: dict[str, Any] = dict(model="tiny-chat", prompt="b", max_tokens=8, temperature=0)
    full = openai_client.completions.create(**kw)
    chunks = list(
        openai_client.completions.create(stream=True, stream_options={"include_usage": True}, **kw)
    )
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text == full.choices[0].text
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices]
    assert finishes[-1] == full.choices[0].finish_reason and not any(finishes[:-1])
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_openai_chat_uses_the_chat_template(srv, openai_client, tiny_chat):
    messages = [{"role": "user", "content": "hi"}]
    chat = openai_client.chat.completions.create(
        model="tiny-chat", messages=messages, max_tokens=5, temperature=0
    )
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    ids = tiny_chat.tokenizer.encode(tiny_chat.tokenizer.apply_chat_template(messages))
    same = result(srv, "generate", {"prompt_token_ids": ids, "max_tokens": 5})
    assert chat.choices[0].message.content == same["text"]
    assert chat.usage.prompt_tokens == len(ids) and chat.usage.completion_tokens == len(
        same["token_ids"]
    )
    stream = openai_client.chat.completions.create(
        model="tiny-chat", messages=messages, max_tokens=5, temperature=0, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == same["text"]
    assert chunks[-1].choices[0].finish_reason == same["finish_reason"]


def test_openai_errors(srv, openai_client):
    import openai

    with pytest.raises(openai.NotFoundError):
        openai_client.completions.create(model="gpt-4", prompt="a", max_tokens=2)
    for kw in (
        {"max_tokens": 0},
        {"n": 2},
        {"temperature": -1},
        {"logprobs": 21},
        {"presence_penalty": 3},
        {"frequency_penalty": -2.5},
    ):
        with pytest.raises(openai.BadRequestError) as e:
            openai_client.completions.create(
                model="tiny-chat", prompt="a", **{"max_tokens": 2, **kw}
            )
        assert e.value.param == next(iter(kw)), e.value.body
    with pytest.raises(openai.BadRequestError):
        openai_client.chat.completions.create(model="tiny-chat", messages=[], max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        openai_client.completions.create(model="tiny-chat", prompt=[5] * 80, max_tokens=2)
    status, _, raw = http(
        srv.url + "/v1/completions", b"{oops", {"Content-Type": "application/json"}
    )
    err = json.loads(raw)["error"]
    assert status == 400 and set(err) == {"message", "type", "param", "code"}
    status, _, raw = http(srv.url + "/v1/embeddings", b"{}")
    assert status == 404 and json.loads(raw)["error"]["type"] == "not_found_error"


def test_bad_text_and_chat_roles_are_400_and_a_tiny_temperature_is_served(srv, openai_client):
    import openai

    def post(path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        # json.dumps writes a lone surrogate as the escape "\\ud800", as a client would send it.
        status, _, raw = http(srv.url + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
        return status, json.loads(raw)

    status, doc = post("/v1/completions", {"model": "tiny-chat", "prompt": "a\ud800", "max_tokens": 2})
    assert status == 400 and "not valid text" in doc["error"]["message"], doc
    for messages, why in (
        ([{"role": "wizard", "content": "hi"}], "unknown role 'wizard'"),
        ([{"role": "user"}], "needs content"),
        ([{"role": "user", "content": "\udfff"}], "not valid text"),
    ):
        status, doc = post("/v1/chat/completions", {"model": "tiny-chat", "messages": messages})
        assert status == 400 and why in doc["error"]["message"], doc
    # A temperature so small that logits / temperature overflow: the limit is greedy decoding
    # (it stalled the engine on NaN probabilities before).
    greedy = openai_client.completions.create(model="tiny-chat", prompt="ab", max_tokens=6, temperature=0)
    tiny = openai_client.completions.create(
        model="tiny-chat", prompt="ab", max_tokens=6, temperature=5e-324, seed=3
    )
    assert tiny.choices[0].text == greedy.choices[0].text
    with pytest.raises(openai.BadRequestError):  # and serving went on for bad input after it
        openai_client.completions.create(model="tiny-chat", prompt="a", max_tokens=0)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", {"model": "tiny-chat", "prompt": [5, 6], "max_tokens": 50, "ignore_eos": True}),
        ("/rpc", {"jsonrpc": "2.0", "id": 1, "method": "generate", "params": {"prompt_token_ids": [5, 6], "max_tokens": 50, "ignore_eos": True}}),
    ],
)
def test_a_request_whose_client_hangs_up_is_aborted(srv, path, body):
    """A whole-answer request (not streamed) whose client closes the connection is aborted,
    not generated on to max_tokens for nobody; serving goes on."""
    import socket

    engine = srv.frontend.engine
    steps: list[int] = []

    def slow(_eng: Any) -> None:  # ~30 ms a step: the request outlives the connection
        steps.append(1)
        time.sleep(0.03)

    engine.step_hooks.append(slow)
    try:
        host, port = srv.url.split("//")[1].split(":")
        raw = json.dumps(body).encode()
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(
                f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(raw)}\r\n\r\n".encode() + raw
            )
            deadline = time.monotonic() + 30
            while not steps and time.monotonic() < deadline:
                time.sleep(0.01)
            assert steps, "the request never started"
        deadline = time.monotonic() + 30
        while engine.has_unfinished() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not engine.has_unfinished()
        assert len(steps) < 50  # aborted: fewer steps than its 50 tokens need
    finally:
        engine.step_hooks.remove(slow)
    assert all(st.pages.num_used == 0 for st in engine.executor.stages)
    assert generate_ids(srv, [17], max_tokens=3)["finish_reason"] == "length"


def test_a_request_that_fails_in_the_engine_is_a_server_error(srv, monkeypatch):
    """finish_reason "error" (a fault of the server, here a forced sampling failure) is an
    HTTP 500 / JSON-RPC internal error with the reason, in a stream too, not a normal answer."""
    from pipelive_jax.serving import engine as engine_mod

    def failing(logits, params, rng):
        raise FloatingPointError("probabilities contain NaN")

    monkeypatch.setattr(engine_mod, "sample_token", failing)
    body = {"model": "tiny-chat", "prompt": [5, 6], "max_tokens": 4, "temperature": 1.0}
    headers = {"Content-Type": "application/json"}
    status, _, raw = http(srv.url + "/v1/completions", json.dumps(body).encode(), headers)
    err = json.loads(raw)["error"]
    assert status == 500 and err["code"] == "generation_failed", err
    assert "sampling failed: FloatingPointError" in err["message"]
    status, _, raw = http(
        srv.url + "/v1/completions", json.dumps({**body, "stream": True}).encode(), headers
    )
    events = [line for line in raw.decode().splitlines() if line.startswith("data: ")]
    assert status == 200 and "generation_failed" in events[-1], events
    err = error(srv, "generate", {"prompt_token_ids": [5, 6], "max_tokens": 4, "temperature": 1.0})
    assert err["code"] == -32603 and "sampling failed" in err["message"]
    monkeypatch.undo()
    assert generate_ids(srv, [17], max_tokens=3)["finish_reason"] == "length"
    assert all(st.pages.num_used == 0 for st in srv.frontend.engine.executor.stages)


def test_health_is_503_while_engine_steps_fail_and_ok_once_they_run(srv):
    engine = srv.frontend.engine

    def broken(_eng: Any) -> None:
        raise RuntimeError("device lost")

    def failing_request(ids: list[int]) -> str:
        """Adds a request with `broken` in the loop; returns once 3 steps in a row failed."""
        engine.step_hooks.append(broken)
        rid = engine.add_request(ids, SamplingParams(max_tokens=3, ignore_eos=True))
        deadline = time.monotonic() + 30
        while engine.loop_errors_in_a_row < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        return rid

    try:
        rid = failing_request([9, 10])
        status, _, raw = http(srv.url + "/health")
        doc = json.loads(raw)
        assert status == 503 and doc["status"] == "engine steps failing", doc
        assert doc["last_error"] == "RuntimeError: device lost"
        assert result(srv, "status")["loop_errors_in_a_row"] >= 3
    finally:
        engine.step_hooks.remove(broken)
    deadline = time.monotonic() + 30
    while not engine.requests[rid].finished and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.requests[rid].finish_reason == "length"  # the request survived the failures
    status, _, raw = http(srv.url + "/health")
    assert status == 200 and json.loads(raw)["status"] == "ok"

    # Failing steps whose request then goes (aborted): nothing is failing any more.
    try:
        rid = failing_request([9, 11])
        assert http(srv.url + "/health")[0] == 503
        engine.abort(rid)
        deadline = time.monotonic() + 30
        while engine.loop_errors_in_a_row and time.monotonic() < deadline:
            time.sleep(0.02)
        assert http(srv.url + "/health")[0] == 200
    finally:
        engine.step_hooks.remove(broken)


def test_logprobs_in_completions_chat_streams_and_rpc(srv, openai_client):
    """The same greedy request's log-probabilities, as each API shapes them: RPC (ids), the
    completions object, the chat object, and the streams of both (concatenated)."""
    import openai

    ids = [7, 8, 9]
    r = result(srv, "generate", {"prompt_token_ids": ids, "max_tokens": 5, "ignore_eos": True, "logprobs": 2})
    assert len(r["logprobs"]) == 5 and [t["token_id"] for t in r["logprobs"]] == r["token_ids"]
    assert all(t["top"][0][0] == t["token_id"] and len(t["top"]) == 2 for t in r["logprobs"])
    want = [t["logprob"] for t in r["logprobs"]]
    assert all(v <= 0 for v in want)
    assert "logprobs" not in result(srv, "generate", {"prompt_token_ids": ids, "max_tokens": 2})

    common = dict(model="tiny-chat", prompt=ids, max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    c = openai_client.completions.create(logprobs=2, **common)
    lp = c.choices[0].logprobs
    np.testing.assert_allclose(lp.token_logprobs, want, rtol=0, atol=1e-6)
    assert len(lp.tokens) == 5 and all(len(d) <= 3 for d in lp.top_logprobs)
    assert all(tok in d for tok, d in zip(lp.tokens, lp.top_logprobs, strict=True))  # + the token
    # Pieces decode one token each (a lone byte of a multi-byte character reads U+FFFD).
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]
    chunks = [
        ch.choices[0].logprobs
        for ch in openai_client.completions.create(logprobs=2, stream=True, **common)
        if ch.choices and ch.choices[0].logprobs
    ]
    streamed = [v for c_ in chunks for v in c_.token_logprobs]
    np.testing.assert_allclose(streamed, want, rtol=0, atol=1e-6)
    assert [o for c_ in chunks for o in c_.text_offset] == lp.text_offset  # offsets go on
    off = openai_client.completions.create(**{**common, "extra_body": {"ignore_eos": True, "logprobs": False}})
    assert off.choices[0].logprobs is None  # false is "off", as before
    assert openai_client.completions.create(**common).choices[0].logprobs is None

    msgs = [{"role": "user", "content": "hi"}]
    chat = dict(model="tiny-chat", messages=msgs, max_tokens=4, temperature=0)
    one = openai_client.chat.completions.create(logprobs=True, top_logprobs=3, **chat).choices[0]
    content = one.logprobs.content
    assert len(content) == 4
    assert all(len(t.top_logprobs) == 3 and t.top_logprobs[0].logprob == t.logprob for t in content)
    assert all(bytes(t.bytes).decode() == t.token for t in content)
    streamed = [
        t.logprob for ch in openai_client.chat.completions.create(logprobs=True, top_logprobs=3, stream=True, **chat)
        if ch.choices and ch.choices[0].logprobs for t in ch.choices[0].logprobs.content
    ]
    np.testing.assert_allclose(streamed, [t.logprob for t in content], rtol=0, atol=1e-6)
    for bad in ({"top_logprobs": 2}, {"logprobs": True, "top_logprobs": 21}):
        with pytest.raises(openai.BadRequestError) as e:
            openai_client.chat.completions.create(**chat, **bad)
        assert e.value.param == "top_logprobs", e.value.body
    with pytest.raises(openai.BadRequestError):
        openai_client.completions.create(**{**common, "extra_body": {"logprobs": 21}})


def test_penalties_reach_the_engine(srv, openai_client):
    """The penalty fields are taken (OpenAI's two and vLLM's repetition_penalty) and change the
    greedy tokens the way the engine's own penalties do (checked against a reference there)."""
    ids = [7, 7, 8, 7]
    plain = result(srv, "generate", {"prompt_token_ids": ids, "max_tokens": 8, "ignore_eos": True})
    strong = {"repetition_penalty": 3.0, "frequency_penalty": 2.0, "presence_penalty": 2.0}
    rpc_out = result(srv, "generate", {"prompt_token_ids": ids, "max_tokens": 8, "ignore_eos": True, **strong})
    c = openai_client.completions.create(
        model="tiny-chat", prompt=ids, max_tokens=8, temperature=0,
        presence_penalty=2.0, frequency_penalty=2.0,
        extra_body={"ignore_eos": True, "repetition_penalty": 3.0},
    )  # fmt: skip
    assert c.choices[0].token_ids == rpc_out["token_ids"] != plain["token_ids"]
    assert error(srv, "generate", {"prompt_token_ids": ids, "repetition_penalty": 0})["code"] == -32602


def test_logprob_deltas_send_each_token_once():
    def out(lps: list[TokenLogprob], new: list[int]) -> RequestOutput:
        return RequestOutput("r", [1], [t.token_id for t in lps], "", False, None, RequestMetrics(0.0), new, None, lps)

    a, b = TokenLogprob(5, -0.1, []), TokenLogprob(6, -0.2, [])
    d = LogprobDeltas()
    assert d.take(out([a], [5])) == [a]
    assert d.take(out([a, b], [6])) == [b]
    assert d.take(out([a, b], [6])) is None  # an abort's final output: nothing new
    assert LogprobDeltas().take(RequestOutput("r", [1], [], "", False, None, RequestMetrics(0.0))) is None


def test_text_deltas_hold_back_what_may_change():
    d = TextDeltas(stop=["STOP"])
    assert d.delta("ab", False) == ""  # the last 3 characters may start "STOP"
    assert d.delta("abcdef", False) == "abc"
    assert d.delta("abcdef\ufffd", False) == ""  # an incomplete UTF-8 sequence
    assert d.delta("abcdefg€xyz", False) == "defg€"
    assert d.delta("abcdefg€xyz", True) == "xyz"


# ------------------------------------------------------------------ metrics


def test_prometheus_metrics_parse(srv):
    from prometheus_client.parser import text_string_to_metric_families

    def scrape() -> dict[str, Any]:
        status, headers, raw = http(srv.url + "/metrics")
        assert status == 200 and headers["Content-Type"].startswith("text/plain")
        return {f.name: f for f in text_string_to_metric_families(raw.decode())}

    def totals(family: Any, label: str) -> dict[str, float]:
        return {s.labels[label]: s.value for s in family.samples if s.name.endswith("_total")}

    generate_ids(srv, [31], max_tokens=3)
    post_rpc(srv, b"{")
    families = scrape()
    assert "length" in totals(families["pipelive_requests"], "finish_reason")
    ttft = {s.name: s.value for s in families["pipelive_time_to_first_token_seconds"].samples}
    assert ttft["pipelive_time_to_first_token_seconds_count"] > 0
    assert families["pipelive_time_per_output_token_seconds"].type == "histogram"
    stages = result(srv, "status")["stages"]
    kv = families["pipelive_kv_cache_utilization"].samples
    assert sorted(s.labels["device"] for s in kv) == sorted(str(s["device"]) for s in stages)
    done = result(srv, "metrics")["reconfigurations"]
    outcomes = totals(families["pipelive_reconfigurations"], "outcome")
    assert outcomes == {k: float(done[k]) for k in ("ok", "aborted") if done[k]}
    pause = {s.name: s.value for s in families["pipelive_reconfiguration_pause_seconds"].samples}
    assert pause["pipelive_reconfiguration_pause_seconds_count"] == done["ok"]
    assert totals(families["pipelive_rpc_errors"], "code")["-32700"] >= 1


# ------------------------------------------------------------------ SmolLM2


@pytest.mark.smollm2
def test_smollm2_chat_answers_paris(smollm2):
    openai = pytest.importorskip("openai")
    engine = Engine(smollm2, None, max_model_len=128, num_pages=16, max_num_seqs=4)
    with BackgroundServer(create_app(engine, token=TOKEN)) as server:
        client = openai.OpenAI(
            base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300
        )
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        chat = client.chat.completions.create(
            model="smollm2-135m", messages=messages, max_tokens=12, temperature=0
        )
        assert "Paris" in chat.choices[0].message.content
        streamed = client.chat.completions.create(
            model="smollm2-135m", messages=messages, max_tokens=12, temperature=0, stream=True
        )
        text = "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices)
        assert text == chat.choices[0].message.content


# ------------------------------------------------------------------ the command line


def _cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipelive_jax.cli_server", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


SERVE_CONFIG = """
[model]
name = "tiny-random"
[plan]
stages = [3, 3]
devices = 2
[kv]
num_pages = 16
[scheduler]
max_num_seqs = 4
max_model_len = 64
[workload]  # a server does not use it; configs/ files all have one
kind = "poisson"
num_requests = 1
"""


def test_serve_settings_from_a_config_and_flags(tmp_path):
    from pipelive_jax.cli_server import register, serve_settings

    config = tmp_path / "serve.toml"
    config.write_text(SERVE_CONFIG)
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    s = serve_settings(parser.parse_args(["serve", "--config", str(config)]))
    assert (s.model, s.plan, s.devices) == ("tiny-random", [3, 3], 2)
    assert s.engine_options["num_pages"] == 16 and s.engine_options["max_model_len"] == 64
    s = serve_settings(
        parser.parse_args(
            ["serve", "--config", str(config), "--plan", "2,4", "--max-model-len", "32"]
        )
    )
    assert (s.plan, s.devices, s.engine_options["max_model_len"]) == ([2, 4], 2, 32)
    s = serve_settings(parser.parse_args(["serve", "--plan", "3,3"]))
    assert (s.model, s.devices, s.engine_options) == ("smollm2-135m", 8, {})


def test_cli_serve_rpc_and_sigterm(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PIPELIVE_RPC_TOKEN")}
    token_file = tmp_path / "tok" / "rpc_token"
    config = tmp_path / "serve.toml"
    config.write_text(SERVE_CONFIG)
    serve = ["serve", "--config", str(config), "--port", "0", "--token-file", str(token_file),
             "--log-level", "info"]  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipelive_jax.cli_server", *serve],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        lines: list[str] = []
        assert proc.stdout is not None
        while not any("listening on" in ln for ln in lines):
            line = proc.stdout.readline()
            assert line, "server exited:\n" + "".join(lines)
            lines.append(line)
        url = lines[-1].rsplit(" ", 1)[1].strip()
        assert stat.S_IMODE(os.stat(token_file).st_mode) == 0o600
        assert f"RPC token written to {token_file}" in "".join(lines)

        r = _cli("rpc", "status", "--url", url, env=env)
        assert r.returncode == 0 and json.loads(r.stdout)["plan"]["stages"][0]["layers"] == [0, 3]
        bad_env = {**env, "PIPELIVE_RPC_TOKEN": "wrong"}
        r = _cli("rpc", "reconfigure", "--params", '{"plan": [6]}', "--url", url, env=bad_env)
        assert r.returncode == 1 and "error -32003" in r.stderr and "Traceback" not in r.stderr
        r = _cli(
            "rpc",
            "reconfigure",
            "--params",
            '{"plan": [2, 5]}',
            "--url",
            url,
            "--token-file",
            str(token_file),
            env=env,
        )
        assert (
            r.returncode == 1 and "error -32602" in r.stderr
        )  # the token passed; the plan did not
        r = _cli("rpc", "status", "--params", "{oops", "--url", url, env=env)
        assert r.returncode == 1 and "--params is not valid JSON" in r.stderr

        answers: list[Any] = []

        def in_flight() -> None:
            body = {
                "jsonrpc": "2.0",
                "method": "generate",
                "id": 1,
                "params": {"prompt_token_ids": [5], "max_tokens": 40, "ignore_eos": True},
            }
            answers.append(json.loads(http(url + "/rpc", json.dumps(body).encode())[2]))

        t = threading.Thread(target=in_flight)
        t.start()
        deadline = time.monotonic() + 60
        while (
            json.loads(_cli("rpc", "status", "--url", url, env=env).stdout)["server"]["in_flight"]
            == 0
        ):
            assert time.monotonic() < deadline
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        t.join(timeout=60)
        rest = proc.stdout.read()
        assert "stopped" in rest and "Traceback" not in rest
        # --log-level info: each compile is logged with its shape, layers and time.
        log = "".join(lines) + rest
        assert "INFO pipelive.compile: compiled BatchShape(" in log and "layers [0, 3)" in log
        assert answers and answers[0]["result"]["finish_reason"] in ("length", "abort")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    r = _cli("rpc", "status", "--url", url, env=env)
    assert r.returncode == 1 and "cannot reach" in r.stderr and "Traceback" not in r.stderr

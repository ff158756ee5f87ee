"""The `pipelive` command line, end to end in a subprocess (as a user runs it)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pipelive_jax.cli import _devices_needed, _read_plan
from pipelive_jax.errors import PipeliveError


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the CLI sets its own
    return subprocess.run(
        [sys.executable, "-m", "pipelive_jax.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


@pytest.mark.smollm2
def test_generate_chat_answers_paris_over_two_stages():
    # Greedy chat answer on the real weights, split over two stages the CLI gives devices for.
    r = run_cli("generate", "--chat", "--max-tokens", "12", "--plan", "10,20", "What is the capital of France?")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout


def test_unknown_model_is_a_clear_error_not_a_traceback():
    r = run_cli("generate", "--model", "no-such-model", "hi")
    assert r.returncode == 2
    assert "unknown model 'no-such-model'" in r.stderr
    assert "Traceback" not in r.stderr


def test_bad_plan_is_a_clear_error():
    r = run_cli("generate", "--model", "tiny-random", "--plan", "3,4", "hi")
    assert r.returncode == 2
    assert "error:" in r.stderr and "Traceback" not in r.stderr


def test_plan_argument_forms(tmp_path):
    assert _read_plan("10,20") == [10, 20]
    assert _read_plan('{"stages": [{"devices": [2], "layers": [0, 30]}]}')["stages"][0]["devices"] == [2]
    f = tmp_path / "plan.json"
    f.write_text('{"stages": [{"devices": [0], "layers": [0, 10]}, {"devices": [3], "layers": [10, 30]}]}')
    plan = _read_plan(str(f))
    assert _devices_needed(plan) == 4
    assert _devices_needed([5, 5, 5]) == 3
    with pytest.raises(PipeliveError, match="layer counts"):
        _read_plan("ten,twenty")


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("generate", "--max-model-len", "0", "x"), "argument --max-model-len: must be >= 1, got 0"),
        (("serve", "--port", "99999"), "argument --port: must be in 0-65535, got 99999"),
        (("serve", "--dtype", "bogus"), "argument --dtype: invalid choice: 'bogus'"),
        (("serve", "--max-body-bytes", "-1"), "argument --max-body-bytes: must be >= 1, got -1"),
        (("serve", "--request-timeout", "-1"), "argument --request-timeout: must be >= 0"),
        (("serve", "--num-pages", "1"), "argument --num-pages: must be >= 2, got 1"),
        (("rpc", "status", "--timeout", "0"), "argument --timeout: must be > 0"),
        (("plan", "--devices", "0:8GiB", "--granule", "0"), "argument --granule: must be >= 1"),
    ],
)
def test_bad_option_values_are_refused_by_name(args, says):
    r = run_cli(*args, timeout=60)
    assert r.returncode == 2 and says in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_bad_plan_files_urls_devices_and_results_are_clear_errors(tmp_path):
    listed = tmp_path / "list.json"
    listed.write_text("[1]")
    far = '{"stages": [{"devices": [200000], "layers": [0, 6]}]}'
    for args, says in (
        (("generate", "--model", "tiny-random", "--plan", far, "x"), "names device 200000"),
        (("generate", "--model", "tiny-random", "--plan", "nope.json", "x"), "nope.json: no such file"),
        (("serve", "--model", "tiny-random", "--devices", "100000"), "--devices: 100000 host devices; on CPU at most 64"),
        (("rpc", "status", "--url", "notaurl"), "'notaurl' is not an http:// or https:// URL"),
        (("bench", "compare", str(listed), str(listed)), "not the results of `pipelive bench`"),
    ):
        r = run_cli(*args, timeout=60)
        assert r.returncode in (1, 2) and says in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr

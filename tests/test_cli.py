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

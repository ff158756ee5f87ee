"""Reproducible experiments (issue 7): configs, workloads, the planner, `pipelive bench`.

- Config validation: every error path names the file, the line and the key (unknown keys with a
  suggestion, bad types, bad values, missing keys, bad plans, TOML syntax); the shipped configs
  all load and map onto `EngineConfig`.
- Workloads: seeded rates, burstiness and length means within tolerance; the same seed gives the
  same requests; pattern-shift phases and Azure-style traces.
- Planner: the dynamic program against exhaustive search on small cases, known splits, memory
  limits, and infeasible budgets.
- End to end: `pipelive bench configs/tiny-smoke.toml` in a subprocess (< 1 minute) writes valid
  JSON and PNGs, and `bench compare` shows two result folders side by side.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from pipelive_jax.bench.workload import (
    WorkloadRequest,
    gamma_arrivals,
    make_workload,
    poisson_arrivals,
    read_trace,
    sample_lengths,
)
from pipelive_jax.config import LengthSpec, load_config, parse_bytes
from pipelive_jax.errors import ConfigError, PlanError
from pipelive_jax.planner import (
    MODEL_SHAPES,
    DeviceSpec,
    head_cost_for,
    parse_devices,
    propose_split,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.toml")))

GOOD = """\
[model]
name = "tiny-random"

[plan]
stages = [3, 3]

[kv]
page_size = 16
num_pages = 64

[scheduler]
max_num_seqs = 4
max_model_len = 64

[workload]
kind = "poisson"
rate = 4.0
num_requests = 10
input = { dist = "uniform", low = 4, high = 20 }
output = 8

[[reconfig]]
at_s = 1.0
plan = [2, 4]

[[reconfig]]
after_requests = 5
plan = [{ devices = [0], layers = [0, 3] }, { devices = [2], layers = [3, 6] }]
mode = "stop_and_copy"

[bench]
seed = 3
"""


def write(tmp_path, text: str, name: str = "c.toml") -> str:
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def line_of(text: str, needle: str, nth: int = 0) -> int:
    """1-based line of the nth line containing `needle`."""
    hits = [i for i, line in enumerate(text.splitlines(), start=1) if needle in line]
    return hits[nth]


def expect_error(tmp_path, text: str, *, line: int | None, match: tuple[str, ...]) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as ei:
        load_config(path)
    msg = str(ei.value)
    where = f"{path}:{line}:" if line is not None else f"{path}:"
    assert msg.startswith(where), f"expected {where!r} at the start of {msg!r}"
    for m in match:
        assert m in msg, f"{m!r} not in {msg!r}"
    return msg


# ------------------------------------------------------------------ configs


def test_good_config_parses_and_maps_to_engine_options(tmp_path):
    path = write(tmp_path, GOOD)
    cfg = load_config(path)
    assert cfg.name == "c"
    assert cfg.sha256 == hashlib.sha256(GOOD.encode()).hexdigest()
    assert cfg.num_devices == 3  # the second reconfiguration uses device 2
    assert cfg.workload.input == LengthSpec("uniform", low=4, high=20)
    assert cfg.workload.output == LengthSpec("fixed", value=8)
    assert [e.mode for e in cfg.reconfig] == ["live", "stop_and_copy"]
    assert cfg.reconfig[1].after_requests == 5 and cfg.reconfig[1].at_s is None
    opts = cfg.engine_options()
    assert opts["num_pages"] == 64 and opts["max_model_len"] == 64 and opts["max_num_seqs"] == 4
    assert opts["background_compile"] is False  # off unless [scheduler] asks
    from pipelive_jax.serving.engine import EngineConfig

    EngineConfig(**opts)  # every key is an engine option
    json.dumps(cfg.to_dict())


@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.basename(p) for p in CONFIGS])
def test_shipped_configs_load(path):
    from pipelive_jax.serving.engine import EngineConfig

    cfg = load_config(path)
    EngineConfig(**cfg.engine_options())
    assert cfg.bench.max_duration_s > 0


def test_shipped_config_set_is_complete():
    names = {os.path.basename(p) for p in CONFIGS}
    for n in (
        "smollm2-pattern-shift",
        "smollm2-prefill-optimal",
        "smollm2-decode-optimal",
        "smollm2-balanced",
        "smollm2-no-kv-resize",
        "smollm2-stop-and-copy",
        "smollm2-restart",
        "smollm2-scale-out",
        "smollm2-heterogeneous",
        "tiny-smoke",
    ):
        assert f"{n}.toml" in names


def test_unknown_key_names_file_line_and_suggests(tmp_path):
    text = GOOD.replace("rate = 4.0", "rate = 4.0\nrat = 2.0")
    expect_error(
        tmp_path,
        text,
        line=line_of(text, "rat = 2.0"),
        match=("workload.rat", "unknown key 'rat' in [workload]", "did you mean 'rate'"),
    )


def test_unknown_top_level_table(tmp_path):
    text = GOOD + "\n[sheduler]\nmax_num_seqs = 2\n"
    expect_error(
        tmp_path, text, line=line_of(text, "[sheduler]"), match=("did you mean 'scheduler'",)
    )


def test_unknown_key_in_second_array_table(tmp_path):
    text = GOOD.replace('mode = "stop_and_copy"', 'mode = "stop_and_copy"\npause_ms = 3')
    expect_error(
        tmp_path,
        text,
        line=line_of(text, "pause_ms = 3"),
        match=("reconfig[1].pause_ms", "did you mean 'pause_budget_ms'"),
    )


def test_unknown_key_inside_inline_table(tmp_path):
    text = GOOD.replace("high = 20 }", "hihg = 20 }")
    expect_error(
        tmp_path, text, line=line_of(text, "hihg"), match=("workload.input.hihg", "'high'")
    )


def test_unknown_key_inside_multiline_phase_array(tmp_path):
    text = GOOD.replace(
        'kind = "poisson"\nrate = 4.0\nnum_requests = 10',
        'kind = "pattern_shift"\nphases = [\n  { kind = "prefill", duration_s = 2 },\n'
        '  { kind = "decode", duration_s = 2, rte = 1 },\n]',
    )
    expect_error(
        tmp_path,
        text,
        line=line_of(text, "rte = 1"),
        match=("workload.phases[1].rte", "did you mean 'rate'"),
    )


@pytest.mark.parametrize(
    "old,new,key,what",
    [
        ("rate = 4.0", 'rate = "fast"', "workload.rate", "must be a number, got str 'fast'"),
        ("num_requests = 10", "num_requests = 2.5", "workload.num_requests", "must be an integer"),
        ("max_num_seqs = 4", "max_num_seqs = true", "scheduler.max_num_seqs", "must be an integer"),
        ("page_size = 16", 'page_size = "16"', "kv.page_size", "must be an integer"),
        ('name = "tiny-random"', "name = 7", "model.name", "must be a string"),
        ("at_s = 1.0", 'at_s = "soon"', "reconfig[0].at_s", "must be a number"),
    ],
)
def test_bad_types(tmp_path, old, new, key, what):
    text = GOOD.replace(old, new)
    expect_error(tmp_path, text, line=line_of(text, new), match=(key, what))


@pytest.mark.parametrize(
    "old,new,key,what",
    [
        ("rate = 4.0", "rate = -1.0", "workload.rate", "must be > 0"),
        ("page_size = 16", "page_size = 24", "kv.page_size", "power of two"),
        ('mode = "stop_and_copy"', 'mode = "teleport"', "reconfig[1].mode", "must be one of"),
        ('kind = "poisson"', 'kind = "poison"', "workload.kind", "did you mean 'poisson'"),
        ("num_pages = 64", 'device_memory = "lots"', "kv.device_memory", "byte count"),
        ("seed = 3", "seed = -3", "bench.seed", "must be >= 0"),
        ("high = 20", "high = 2", "workload.input.high", "must be >= low"),
        ("plan = [2, 4]", "plan = [2, 3]", "reconfig[0].plan", "the model has 6 layers"),
        ("stages = [3, 3]", "stages = [3, 0, 3]", "plan.stages", "stage 1 is empty"),
    ],
)
def test_bad_values(tmp_path, old, new, key, what):
    text = GOOD.replace(old, new)
    assert text != GOOD
    expect_error(tmp_path, text, line=line_of(text, new.split(" = ")[0] + " = "), match=(key, what))


def test_budget_list_must_cover_every_device(tmp_path):
    text = GOOD.replace("num_pages = 64", 'device_memory = ["64MiB", "32MiB"]')
    expect_error(
        tmp_path,
        text,
        line=line_of(text, "device_memory"),
        match=("kv.device_memory", "2 budgets", "3 devices"),
    )


@pytest.mark.parametrize(
    "edit,line_needle,what",
    [
        (
            lambda t: t.replace('kind = "poisson"\n', ""),
            "[workload]",
            "missing required key 'kind'",
        ),
        (lambda t: t.replace("plan = [2, 4]\n", ""), "[[reconfig]]", "missing required key 'plan'"),
        (lambda t: t.replace("at_s = 1.0\n", ""), "[[reconfig]]", "give exactly one of at_s"),
        (lambda t: t.replace("num_requests = 10\n", ""), "[workload]", "needs num_requests"),
        (lambda t: t.replace("stages = [3, 3]\n", ""), "[plan]", "missing required key 'stages'"),
    ],
)
def test_missing_required(tmp_path, edit, line_needle, what):
    text = edit(GOOD)
    expect_error(tmp_path, text, line=line_of(text, line_needle), match=(what,))


def test_missing_tables_and_syntax_errors(tmp_path):
    no_plan = GOOD.replace("[plan]\nstages = [3, 3]\n", "")
    expect_error(tmp_path, no_plan, line=None, match=("missing required table [plan]",))
    broken = GOOD.replace("rate = 4.0", "rate = = 4.0")
    expect_error(tmp_path, broken, line=line_of(broken, "rate = ="), match=("not valid TOML",))
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.toml")


def test_config_without_workload_serves_but_does_not_bench(tmp_path):
    text = GOOD.replace('[workload]\nkind = "poisson"\nrate = 4.0\nnum_requests = 10\n', "")
    text = text.replace('input = { dist = "uniform", low = 4, high = 20 }\noutput = 8\n', "")
    path = write(tmp_path, text)
    assert load_config(path).workload is None  # a config for `pipelive serve`
    r = run_cli("bench", path)
    assert r.returncode == 2 and "needs a [workload] table" in r.stderr


def test_trace_path_is_checked_relative_to_the_config(tmp_path):
    text = GOOD.replace('kind = "poisson"', 'kind = "trace"\ntrace = "missing.csv"')
    expect_error(tmp_path, text, line=line_of(text, "trace = "), match=("does not exist",))


def test_parse_bytes():
    assert parse_bytes("640MiB") == 640 * 2**20
    assert parse_bytes("4.8GiB") == int(4.8 * 2**30)
    assert parse_bytes("1e9") == 10**9
    assert parse_bytes(1234) == 1234
    for bad in ("lots", "-1GiB", 0, True, "3 parsecs"):
        with pytest.raises(ValueError):
            parse_bytes(bad)


# ------------------------------------------------------------------ workloads


def test_poisson_and_gamma_rates_and_burstiness():
    rng = np.random.default_rng(0)
    t = poisson_arrivals(rng, rate=5.0, num=8000)
    gaps = np.diff(np.concatenate([[0.0], t]))
    assert abs(gaps.mean() - 0.2) / 0.2 < 0.04
    assert abs(gaps.std() / gaps.mean() - 1.0) < 0.05  # exponential: CV 1
    g = np.diff(np.concatenate([[0.0], gamma_arrivals(rng, rate=5.0, burstiness=0.25, num=8000)]))
    assert abs(g.mean() - 0.2) / 0.2 < 0.06
    assert abs(g.std() / g.mean() - 2.0) < 0.15  # CV = 1/sqrt(k)
    d = poisson_arrivals(rng, rate=10.0, duration=100.0)
    assert d.max() < 100.0 and abs(len(d) - 1000) < 120


def test_length_distributions():
    rng = np.random.default_rng(1)
    ln = sample_lengths(rng, LengthSpec("lognormal"), 40000)  # ShareGPT-like input default
    assert abs(ln.mean() - 161.31) / 161.31 < 0.05
    ln2 = sample_lengths(rng, LengthSpec("lognormal", mean=50.0, sigma=0.5, max=400), 40000)
    assert abs(ln2.mean() - 50.0) / 50.0 < 0.03 and ln2.max() <= 400
    u = sample_lengths(rng, LengthSpec("uniform", low=10, high=20), 20000)
    assert u.min() == 10 and u.max() == 20 and abs(u.mean() - 15) < 0.2
    f = sample_lengths(rng, LengthSpec("fixed", value=512), 5, scale=0.1875)
    assert f.tolist() == [96] * 5


def test_workload_is_reproducible_and_vocab_bounded(tmp_path):
    cfg = load_config(write(tmp_path, GOOD.replace("num_requests = 10", "num_requests = 200")))
    a = make_workload(cfg.workload, seed=5, vocab_size=512)
    b = make_workload(cfg.workload, seed=5, vocab_size=512)
    c = make_workload(cfg.workload, seed=6, vocab_size=512)
    assert a == b
    assert a != c
    assert all(isinstance(r, WorkloadRequest) for r in a)
    ids = np.concatenate([r.prompt_token_ids for r in a])
    assert ids.min() >= 3 and ids.max() < 512
    assert [r.arrival_s for r in a] == sorted(r.arrival_s for r in a)
    ins = np.array([len(r.prompt_token_ids) for r in a])
    assert 4 <= ins.min() and ins.max() <= 20 and abs(ins.mean() - 12) < 1.0
    assert all(r.max_tokens == 8 for r in a)
    span = a[-1].arrival_s
    assert abs(199 / span - 4.0) / 4.0 < 0.2
    clipped = make_workload(cfg.workload, seed=5, vocab_size=512, max_model_len=16)
    assert all(len(r.prompt_token_ids) + r.max_tokens <= 16 for r in clipped)


def test_pattern_shift_phases():
    cfg = load_config(os.path.join(ROOT, "configs", "smollm2-pattern-shift.toml"))
    w = cfg.workload
    reqs = make_workload(w, seed=0, vocab_size=49152)
    starts = np.cumsum([0.0] + [p.duration_s for p in w.phases])
    for r in reqs:
        ph = w.phases[r.phase]
        assert starts[r.phase] <= r.arrival_s < starts[r.phase + 1]
        want = (64, 2) if ph.kind == "prefill" else (16, 64)  # 512/16 and 128/512 x 0.125
        assert (len(r.prompt_token_ids), r.max_tokens) == want
    assert {r.phase for r in reqs} == set(range(len(w.phases)))
    assert make_workload(w, seed=0, vocab_size=49152) == reqs


def test_trace_azure_columns(tmp_path):
    csv = tmp_path / "azure.csv"
    csv.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:15:47.6805900,100,20\n"
        "2023-11-16 18:15:46.6805900,374,44\n"
        "2023-11-16 18:15:49.1805900,12,7\n"
    )
    t, ins, outs = read_trace(str(csv))
    assert np.allclose(t, [0.0, 1.0, 2.5])
    assert ins.tolist() == [374, 100, 12] and outs.tolist() == [44, 20, 7]
    text = GOOD.replace('kind = "poisson"', 'kind = "trace"\ntrace = "azure.csv"\ntime_scale = 2.0')
    text = text.replace("num_requests = 10\n", "").replace(
        'input = { dist = "uniform", low = 4, high = 20 }\noutput = 8\n', "scale = 0.5\n"
    )
    cfg = load_config(write(tmp_path, text))
    reqs = make_workload(cfg.workload, seed=0, vocab_size=512)
    assert [r.arrival_s for r in reqs] == [0.0, 0.5, 1.25]
    assert [len(r.prompt_token_ids) for r in reqs] == [187, 50, 6]
    assert [r.max_tokens for r in reqs] == [22, 10, 4]
    plain = tmp_path / "plain.csv"
    plain.write_text("timestamp,input_tokens,output_tokens\n0.5,3,4\n")
    assert read_trace(str(plain))[1].tolist() == [3]
    bad = tmp_path / "bad.csv"
    bad.write_text("when,prompt,answer\n1,2,3\n")
    with pytest.raises(ConfigError, match="no timestamp column"):
        read_trace(str(bad))


# ------------------------------------------------------------------ planner


def brute_force(model, devices, head_cost, page_size, min_kv_pages):
    """The best bottleneck over every contiguous split (exhaustive), or None if none fits."""
    from pipelive_jax.memory import DeviceBudget, max_pages, stage_extra_bytes
    from pipelive_jax.plan import PipelinePlan

    n, s = model.num_layers, len(devices)
    best = None
    for cuts in itertools.combinations(range(1, n), s - 1):
        counts = np.diff([0, *cuts, n]).tolist()
        plan = PipelinePlan.from_counts(counts)
        ok = True
        times = []
        for k, c in enumerate(counts):
            b = DeviceBudget(k, devices[k].memory_bytes, 0.9)
            if (
                max_pages(b, model, c, page_size, stage_extra_bytes(model, plan, k))
                < min_kv_pages + 1
            ):
                ok = False
                break
            times.append((c + (head_cost if k == s - 1 else 0)) / devices[k].speed)
        if ok and (best is None or max(times) < best):
            best = max(times)
    return best


def test_planner_matches_exhaustive_search():
    rng = np.random.default_rng(0)
    model = MODEL_SHAPES["smollm2-135m"]
    for _ in range(25):
        s = int(rng.integers(1, 5))
        devices = [
            DeviceSpec(
                i, int(rng.integers(200, 900)) * 2**20, float(rng.choice([0.5, 0.6, 1.0, 1.5]))
            )
            for i in range(s)
        ]
        head = float(rng.choice([0.0, 2.0, 8.0]))
        want = brute_force(model, devices, head, 16, 8)
        if want is None:
            with pytest.raises(PlanError, match="no split fits"):
                propose_split(model, devices, head_cost=head, min_kv_pages=8)
            continue
        got = propose_split(model, devices, head_cost=head, min_kv_pages=8)
        assert got.bottleneck == pytest.approx(want)
        assert sum(got.counts) == 30 and min(got.counts) >= 1
        assert min(got.kv_pages) >= 9


def test_planner_known_splits():
    m = MODEL_SHAPES["smollm2-135m"]
    big = [DeviceSpec(0, 2**31), DeviceSpec(1, 2**31)]
    assert propose_split(m, big).counts == (15, 15)
    # decode: the LM head costs ~8 layers on the last stage
    assert head_cost_for(m, "decode") == pytest.approx(8.0, abs=0.01)
    assert propose_split(m, big, head_cost=head_cost_for(m, "decode")).counts == (19, 11)
    assert propose_split(m, big, head_cost=head_cost_for(m, "prefill", 96)).counts == (15, 15)
    # a device half as fast gets half the layers
    slow = [DeviceSpec(0, 2**31, 1.0), DeviceSpec(1, 2**31, 0.5)]
    p = propose_split(m, slow)
    assert p.counts == (20, 10) and p.bottleneck == pytest.approx(20.0)
    # a small device takes what fits even if it is fast
    small = [DeviceSpec(0, 2**31, 1.0), DeviceSpec(1, 300 * 2**20, 4.0)]
    p = propose_split(m, small, min_kv_pages=16)
    assert p.counts[1] < 15 and p.kv_pages[1] >= 17
    four = [DeviceSpec(i, 2**31) for i in range(4)]
    assert sorted(propose_split(m, four).counts) == [7, 7, 8, 8]
    assert propose_split(MODEL_SHAPES["tiny-random"], [DeviceSpec(5, 2**24)]).plan.devices == (5,)


def test_planner_infeasible_and_bad_device_specs():
    m = MODEL_SHAPES["smollm2-135m"]
    with pytest.raises(PlanError, match="device 1 .* cannot hold even one layer"):
        propose_split(m, [DeviceSpec(0, 2**31), DeviceSpec(1, 50 * 2**20)])
    with pytest.raises(PlanError, match="at most .* of the model's 30 layers"):
        propose_split(m, [DeviceSpec(0, 300 * 2**20), DeviceSpec(1, 300 * 2**20)], min_kv_pages=64)
    with pytest.raises(PlanError, match="every stage needs at least one layer"):
        propose_split(MODEL_SHAPES["tiny-random"], [DeviceSpec(i, 2**30) for i in range(7)])
    assert parse_devices("0:8GiB:1.0,1:4.8GiB:0.6") == [
        DeviceSpec(0, 8 * 2**30, 1.0),
        DeviceSpec(1, int(4.8 * 2**30), 0.6),
    ]
    for bad in ("0:8GiB:fast", "0", "0:8GiB,0:4GiB", "0:8GiB:-1", ""):
        with pytest.raises(PlanError):
            parse_devices(bad)


# ------------------------------------------------------------------ CLI, end to end


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the CLI sets its own
    return subprocess.run(
        [sys.executable, "-m", "pipelive_jax.cli_bench", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )


def test_plan_command():
    r = run_cli(
        "plan",
        "--model",
        "smollm2-135m",
        "--devices",
        "0:1GiB,1:1GiB",
        "--workload",
        "decode",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["counts"] == [19, 11]
    r = run_cli("plan", "--config", "configs/smollm2-heterogeneous.toml", "--workload", "prefill")
    assert r.returncode == 0, r.stderr
    assert "plan counts" in r.stdout
    r = run_cli("plan", "--devices", "0:10MiB,1:10MiB")
    assert r.returncode == 2 and "no split fits" in r.stderr and "Traceback" not in r.stderr


def test_bench_bad_config_is_a_clear_error(tmp_path):
    path = write(tmp_path, GOOD.replace("rate = 4.0", "rate = 4.0\nrat = 1"))
    r = run_cli("bench", path)
    assert r.returncode == 2
    assert f"{path}:{line_of(GOOD, 'rate = 4.0') + 1}:" in r.stderr and "Traceback" not in r.stderr


PNGS = ("latency_cdf.png", "timeline.png", "reconfig_pause.png")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "tiny-smoke"
    t0 = time.monotonic()
    r = run_cli("bench", "configs/tiny-smoke.toml", "--out", str(out), "--quiet", timeout=90)
    elapsed = time.monotonic() - t0
    assert r.returncode == 0, r.stderr[-3000:]
    return out, elapsed, r


def test_bench_tiny_smoke_end_to_end(smoke_run):
    out, elapsed, r = smoke_run
    assert elapsed < 60, f"tiny-smoke took {elapsed:.0f} s"
    assert r.stdout.strip() == str(out / "results.json")
    res = json.loads((out / "results.json").read_text())
    for key in (
        "mean_ttft_ms",
        "median_ttft_ms",
        "p99_ttft_ms",
        "mean_tpot_ms",
        "p99_tpot_ms",
        "mean_itl_ms",
        "p99_itl_ms",
        "mean_e2e_ms",
        "request_throughput",
        "output_throughput",
        "total_token_throughput",
        "goodput",
        "completed",
        "preemptions",
        "timeline",
        "reconfigurations",
    ):
        assert key in res, key
    assert res["completed"] == res["num_requests"] == 20
    assert res["total_output_tokens"] == sum(res["output_lens"])
    assert res["mean_ttft_ms"] > 0 and res["request_throughput"] > 0
    assert 0 <= res["goodput"] <= res["request_throughput"] + 1e-9
    assert [x["mode"] for x in res["reconfigurations"]] == ["live", "stop_and_copy"]
    assert all(x["ok"] and x["report"]["pause_ms"] > 0 for x in res["reconfigurations"])
    assert [p[1] for p in res["plans"]] == [
        "[0:3)@0 | [3:6)@1",
        "[0:2)@0 | [2:6)@1",
        "[0:3)@0 | [3:6)@1",
    ]
    meta = res["metadata"]
    text = open(os.path.join(ROOT, "configs", "tiny-smoke.toml"), "rb").read()
    assert meta["config_sha256"] == hashlib.sha256(text).hexdigest()
    assert meta["versions"]["jax"] and meta["machine"]["cpu_count"]
    if os.path.isdir(os.path.join(ROOT, ".git")):  # run from a checkout: its commit is recorded
        assert len(meta["git_commit"] or "") == 40, meta["git_commit"]
    assert res["cpu_other_cores"] is not None  # the CPU watch ran
    tl = res["timeline"]
    assert len(tl["t_s"]) == len(tl["output_tokens_per_s"]) == len(tl["waiting"])
    assert sum(tl["output_tokens_per_s"]) * tl["interval_s"] == pytest.approx(
        res["total_output_tokens"]
    )
    for png in PNGS:
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, png


def test_machine_metadata_outside_a_checkout(tmp_path):
    from pipelive_jax.bench.machine import CpuWatch, git_commit, machine_info

    assert git_commit(str(tmp_path)) == {"commit": None, "dirty": None}
    assert machine_info()["cpu_count"] == os.cpu_count()
    with CpuWatch() as w:
        sum(range(200_000))
    assert w.wall > 0


def test_bench_compare_two_runs(smoke_run, tmp_path):
    from pipelive_jax.bench.results import compare

    out, _, _ = smoke_run
    other = tmp_path / "other"
    other.mkdir()
    res = json.loads((out / "results.json").read_text())
    res["name"] = "other-run"
    res["mean_ttft_ms"] = 12345.0
    (other / "results.json").write_text(json.dumps(res))
    md = compare([str(out), str(other)], markdown=True)
    assert "| metric | tiny-smoke | other-run |" in md and "12345" in md
    table = compare([str(out), str(other)])
    assert [c.header for c in table.columns] == ["metric", "tiny-smoke", "other-run"]
    r = run_cli("bench", "compare", str(out), str(other))
    assert r.returncode == 0, r.stderr
    assert "tiny-smoke" in r.stdout and "other-run" in r.stdout
    # The reproduction check: the copy differs only in mean TTFT.
    r = run_cli("bench", "compare", str(out), str(other), "--check", "--tolerance", "0.25")
    assert r.returncode == 1 and "DOES NOT reproduce" in r.stdout
    assert "FAIL mean_ttft_ms" in r.stdout and "ok   completed" in r.stdout
    res["mean_ttft_ms"] = json.loads((out / "results.json").read_text())["mean_ttft_ms"] * 1.2
    (other / "results.json").write_text(json.dumps(res))
    r = run_cli("bench", "compare", str(out), str(other), "--check", "--tolerance", "0.25")
    assert r.returncode == 0 and "reproduces" in r.stdout, r.stdout
    r = run_cli("bench", "compare", str(out), str(tmp_path / "missing"))
    assert r.returncode == 2 and "cannot read results" in r.stderr
    shutil.rmtree(other)


def test_check_reproduction_counts_exact_rates_within_tolerance():
    from pipelive_jax.bench.results import CHECK_EXACT, CHECK_RELATIVE, check_reproduction

    ref = {k: 10 for k in CHECK_EXACT} | {k: 100.0 for k in CHECK_RELATIVE}
    ok, rows = check_reproduction(ref, dict(ref), 0.1)
    assert ok and len(rows) == len(CHECK_EXACT) + len(CHECK_RELATIVE)
    ok, rows = check_reproduction(ref, {**ref, "mean_tpot_ms": 109.0}, 0.1)
    assert ok
    ok, rows = check_reproduction(ref, {**ref, "mean_tpot_ms": 111.0}, 0.1)
    assert not ok and [r["metric"] for r in rows if not r["ok"]] == ["mean_tpot_ms"]
    ok, rows = check_reproduction(ref, {**ref, "completed": 9}, 0.1)
    assert [r["metric"] for r in rows if not r["ok"]] == ["completed"]
    missing = dict(ref)
    del missing["output_throughput"]
    assert not check_reproduction(ref, missing, 0.1)[0]
    with pytest.raises(ValueError, match="tolerance"):
        check_reproduction(ref, ref, -1)

"""Load on `pipelive serve` over loopback: N closed-loop clients, with and without a live
reconfiguration in the middle.

The server runs as users run it (`python -m pipelive_jax.cli_server serve`, its own process, so
client work does not share its interpreter); the clients are aiohttp tasks here, each sending
JSON-RPC `generate` calls one after the other for a bounded time. Three phases:

    warmup     compiles the batch shapes of this workload (results discarded)
    steady     `--duration` seconds on the source plan
    reconfig   `--reconfig-at` seconds in, `reconfigure` to the target plan over RPC; the phase
               runs until the reconfiguration is done plus `--tail` seconds (at least
               `--duration`). Its stats are also split by completion time into before / during
               / after the reconfiguration.

Every request is greedy with `ignore_eos`, so all generate exactly `--max-tokens` tokens.
Writes benchmarks/results/serve_load.json (machine, versions, config, results).

    python benchmarks/serve_load.py                        # SmolLM2-135M, 15,15 -> 10,10,10
    python benchmarks/serve_load.py --model tiny-random    # seconds, for a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import CpuWatch, log, wait_for_quiet, write_results  # noqa: E402

# 20-30 tokens each under SmolLM2's tokenizer: one prefill bucket, few batch shapes to compile.
TEXT_PROMPTS = [
    "Explain in a few sentences why the sky looks blue during the day and red at sunset.",
    "Write a short note to a friend about a trip to the mountains last summer, please.",
    "What are three good habits for writing clear and maintainable Python code in a team?",
    "Describe how a bicycle works, from the pedals to the rear wheel, in simple words.",
    "Give me a simple recipe for a vegetable soup that takes less than thirty minutes.",
    "Summarise the main causes of the French Revolution for a high school student.",
    "List some ways to stay focused while working from home on a long project.",
    "Why do leaves change colour in autumn, and what happens to the chlorophyll?",
]

DEFAULTS = {
    "smollm2-135m": {"plan": "15,15", "target": "10,10,10"},
    "tiny-random": {"plan": "3,3", "target": "2,1,3"},
}


def _proc_cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system) process `pid` has used, from /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "p50": None, "p90": None, "p99": None, "max": None}
    a = np.asarray(values, dtype=np.float64)
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {
        "mean": round(float(a.mean()), 2),
        "p50": round(float(p50), 2),
        "p90": round(float(p90), 2),
        "p99": round(float(p99), 2),
        "max": round(float(a.max()), 2),
    }


def _stats(records: list[dict[str, Any]], t0: float, t1: float) -> dict[str, Any]:
    """Requests that completed in [t0, t1)."""
    window = [r for r in records if t0 <= r["t_end"] < t1]
    ok = [r for r in window if r["ok"]]
    errors: dict[str, int] = {}
    for r in window:
        if not r["ok"]:
            errors[r["error"]] = errors.get(r["error"], 0) + 1
    span = max(t1 - t0, 1e-9)
    return {
        "duration_s": round(span, 2),
        "requests": len(ok),
        "errors": len(window) - len(ok),
        "error_kinds": errors,
        "requests_per_s": round(len(ok) / span, 3),
        "output_tokens_per_s": round(sum(r["tokens"] for r in ok) / span, 2),
        "latency_ms": _percentiles([(r["t_end"] - r["t_start"]) * 1e3 for r in ok]),
        "ttft_ms": _percentiles([r["ttft_ms"] for r in ok if r["ttft_ms"] is not None]),
    }


class LoadRun:
    def __init__(self, url: str, token: str, args: argparse.Namespace, server_pid: int) -> None:
        self.url = url
        self.server_pid = server_pid
        self.token = token
        self.args = args
        self.prompt_tokens: list[int] = []
        rng = np.random.default_rng(0)
        if args.model == "tiny-random":
            self.prompts: list[dict[str, Any]] = [
                {"prompt_token_ids": rng.integers(3, 512, size=args.prompt_len).tolist()}
                for _ in range(16)
            ]
        else:
            self.prompts = [{"prompt": p} for p in TEXT_PROMPTS]

    async def call(self, session: Any, method: str, params: dict[str, Any]) -> Any:
        body = {"jsonrpc": "2.0", "method": method, "params": params, "id": 1}
        headers = {"Authorization": f"Bearer {self.token}"}
        async with session.post(self.url + "/rpc", json=body, headers=headers) as resp:
            doc = await resp.json()
        if "error" in doc:
            raise RuntimeError(f"{doc['error']['code']}: {doc['error']['message']}")
        return doc["result"]

    async def client(
        self, session: Any, k: int, running: Any, records: list[dict[str, Any]]
    ) -> None:
        """Sends requests one after the other while `running()` says so."""
        a = self.args
        i = k
        await asyncio.sleep(k * a.stagger)  # clients start spread out, as they would arrive
        while running():
            params = {
                **self.prompts[i % len(self.prompts)],
                "max_tokens": a.max_tokens,
                "ignore_eos": True,
            }
            i += a.clients
            t0 = time.monotonic()
            rec: dict[str, Any] = {"t_start": t0, "ok": False, "tokens": 0, "ttft_ms": None}
            try:
                r = await self.call(session, "generate", params)
                rec.update(ok=True, tokens=len(r["token_ids"]), ttft_ms=r["metrics"]["ttft_ms"])
                self.prompt_tokens.append(r["metrics"]["prompt_tokens"])
            except Exception as e:  # noqa: BLE001 - counted, not fatal
                rec["error"] = str(e)[:80] or type(e).__name__
            rec["t_end"] = time.monotonic()
            records.append(rec)

    async def phase(
        self, session: Any, name: str, duration: float, reconfigure: bool
    ) -> dict[str, Any]:
        a = self.args
        records: list[dict[str, Any]] = []
        t0 = time.monotonic()
        stop_at = t0 + duration
        op: dict[str, Any] = {}

        async def reconfig() -> None:
            nonlocal stop_at
            await asyncio.sleep(a.reconfig_at)
            op["t_start"] = time.monotonic()
            started = await self.call(session, "reconfigure", {"plan": a.target})
            op_id = started["op_id"]
            log(f"{name}: reconfigure -> {a.target} ({op_id})")
            while True:
                st = await self.call(session, "reconfig_status", {"op_id": op_id})
                if st["done"]:
                    break
                await asyncio.sleep(0.05)
            op["t_done"] = time.monotonic()
            op["report"] = st["report"]
            stop_at = max(stop_at, op["t_done"] + a.tail)
            log(
                f"{name}: reconfiguration {'ok' if st['ok'] else 'ABORTED'} in "
                f"{st['report']['total_ms']:.0f} ms, pause {st['report']['pause_ms']} ms"
            )

        server_cpu0 = _proc_cpu_s(self.server_pid)
        with CpuWatch() as watch:
            op_task = asyncio.create_task(reconfig()) if reconfigure else None

            def running() -> bool:
                return (op_task is not None and not op_task.done()) or time.monotonic() < stop_at

            await asyncio.gather(
                *(self.client(session, k, running, records) for k in range(a.clients))
            )
            if op_task is not None:
                await op_task  # raises what the reconfiguration calls raised
        t_end = stop_at
        out: dict[str, Any] = {
            **_stats(records, t0, t_end),
            "cpu": self._cpu(watch, server_cpu0),
        }
        if reconfigure:
            rep = op["report"]
            out["reconfiguration"] = {
                "target": a.target,
                "started_at_s": round(op["t_start"] - t0, 2),
                "wall_s": round(op["t_done"] - op["t_start"], 2),
                **{
                    k: rep.get(k)
                    for k in (
                        "ok",
                        "mode",
                        "pause_ms",
                        "total_ms",
                        "rounds",
                        "bytes_weights",
                        "bytes_kv_precopy",
                        "bytes_kv_patched",
                        "bytes_kv_final",
                        "compiled_in_pause",
                        "forced_stop_and_copy",
                        "reason",
                    )
                },
                "phase_ms": {k: round(v, 1) for k, v in rep["phase_ms"].items()},
            }
            out["windows"] = {
                "before": _stats(records, t0, op["t_start"]),
                "during": _stats(records, op["t_start"], op["t_done"]),
                "after": _stats(records, op["t_done"], t_end),
            }
        log(
            f"{name}: {out['requests']} requests in {out['duration_s']} s "
            f"({out['requests_per_s']} req/s), latency p50 {out['latency_ms']['p50']} ms "
            f"p99 {out['latency_ms']['p99']} ms, {out['errors']} errors"
        )
        return out

    def _cpu(self, watch: CpuWatch, server_cpu0: float | None) -> dict[str, Any]:
        """Cores used by the server, the clients, and everything else on the machine (a shared
        machine's other load slows the server down: read the numbers with it)."""
        server_cpu1 = _proc_cpu_s(self.server_pid)
        server = None
        if server_cpu0 is not None and server_cpu1 is not None and watch.wall > 0:
            server = round((server_cpu1 - server_cpu0) / watch.wall, 2)
        other = watch.other_cores
        if other is not None and server is not None:
            other = round(max(0.0, other - server), 2)
        return {"server_cores": server, "client_cores": watch.own_cores, "other_cores": other}

    async def run(self) -> dict[str, Any]:
        import aiohttp

        a = self.args
        timeout = aiohttp.ClientTimeout(total=900)
        async with aiohttp.ClientSession(
            timeout=timeout, connector=aiohttp.TCPConnector(limit=a.clients + 4)
        ) as session:
            status = await self.call(session, "status", {})
            log(f"warmup {a.warmup} s ...")
            await self.phase(session, "warmup", a.warmup, reconfigure=False)
            steady = await self.phase(session, "steady", a.duration, reconfigure=False)
            reconfig = await self.phase(session, "reconfig", a.duration, reconfigure=True)
            after = await self.call(session, "status", {})
            metrics = await self.call(session, "metrics", {})
        lengths = sorted(set(self.prompt_tokens))
        return {
            "server": {
                "plan_before": status["plan"],
                "plan_after": after["plan"],
                "devices": status["devices"],
                "backend": status["backend"],
                "preemptions": after["preemptions"],
            },
            "prompt_tokens": {"min": lengths[0], "max": lengths[-1]} if lengths else None,
            "steady": steady,
            "reconfig": reconfig,
            "server_metrics_all_phases": {
                k: metrics[k]
                for k in (
                    "ttft_ms",
                    "tpot_ms",
                    "itl_ms",
                    "e2e_ms",
                    "reconfigurations",
                    "last_pause_ms",
                )
            },
        }


SERVER_LOG: list[str] = []
DRAIN: list[threading.Thread] = []


def _drain(proc: subprocess.Popen[str]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        SERVER_LOG.append(line.rstrip())


def start_server(args: argparse.Namespace, token: str) -> tuple[subprocess.Popen[str], str]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PIPELIVE_RPC_TOKEN"] = token
    cmd = [
        sys.executable, "-m", "pipelive_jax.cli_server", "serve",
        "--model", args.model, "--plan", args.plan, "--port", "0",
        "--devices", str(args.devices),
        "--max-num-seqs", str(args.max_num_seqs),
        "--max-model-len", str(args.max_model_len),
        "--num-pages", str(args.num_pages),
        "--request-timeout", "600", "--log-level", "info",
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the server exited with {proc.wait()}")
        print("  server:", line.rstrip(), flush=True)
        if "listening on" in line:
            # The server logs at info (compiles, reconfiguration phases): keep its pipe
            # drained so that it never blocks on a full one.
            DRAIN.append(threading.Thread(target=_drain, args=(proc,), daemon=True))
            DRAIN[-1].start()
            return proc, line.rsplit(" ", 1)[1].strip()
    proc.kill()
    raise RuntimeError("the server did not start in 600 s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--plan", default=None, help="source plan (default per model)")
    p.add_argument("--target", default=None, help="target plan (default per model)")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--duration", type=float, default=30.0, help="seconds per measured phase")
    p.add_argument("--warmup", type=float, default=40.0)
    p.add_argument("--reconfig-at", type=float, default=5.0)
    p.add_argument("--tail", type=float, default=10.0)
    p.add_argument("--stagger", type=float, default=0.5, help="seconds between client starts")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=24, help="tiny-random prompt length")
    p.add_argument("--max-num-seqs", type=int, default=4)
    p.add_argument("--max-model-len", type=int, default=128)
    p.add_argument("--num-pages", type=int, default=64)
    p.add_argument("--devices", type=int, default=4)
    p.add_argument("--name", default="serve_load", help="results file name")
    args = p.parse_args(argv)
    d = DEFAULTS.get(args.model, DEFAULTS["smollm2-135m"])
    args.plan = args.plan or d["plan"]
    args.target = args.target or d["target"]
    target = [int(x) for x in args.target.split(",")]
    quiet = wait_for_quiet(max_wait_s=60)
    log(f"machine load before: {quiet}")
    token = secrets.token_urlsafe(24)
    t0 = time.monotonic()
    proc, url = start_server(args, token)
    log(f"server up at {url} in {time.monotonic() - t0:.1f} s")
    try:
        run = LoadRun(url, token, argparse.Namespace(**{**vars(args), "target": target}), proc.pid)
        results = asyncio.run(run.run())
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        for t in DRAIN:
            t.join(timeout=30)  # it ends at the server's end of output
        for line in SERVER_LOG:
            print("  server:", line, flush=True)
    results["server"]["exit_code"] = code
    # What compiled when (the stalls a phase's latencies show): the server's own log lines.
    results["server"]["compile_log"] = [ln for ln in SERVER_LOG if "pipelive.compile" in ln]
    results["server"]["reconfig_log"] = [ln for ln in SERVER_LOG if "pipelive.reconfig" in ln]
    results["machine_load_before"] = quiet
    config = {k: v for k, v in vars(args).items() if k != "name"}
    path = write_results(args.name, config, results)
    log(f"wrote {path}")
    print(json.dumps({k: results[k] for k in ("steady", "reconfig")}, indent=1)[:4000])
    return 0


if __name__ == "__main__":
    sys.exit(main())

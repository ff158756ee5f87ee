"""`pipelive bench` and `pipelive plan`: reproducible experiments from TOML configs.

    pipelive bench CONFIG [--out DIR]        run a config, write results.json and PNGs
    pipelive bench --config CONFIG [--out DIR]
    pipelive bench compare DIR [DIR ...]     several result folders side by side
    pipelive plan --model M --devices 0:8GiB:1.0,1:4.8GiB:0.6 [--workload decode]
    pipelive plan --config CONFIG            devices, budgets and speeds from a config

`register(subparsers)` adds both commands to the `pipelive` parser; `main(argv)` runs them on
their own (`python -m pipelive_jax.cli_bench bench ...`). Nothing here imports JAX before the
number of host devices is known: `setup_devices(n)` comes first, with n from the config.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from pipelive_jax.cli_args import positive_int
from pipelive_jax.errors import PipeliveError

__all__ = ["main", "register"]


def _log(msg: str) -> None:
    print(f"[pipelive bench] {msg}", file=sys.stderr, flush=True)


def register(subparsers: Any) -> None:
    """Adds `bench` and `plan` to an argparse subparsers object."""
    b = subparsers.add_parser(
        "bench",
        help="run a benchmark config, or compare result folders",
        description=(
            "Run a benchmark config (TOML in configs/) and write results.json and plots, or "
            "`bench compare DIR...` to show several result folders side by side."
        ),
    )
    b.add_argument("target", nargs="?", help="a config TOML file, or the word 'compare'")
    b.add_argument("dirs", nargs="*", help="with 'compare': result folders (or results.json files)")
    b.add_argument("--config", help="the config TOML (instead of the positional CONFIG)")
    b.add_argument("--out", help="output folder (default: [bench] out, else results/<config name>)")
    b.add_argument("--markdown", action="store_true", help="compare: print a markdown table")
    b.add_argument(
        "--check",
        action="store_true",
        help="compare: check that every later run reproduces the first (counts equal, rates and "
        "latencies within --tolerance); exit 1 if not",
    )
    b.add_argument(
        "--tolerance",
        type=float,
        default=0.5,
        help="compare --check: allowed relative difference of rates and latencies (default 0.5)",
    )
    b.add_argument("--quiet", action="store_true", help="no progress bar or log lines")
    b.set_defaults(func=cmd_bench)

    p = subparsers.add_parser(
        "plan",
        help="propose a layer split for devices with memory budgets and speeds",
        description=(
            "Propose the contiguous layer split that minimises the slowest stage's time "
            "(layers / speed, plus the LM head on the last stage) while every device fits its "
            "weights and a minimum of KV pages (pipelive_jax.planner)."
        ),
    )
    p.add_argument(
        "--config", help="take model, devices, budgets, speeds and page size from a config"
    )
    p.add_argument("--model", help="registry name or path (default smollm2-135m)")
    p.add_argument(
        "--devices",
        help="id:memory[:speed],... like 0:8GiB:1.0,1:4.8GiB:0.6 (or a config TOML)",
    )
    p.add_argument(
        "--workload",
        choices=("prefill", "decode", "mixed"),
        default="mixed",
        help="what the LM head costs: every token (decode), one per prompt (prefill), or between",
    )
    p.add_argument("--prompt-len", type=positive_int, help="prompt length for the prefill head cost")
    p.add_argument(
        "--head-cost", type=float, help="LM head cost in layer units (overrides --workload)"
    )
    p.add_argument("--embed-cost", type=float, default=0.0, help="embedding cost in layer units")
    p.add_argument("--page-size", type=positive_int, help="tokens per KV page (default 16)")
    p.add_argument("--utilization", type=float, help="memory utilisation cap (default 0.9)")
    p.add_argument(
        "--min-kv-tokens",
        type=int,
        help="KV tokens each stage must hold at least (default: max_model_len of the config, else 0)",
    )
    p.add_argument("--granule", type=positive_int, default=1, help="round pool capacities down to this")
    p.add_argument("--json", action="store_true", help="print the proposal as JSON")
    p.set_defaults(func=cmd_plan)


# --------------------------------------------------------------------------------------------
# bench


def cmd_bench(args: argparse.Namespace) -> int:
    if args.target == "compare":
        if not args.dirs:
            raise PipeliveError("bench compare needs result folders: pipelive bench compare A B")
        from pipelive_jax.bench.results import compare

        out = compare(args.dirs, markdown=args.markdown)
        if args.markdown:
            print(out)
        else:
            from rich.console import Console

            Console().print(out)
        if args.check:
            return _check(args.dirs, args.tolerance)
        return 0
    if args.dirs:
        raise PipeliveError(
            f"unexpected arguments {args.dirs}: give one config (or 'compare' and folders)"
        )
    path = args.config or args.target
    if path is None:
        raise PipeliveError("give a config: pipelive bench configs/tiny-smoke.toml")
    if args.config and args.target and os.path.abspath(args.config) != os.path.abspath(args.target):
        raise PipeliveError(
            f"two configs given ({args.target} and --config {args.config}); give one"
        )
    from pipelive_jax.config import load_config

    cfg = load_config(path)
    from pipelive_jax.cli import setup_devices

    setup_devices(cfg.num_devices)
    from pipelive_jax.bench.results import compare
    from pipelive_jax.bench.runner import run_bench

    log = (lambda m: None) if args.quiet else _log
    results, out = run_bench(cfg, out_dir=args.out, progress=not args.quiet, log=log)
    if not args.quiet:
        from rich.console import Console

        Console(stderr=True).print(compare([out]))
    print(os.path.join(out, "results.json"))
    return 0 if results["completed"] == results["num_requests"] else 1


def _check(dirs: list[str], tolerance: float) -> int:
    """Prints, for each run after the first, the reproduction check against the first."""
    from pipelive_jax.bench.results import check_reproduction, load_results

    if len(dirs) < 2:
        raise PipeliveError("bench compare --check needs a reference and at least one run")
    if not tolerance >= 0:
        raise PipeliveError(f"--tolerance must be >= 0, got {tolerance}")
    reference = load_results(dirs[0])
    all_ok = True
    for d in dirs[1:]:
        ok, rows = check_reproduction(reference, load_results(d), tolerance)
        all_ok &= ok
        print(f"{d} against {dirs[0]}: {'reproduces' if ok else 'DOES NOT reproduce'}")
        for r in rows:
            ratio = "" if r["ratio"] is None else f" (x{r['ratio']:.2f})"
            mark = "ok  " if r["ok"] else "FAIL"
            print(f"  {mark} {r['metric']}: {r['reference']} -> {r['run']}{ratio}")
    return 0 if all_ok else 1


# --------------------------------------------------------------------------------------------
# plan


def _plan_inputs(args: argparse.Namespace) -> dict[str, Any]:
    """Model, devices and knobs for the planner from flags and/or a config (flags win)."""
    from pipelive_jax.planner import DeviceSpec, parse_devices

    cfg = None
    cfg_path = args.config
    if args.devices and args.devices.endswith(".toml"):
        if cfg_path and os.path.abspath(cfg_path) != os.path.abspath(args.devices):
            raise PipeliveError("--devices names a config and --config another; give one")
        cfg_path = args.devices
    if cfg_path:
        from pipelive_jax.config import load_config

        cfg = load_config(cfg_path)
    model = args.model or (cfg.model.name if cfg else "smollm2-135m")
    dtype = cfg.model.dtype if cfg else "float32"
    kv_dtype = cfg.kv.kv_cache_dtype if cfg else "auto"
    if args.devices and not args.devices.endswith(".toml"):
        devices = parse_devices(args.devices)
    elif cfg is not None:
        mem = cfg.kv.device_memory
        if mem is None:
            raise PipeliveError(
                f"{cfg.path}: [kv] device_memory is not set, so the planner has no budgets; "
                "give --devices id:memory[:speed],..."
            )
        n = cfg.plan.devices
        budgets = list(mem) if isinstance(mem, tuple) else [mem] * n
        speeds = list(cfg.plan.speeds) if cfg.plan.speeds else [1.0] * n
        devices = [DeviceSpec(i, budgets[i], speeds[i]) for i in range(n)]
    else:
        raise PipeliveError("give --devices id:memory[:speed],... or --config CONFIG")
    page_size = args.page_size or (cfg.kv.page_size if cfg else 16)
    utilization = args.utilization or (cfg.kv.utilization if cfg else 0.9)
    min_tokens = args.min_kv_tokens
    if min_tokens is None:
        min_tokens = cfg.scheduler.max_model_len if cfg else 0
    prompt_len = args.prompt_len
    if prompt_len is None and cfg is not None:
        prompt_len = _prefill_prompt_len(cfg)
    return {
        "model": model,
        "dtype": dtype,
        "kv_dtype": kv_dtype,
        "devices": devices,
        "page_size": page_size,
        "utilization": utilization,
        "min_kv_pages": -(-min_tokens // page_size),
        "prompt_len": prompt_len or 128,
        "granule": args.granule,
    }


def _prefill_prompt_len(cfg: Any) -> int:
    from pipelive_jax.bench.workload import PREFILL_HEAVY

    w = cfg.workload
    if w is None:
        return 128
    if w.kind == "pattern_shift":
        return max(1, round(PREFILL_HEAVY[0] * w.scale))
    spec = w.input
    if spec.dist == "fixed" and spec.value:
        return max(1, round(spec.value * w.scale))
    if spec.dist == "uniform" and spec.low and spec.high:
        return max(1, round((spec.low + spec.high) / 2 * w.scale))
    return max(1, round((spec.mean or 161.31) * w.scale))


def cmd_plan(args: argparse.Namespace) -> int:
    from pipelive_jax.planner import head_cost_for, model_shape_for, propose_split

    inp = _plan_inputs(args)
    shape = model_shape_for(inp["model"], inp["dtype"], inp["kv_dtype"])
    head = (
        args.head_cost
        if args.head_cost is not None
        else head_cost_for(shape, args.workload, inp["prompt_len"])
    )
    prop = propose_split(
        shape,
        inp["devices"],
        head_cost=head,
        embed_cost=args.embed_cost,
        page_size=inp["page_size"],
        utilization=inp["utilization"],
        min_kv_pages=inp["min_kv_pages"],
        granule=inp["granule"],
    )
    if args.json:
        print(json.dumps(prop.to_json(), indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    t = Table(
        title=f"{inp['model']}: {args.workload if args.head_cost is None else 'custom'} split "
        f"(LM head = {head:.2f} layers)"
    )
    for col in ("stage", "device", "memory", "speed", "layers", "time (layer units)", "KV pages"):
        t.add_column(col, justify="right")
    for i, (spec, d) in enumerate(zip(prop.plan.stages, inp["devices"], strict=True)):
        t.add_row(
            str(i),
            str(d.device),
            f"{d.memory_bytes / 2**30:.2f} GiB",
            f"{d.speed:g}",
            f"[{spec.start}, {spec.end})",
            f"{prop.stage_times[i]:.2f}",
            str(prop.kv_pages[i]),
        )
    con = Console()
    con.print(t)
    con.print(f"plan counts: {list(prop.counts)}")
    con.print(json.dumps(prop.plan.to_json()))
    return 0


# --------------------------------------------------------------------------------------------
# standalone


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pipelive", description="pipelive bench and plan")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except PipeliveError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

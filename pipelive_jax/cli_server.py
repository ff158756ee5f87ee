"""`pipelive serve` and `pipelive rpc`; `register(subparsers)` adds them to the `pipelive` parser.

Like the rest of the CLI, nothing here imports JAX at module level: `serve` gives JAX its devices
(`setup_devices`) first; `rpc` never imports JAX. Until `pipelive_jax.cli` registers these
commands, `python -m pipelive_jax.cli_server serve ...` runs them.

`serve --config FILE` reads a config of `configs/` (`pipelive_jax.config.load_config`, the files
`pipelive bench` runs): the model ([model]), the initial plan and the number of devices ([plan]),
and the engine options ([kv], [scheduler]). A server does not use the workload, the
reconfiguration schedule or [bench]. Flags override the file.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any

from pipelive_jax.cli_args import (
    int_at_least,
    nonnegative_float,
    port,
    positive_float,
    positive_int,
)
from pipelive_jax.config import DTYPES, KV_CACHE_DTYPES
from pipelive_jax.errors import PipeliveError

DEFAULT_DEVICES = 8
"""CPU host devices `serve` creates without a config when the plan needs fewer: room to
reconfigure onto more stages."""

_ENGINE_FLAGS = (
    "max_model_len",
    "num_pages",
    "max_num_seqs",
    "max_num_batched_tokens",
    "page_size",
    "num_microbatches",
    "device_memory_bytes",
    "backend",
    "kv_cache_dtype",
)


def register(subparsers: Any) -> None:
    """Adds `serve` and `rpc` to the subparsers of the `pipelive` parser."""
    s = subparsers.add_parser(
        "serve",
        help="serve a model over HTTP (JSON-RPC control plane, OpenAI-compatible API)",
        description="Serve a model: JSON-RPC 2.0 at /rpc, OpenAI-compatible /v1/completions and "
        "/v1/chat/completions, /health, Prometheus /metrics. SIGINT/SIGTERM drain and exit 0.",
    )
    s.add_argument("--model", default=None, help="registry name or path (default smollm2-135m)")
    s.add_argument(
        "--plan", default=None, help="layer counts per stage (10,20), a JSON plan or a JSON file"
    )
    s.add_argument(
        "--config", default=None, help="a config of configs/ (model, plan, devices, kv, scheduler)"
    )
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback)")
    s.add_argument(
        "--port", type=port, default=8000, help="port (default 8000; 0 picks a free one)"
    )
    s.add_argument(
        "--token-file",
        default=None,
        help="where to write the RPC token when $PIPELIVE_RPC_TOKEN is not set "
        "(default ~/.cache/pipelive/rpc_token)",
    )
    s.add_argument("--served-model-name", default=None, help="the model id of the OpenAI API")
    s.add_argument("--dtype", default=None, choices=DTYPES, help="weights dtype (default float32)")
    s.add_argument(
        "--devices",
        type=positive_int,
        default=None,
        help="CPU host devices to create (default: the config's, else what the plan needs, "
        f"at least {DEFAULT_DEVICES})",
    )
    s.add_argument("--max-model-len", type=positive_int, default=None)
    s.add_argument("--num-pages", type=int_at_least(2), default=None, help="KV pages per stage")
    s.add_argument("--max-num-seqs", type=positive_int, default=None)
    s.add_argument("--max-num-batched-tokens", type=positive_int, default=None)
    s.add_argument("--page-size", type=positive_int, default=None)
    s.add_argument("--num-microbatches", type=positive_int, default=None)
    s.add_argument(
        "--device-memory-bytes", type=positive_int, default=None, help="memory budget per device"
    )
    s.add_argument("--backend", default=None, help="attention kernel backend")
    s.add_argument(
        "--kv-cache-dtype",
        default=None,
        choices=KV_CACHE_DTYPES,
        help="KV cache dtype (default auto: the model's, float32 on CPU)",
    )
    s.add_argument(
        "--request-timeout",
        type=nonnegative_float,
        default=600.0,
        help="seconds per request, queueing included (default 600; 0: no limit)",
    )
    s.add_argument(
        "--drain-timeout",
        type=nonnegative_float,
        default=30.0,
        help="on SIGINT/SIGTERM, seconds in-flight requests may run on (default 30)",
    )
    s.add_argument("--max-body-bytes", type=positive_int, default=1 << 20, help="default 1 MiB")
    s.add_argument(
        "--log-level",
        default="warning",
        choices=("debug", "info", "warning", "error"),
        help="level of the server's own log (default warning; info also logs each compile "
        "and reconfiguration phase, with times)",
    )
    s.set_defaults(func=_cmd_serve)

    r = subparsers.add_parser(
        "rpc",
        help="call a JSON-RPC method of a running `pipelive serve`",
        description="Methods: generate, reconfigure, reconfig_status, abort_reconfig, "
        "validate_plan, status, metrics. Prints the result as JSON; errors go to stderr, exit 1.",
    )
    r.add_argument("method")
    r.add_argument("--params", default=None, help="a JSON object, e.g. '{\"plan\": [2, 2, 2]}'")
    r.add_argument(
        "--url", default=None, help="server URL (default $PIPELIVE_URL or http://127.0.0.1:8000)"
    )
    r.add_argument(
        "--token-file", default=None, help="token file (when $PIPELIVE_RPC_TOKEN is unset)"
    )
    r.add_argument(
        "--timeout", type=positive_float, default=600.0, help="seconds to wait for the answer"
    )
    r.set_defaults(func=_cmd_rpc)


# ---------------------------------------------------------------------------------- serve


@dataclass
class ServeSettings:
    """What `serve` loads and builds, from the flags and the config file (no JAX needed)."""

    model: str
    dtype: str
    seed: int
    plan: Any
    devices: int
    engine_options: dict[str, Any] = field(default_factory=dict)


def serve_settings(args: argparse.Namespace) -> ServeSettings:
    """Flags over the config file (if any) over the defaults. Raises PipeliveError."""
    from pipelive_jax.cli import MAX_HOST_DEVICES, _devices_needed, _read_plan

    model, dtype, seed, plan = "smollm2-135m", "float32", 0, None
    devices: int | None = None
    engine_options: dict[str, Any] = {}
    if args.config:
        from pipelive_jax.config import load_config

        cfg = load_config(args.config)
        model, dtype, seed = cfg.model.name, cfg.model.dtype, cfg.model.seed
        plan, devices = cfg.plan.stages, cfg.num_devices
        engine_options = cfg.engine_options()
    if args.plan is not None:
        plan = _read_plan(args.plan)
    if args.devices is not None:
        devices = args.devices
    elif devices is None:
        devices = max(_devices_needed(plan), DEFAULT_DEVICES)
    if not 1 <= devices <= MAX_HOST_DEVICES:
        source = "--devices" if args.devices is not None else f"the devices of {args.config}"
        raise PipeliveError(
            f"{source}: {devices} host devices; on CPU at most {MAX_HOST_DEVICES} (give 1-"
            f"{MAX_HOST_DEVICES})"
        )
    for name in _ENGINE_FLAGS:
        value = getattr(args, name)
        if value is not None:
            engine_options[name] = value
    return ServeSettings(
        model=args.model or model,
        dtype=args.dtype or dtype,
        seed=seed,
        plan=plan,
        devices=devices,
        engine_options=engine_options,
    )


def _cmd_serve(args: argparse.Namespace) -> int:
    from pipelive_jax.cli import setup_devices

    settings = serve_settings(args)
    # The level is ours (the `pipelive.*` loggers); libraries keep warning, so that info does
    # not bring every HTTP access line with it.
    logging.basicConfig(level="WARNING", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pipelive").setLevel(args.log_level.upper())
    setup_devices(settings.devices)

    from pipelive_jax.serving.server import ServerOptions, serve

    options = ServerOptions(
        model_name=args.served_model_name,
        request_timeout_s=args.request_timeout or None,
        drain_timeout_s=args.drain_timeout,
        max_body_bytes=args.max_body_bytes,
    )
    return serve(
        settings.model,
        settings.plan,
        host=args.host,
        port=args.port,
        config=settings.engine_options,
        token_file=args.token_file,
        options=options,
        dtype=settings.dtype,
        seed=settings.seed,
    )


def _cmd_rpc(args: argparse.Namespace) -> int:
    from pipelive_jax.serving.rpc_client import DEFAULT_URL, run

    url = args.url or os.environ.get("PIPELIVE_URL") or DEFAULT_URL
    return run(args.method, args.params, url=url, token_file=args.token_file, timeout=args.timeout)


def main(argv: list[str] | None = None) -> int:
    """`python -m pipelive_jax.cli_server serve|rpc ...` (the same as `pipelive serve|rpc`)."""
    parser = argparse.ArgumentParser(prog="pipelive")
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

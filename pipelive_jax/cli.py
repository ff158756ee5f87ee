"""`pipelive` command line: generate, demo, serve, rpc, bench, plan.

JAX reads XLA_FLAGS once, at import; on CPU the CLI must give it as many host devices as the plan
needs before anything imports JAX, so arguments are parsed first and JAX imported after.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from pipelive_jax.cli_args import positive_int
from pipelive_jax.errors import PipeliveError

# The most CPU host devices the CLI asks XLA for: each is a device with its own thread pool
# and allocator, so a plan naming device 200000 took gigabytes before it failed.
MAX_HOST_DEVICES = 64


def _devices_needed(plan: Any) -> int:
    """How many devices a plan spec refers to, without importing JAX (default 1). A plan that
    needs more than MAX_HOST_DEVICES is refused (PipeliveError)."""
    n = _devices_named(plan)
    if n > MAX_HOST_DEVICES:
        raise PipeliveError(
            f"the plan names device {n - 1}; on CPU the CLI creates at most {MAX_HOST_DEVICES} "
            f"host devices (ids 0-{MAX_HOST_DEVICES - 1})"
        )
    return n


def _devices_named(plan: Any) -> int:
    if plan is None:
        return 1
    if isinstance(plan, list):
        return len(plan)
    if isinstance(plan, dict):
        stages = plan.get("stages", [])
        ids = [
            d
            for s in stages
            if isinstance(s, dict)
            for d in (s.get("devices") or [])
            if isinstance(d, int)
        ]
        return max(ids, default=0) + 1
    return 1


def _read_plan(arg: str | None) -> Any:
    """`--plan 10,20`, a JSON string, or a path to a JSON file -> a plan spec for parse_plan."""
    if arg is None:
        return None
    if arg.lower().endswith(".json") and not os.path.isfile(arg):
        raise PipeliveError(f"--plan file {arg}: no such file")
    if os.path.isfile(arg):
        with open(arg) as f:
            try:
                return json.load(f)
            except json.JSONDecodeError as e:
                raise PipeliveError(f"--plan file {arg}: not valid JSON ({e})") from e
    if arg.lstrip().startswith(("{", "[")):
        try:
            return json.loads(arg)
        except json.JSONDecodeError as e:
            raise PipeliveError(f"--plan: not valid JSON ({e})") from e
    try:
        return [int(x) for x in arg.split(",") if x.strip()]
    except ValueError:
        raise PipeliveError(
            f"--plan {arg!r}: give layer counts like 10,20, a JSON plan, or a JSON file"
        ) from None


def setup_devices(count: int) -> None:
    """Gives JAX `count` CPU devices (must run before JAX is imported)."""
    if "jax" in sys.modules:
        return
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = (
            f"{flags} --xla_force_host_platform_device_count={max(count, 1)}".strip()
        )


def _cmd_generate(args: argparse.Namespace) -> int:
    plan = _read_plan(args.plan)
    setup_devices(_devices_needed(plan))
    from pipelive_jax.serving.llm import LLM
    from pipelive_jax.serving.sampling import SamplingParams

    llm = LLM(args.model, plan=plan, progress=True, max_model_len=args.max_model_len)
    prompt = args.prompt
    if args.chat:
        if llm.tokenizer is None:
            raise PipeliveError(f"model {args.model} has no tokenizer/chat template")
        prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )
    out = llm.generate([prompt], params)[0]
    print(out.text if llm.tokenizer is not None else out.token_ids)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    setup_devices(4)
    from pipelive_jax.demo import run_demo

    return run_demo(model=args.model, max_tokens=args.max_tokens)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pipelive", description="Live pipeline-reconfigurable LLM serving on JAX"
    )
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate text for one prompt")
    g.add_argument("prompt")
    g.add_argument(
        "--model", default="smollm2-135m", help="registry name or path (default smollm2-135m)"
    )
    g.add_argument("--max-tokens", type=positive_int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument(
        "--chat", action="store_true", help="wrap the prompt in the model's chat template"
    )
    g.add_argument(
        "--plan", default=None, help="layer counts per stage (10,20), a JSON plan or a JSON file"
    )
    g.add_argument("--max-model-len", type=positive_int, default=1024)
    g.set_defaults(func=_cmd_generate)
    d = sub.add_parser(
        "demo", help="stream requests over 2 stages, live-reconfigure to 3, check outputs"
    )
    d.add_argument("--model", default="smollm2-135m")
    d.add_argument("--max-tokens", type=positive_int, default=48)
    d.set_defaults(func=_cmd_demo)
    from pipelive_jax import cli_bench, cli_server  # no JAX at import: devices are set later

    cli_server.register(sub)
    cli_bench.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except PipeliveError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

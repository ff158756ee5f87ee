"""`pipelive rpc METHOD`: a small JSON-RPC 2.0 client of `pipelive serve` (standard library only).

The bearer token comes from `$PIPELIVE_RPC_TOKEN`, else from the token file the server wrote
(`--token-file`, default `default_token_path()`). It is sent with every call; only the mutating
methods (`reconfigure`, `abort_reconfig`) need it.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from typing import Any

from pipelive_jax.errors import PipeliveError

TOKEN_ENV = "PIPELIVE_RPC_TOKEN"
DEFAULT_URL = "http://127.0.0.1:8000"


def default_token_path() -> str:
    """`$XDG_CACHE_HOME/pipelive/rpc_token`, or `~/.cache/pipelive/rpc_token`."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "pipelive", "rpc_token")


def read_token(token_file: str | None = None) -> str | None:
    """The token from the environment or the token file; None when neither has one.

    A `token_file` given explicitly must exist; the default one may be missing.
    """
    env = os.environ.get(TOKEN_ENV, "").strip()
    if env:
        return env
    path = os.path.expanduser(token_file or default_token_path())
    try:
        with open(path) as f:
            return f.read().strip() or None
    except FileNotFoundError:
        if token_file is not None:
            raise PipeliveError(f"token file {path} does not exist") from None
        return None
    except OSError as e:
        raise PipeliveError(f"cannot read token file {path}: {e.strerror or e}") from None


class RpcCallError(PipeliveError):
    """A JSON-RPC error object the server answered with."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(f"error {code}: {message}")
        self.code = code
        self.message = message
        self.data = data


def call(
    method: str,
    params: dict[str, Any] | list[Any] | None = None,
    *,
    url: str = DEFAULT_URL,
    token: str | None = None,
    timeout: float = 600.0,
) -> Any:
    """Calls `method` on the server at `url`; returns its result.

    Raises RpcCallError for an error answer, PipeliveError when there is no usable answer.
    """
    if not url.startswith(("http://", "https://")):
        raise PipeliveError(f"server URL {url!r} is not an http:// or https:// URL")
    if not timeout > 0:  # urllib: 0 is a non-blocking socket, a negative one a ValueError
        raise PipeliveError(f"timeout must be > 0 seconds, got {timeout:g}")
    body = json.dumps({"jsonrpc": "2.0", "method": method, "params": params or {}, "id": 1})
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    endpoint = url.rstrip("/") + "/rpc"
    req = urllib.request.Request(endpoint, data=body.encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
    except urllib.error.HTTPError as e:
        raw = e.read()  # e.g. 413 carries a JSON-RPC error object
        if not raw:
            raise PipeliveError(f"{endpoint} answered HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise PipeliveError(f"cannot reach {endpoint}: {e.reason}") from None
    except TimeoutError:
        raise PipeliveError(f"{endpoint} did not answer within {timeout:g} s") from None
    except OSError as e:
        raise PipeliveError(f"cannot reach {endpoint}: {e}") from None
    try:
        doc = json.loads(raw)
    except ValueError:
        raise PipeliveError(f"{endpoint} did not answer with JSON: {raw[:200]!r}") from None
    if not isinstance(doc, dict):
        raise PipeliveError(f"{endpoint} answered with something that is not a JSON-RPC response")
    err = doc.get("error")
    if isinstance(err, dict):
        raise RpcCallError(int(err.get("code", 0)), str(err.get("message", "")), err.get("data"))
    return doc.get("result")


def run(
    method: str,
    params_json: str | None,
    *,
    url: str = DEFAULT_URL,
    token_file: str | None = None,
    timeout: float = 600.0,
) -> int:
    """The `pipelive rpc` command: prints the result as JSON (exit 0) or the error (exit 1)."""
    try:
        params: Any = {}
        if params_json:
            try:
                params = json.loads(params_json)
            except ValueError as e:
                raise PipeliveError(f"--params is not valid JSON: {e}") from None
            if not isinstance(params, dict | list):
                raise PipeliveError("--params must be a JSON object, e.g. '{\"plan\": [3, 3]}'")
        result = call(method, params, url=url, token=read_token(token_file), timeout=timeout)
    except RpcCallError as e:
        print(f"error {e.code}: {e.message}", file=sys.stderr)
        if e.data is not None:
            print(json.dumps(e.data, indent=2), file=sys.stderr)
        return 1
    except PipeliveError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2))
    return 0

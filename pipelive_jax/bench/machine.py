"""What a result needs to say about where it was measured: the machine, the git commit, and how
much CPU other processes took meanwhile.

Lives in the package (not in `benchmarks/`) so that `pipelive bench`, run as an installed console
script, records the same metadata as the scripts in `benchmarks/` do.
"""

from __future__ import annotations

import os
import platform
import subprocess
import time
from typing import Any

# The checkout this package runs from, when it is one (an editable install); else None.
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _memory_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def machine_info() -> dict[str, Any]:
    mem = _memory_bytes()
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = None
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "cpu_model": _cpu_model(),
        "memory_bytes": mem,
        "memory_gib": round(mem / 2**30, 2) if mem else None,
        "hostname": platform.node(),
    }


def git_commit(root: str | None = None) -> dict[str, Any]:
    """{"commit", "dirty"} of the checkout at `root` (default: the one this package runs from,
    else the current directory); None values outside a git checkout. "dirty" ignores the
    benchmarks' own output folders: a benchmark that writes partial results as it goes would
    otherwise record its run as dirty."""

    def run(cwd: str, *args: str) -> str | None:
        try:
            r = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return r.stdout.strip() if r.returncode == 0 else None

    for cwd in [root] if root else [_PACKAGE_ROOT, os.getcwd()]:
        commit = run(cwd, "rev-parse", "HEAD")
        if commit:
            status = run(
                cwd,
                "status",
                "--porcelain",
                "--",
                ".",
                ":(exclude)benchmarks/results",
                ":(exclude)results",
            )
            return {"commit": commit, "dirty": bool(status) if status is not None else None}
    return {"commit": None, "dirty": None}


# ---------------------------------------------------------------- contention on a shared machine


def _busy_jiffies() -> tuple[int, int] | None:
    """(busy, total) CPU jiffies of the whole machine from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            parts = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0)
    total = sum(parts[:8])
    return total - idle, total


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class CpuWatch:
    """How much CPU other processes took while a block ran (in cores, averaged over its wall time).

    On a shared 2-core machine a test suite running beside a benchmark halves its speed: results
    carry this number so a reader can tell a slow run from a contended one.
    """

    def __init__(self) -> None:
        self.wall = 0.0
        self.other_cores: float | None = None
        self.own_cores: float | None = None

    def __enter__(self) -> CpuWatch:
        self._j0 = _busy_jiffies()
        self._c0 = _own_cpu_s()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.wall = time.perf_counter() - self._t0
        j1 = _busy_jiffies()
        own = _own_cpu_s() - self._c0
        if self._j0 is None or j1 is None or self.wall <= 0:
            return
        hz = os.sysconf("SC_CLK_TCK")
        busy_s = (j1[0] - self._j0[0]) / hz
        self.own_cores = round(own / self.wall, 2)
        self.other_cores = round(max(0.0, busy_s - own) / self.wall, 2)

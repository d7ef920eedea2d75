"""Running one piece of work in a fresh Python process, and turning its death into a reason;
and the worker side: one JSON request in, one JSON line out.

Used by the conformance run and the benchmark: a path that segfaults, is killed for
memory or hangs becomes that path's ``error``, with the cause, and the others go on.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path


def signal_name(returncode: int) -> str:
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def run_json_worker(module: str, request: dict, timeout: float) -> tuple[dict | None, str]:
    """``python -m module REQUEST``; returns (the JSON its last stdout line holds, "") or
    (None, why it gave none)."""
    cmd = [sys.executable, "-m", module, json.dumps(request)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout:.0f} s"
    lines = done.stdout.strip().splitlines()
    if done.returncode == 0 and lines:
        try:
            return json.loads(lines[-1]), ""
        except ValueError:
            pass
    tail = "\n".join(done.stderr.strip().splitlines()[-5:])
    if done.returncode < 0:
        why = f"the process died of {signal_name(done.returncode)}"
        if done.returncode == -signal.SIGKILL:
            why += " (killed: out of memory?)"
    else:
        why = f"the process exited with {done.returncode}"
    return None, f"{why}: {tail}" if tail else why


def serve(work: Callable[[dict], dict]) -> int:
    """A worker's ``main``: ``work(request)`` on the JSON request in ``argv[1]``, its result
    printed as the last stdout line; an exception becomes ``{"status": "error", ...}``."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    request = json.loads(sys.argv[1])
    try:
        result = work(request)
    except Exception as exc:
        result = {"status": "error", "reason": f"{type(exc).__name__}: {exc}".strip()}
    print(json.dumps(result))
    return 0


def memory_mb(field: str) -> float:
    """A memory figure of this process from /proc/self/status, in MB: ``VmRSS`` (now) or
    ``VmHWM`` (the resident-set high-water mark, which unlike getrusage's ru_maxrss does not
    include the parent's, inherited across fork and exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")

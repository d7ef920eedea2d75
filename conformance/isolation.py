"""Processes: running one piece of work in a fresh Python process and turning its death
into a reason; the worker side (one JSON request in, one JSON line out); ending every
worker when the toolkit itself is interrupted or terminated; and keeping third-party
start-up logs quiet, and TensorFlow from taking the whole GPU (:func:`grow_gpu_memory`,
here because start-up needs it and this is the lowest layer that does).

Used by the conformance run and the benchmark: a path that segfaults, is killed for
memory or hangs becomes that path's ``error``, with the cause, and the others go on.
Each worker runs in its own process group, so that it and anything it started (compiler
processes) can be ended together: by its time-out, or by :func:`end_workers` when the
toolkit receives SIGINT or SIGTERM.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

_LIVE: set[subprocess.Popen] = set()
_LIVE_LOCK = threading.Lock()


def signal_name(returncode: int) -> str:
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the worker's process group: the worker and anything it started."""
    with contextlib.suppress(OSError):
        os.killpg(proc.pid, signal.SIGKILL)


def register_worker(proc: subprocess.Popen) -> None:
    """A worker (started with ``start_new_session=True``) that :func:`end_workers` must end."""
    with _LIVE_LOCK:
        _LIVE.add(proc)


def forget_worker(proc: subprocess.Popen) -> None:
    with _LIVE_LOCK:
        _LIVE.discard(proc)


def death_reason(returncode: int, stderr_tail: str) -> str:
    """Why a worker gave no answer, from its exit status and the last lines of its stderr."""
    if returncode is not None and returncode < 0:
        why = f"the process died of {signal_name(returncode)}"
        if returncode == -signal.SIGKILL:
            why += " (killed: out of memory?)"
    else:
        why = f"the process exited with {returncode}"
    return f"{why}: {stderr_tail}" if stderr_tail else why


def end_workers() -> None:
    """Kill every running worker and whatever it started (their process groups)."""
    with _LIVE_LOCK:
        live = list(_LIVE)
    for proc in live:
        kill_group(proc)


def run_json_worker(module: str, request: dict, timeout: float) -> tuple[dict | None, str]:
    """``python -m module REQUEST``; returns (the JSON its last stdout line holds, "") or
    (None, why it gave none)."""
    cmd = [sys.executable, "-m", module, json.dumps(request)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    register_worker(proc)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        proc.communicate()
        return None, f"timed out after {timeout:.0f} s"
    finally:
        kill_group(proc)  # anything the worker left running in its group
        forget_worker(proc)
    lines = stdout.strip().splitlines()
    if proc.returncode == 0 and lines:
        try:
            return json.loads(lines[-1]), ""
        except ValueError:
            pass
    return None, death_reason(proc.returncode, "\n".join(stderr.strip().splitlines()[-5:]))


class Terminated(BaseException):
    """SIGTERM, raised in the main thread like KeyboardInterrupt is for SIGINT, so that
    every ``finally`` (temporary folders, staging folders, locks) runs."""


def handle_signals() -> None:
    """On SIGINT or SIGTERM: end every worker first (threads waiting on them then return),
    then raise KeyboardInterrupt or :class:`Terminated` in the main thread."""

    def on_signal(signum, _frame):
        end_workers()
        if signum == signal.SIGTERM:
            raise Terminated()
        raise KeyboardInterrupt()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)


_MUTED = threading.RLock()


@contextlib.contextmanager
def muted() -> Iterator[None]:
    """Third-party code's prints (stdout) and warnings dropped while the block runs.

    ``sys.stdout`` and the warning filters are process-wide, so two threads that swap them
    at once can restore each other's replacement and leave the process printing into a
    dropped buffer (the runner's paths run in threads, and each may export). The blocks
    therefore run one at a time; they wrap exports and library loading, which are not
    safe to run concurrently anyway."""
    with _MUTED, warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def grow_gpu_memory() -> None:
    """Let TensorFlow take GPU memory as it needs it, not all of it at start-up, so that one
    process does not starve the next and peak memory means something. Does nothing once
    this process has initialised its GPUs."""
    import tensorflow as tf

    for gpu in tf.config.list_physical_devices("GPU"):
        with contextlib.suppress(RuntimeError):
            tf.config.experimental.set_memory_growth(gpu, True)


def quiet_third_party(verbose: bool) -> None:
    """TensorFlow logs to stderr from C++ at import and at device set-up, before any
    Python setting applies: unless ``verbose``, start it with stderr pointed at /dev/null."""
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    if verbose:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        import tensorflow as tf

        grow_gpu_memory()  # this process must not take the GPU's memory from the paths it starts
        tf.constant(0)  # device discovery logs here
    except Exception:  # a broken TensorFlow shows itself later, on the paths that need it
        pass
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


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

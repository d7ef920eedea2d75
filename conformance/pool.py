"""Long-lived worker processes, one family of paths each (``torch``, ``tf``, ``ort``,
``onnx-reference``, ...), that serve many (case, path) requests one after the other.

Each worker is ``python -m conformance.paths.worker --serve FAMILY``: it imports its
family's framework once, answers ``ready``, then reads one JSON request per line on stdin
and writes one JSON answer per line (on a private copy of its stdout: anything a library
prints goes to stderr). The isolation is that of one process per path where it matters:

* a request that crashes the worker (a segfault, the out-of-memory killer) is answered
  by the worker's death: that request's path is ``error`` with the signal and the last
  lines of stderr, and the next request of the family starts a fresh worker;
* a request that outlives its time-out kills the worker's whole process group and is
  ``error`` likewise;
* nothing of a request survives it but the case context the worker keeps to serve the
  next path of the same case (models, as the in-process run shares them).

This is the model of pytest-xdist's worker restarts. The pool hands a worker to one
caller at a time (:meth:`WorkerPool.worker`), keeps at most ``per_family`` of each family,
and closes a family's workers once nobody needs them (:meth:`WorkerPool.retire`).
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import select
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

from conformance.isolation import death_reason, forget_worker, kill_group, register_worker

Answer = tuple[dict | None, str]  # (the answer, "") or (None, why there is none)
# families whose paths a run serves with one worker at a time: the sharded paths' worker
# drives the run's one group of rank processes (a second worker would start a second group)
ONE_WORKER = frozenset({"dist"})


class FamilyWorker:
    """One worker process of ``family``."""

    def __init__(self, family: str, timeout: float):
        self.family = family
        cmd = [sys.executable, "-m", "conformance.paths.worker", "--serve", family]
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True
        )
        register_worker(self.proc)
        self._tail: collections.deque[str] = collections.deque(maxlen=40)
        self._tail_lock = threading.Lock()
        self._buffer = b""
        self.served = 0
        threading.Thread(target=self._drain_stderr, daemon=True).start()
        answer, why = self._read(timeout, started=f"starting a {family} worker")
        self.alive = answer is not None and answer.get("ready") is True
        self.start_problem = "" if self.alive else (why or f"the {family} worker did not start: {answer}")
        if not self.alive:
            self.close()

    def _drain_stderr(self) -> None:
        for raw in self.proc.stderr:
            with self._tail_lock:
                self._tail.append(raw.decode(errors="replace").rstrip())

    def _tail_text(self, lines: int = 5) -> str:
        time.sleep(0.05)  # what the dying process wrote last is still in the pipe
        with self._tail_lock:
            return "\n".join(line for line in list(self._tail)[-lines:] if line.strip())

    def _read(self, timeout: float, started: str = "") -> Answer:
        """The next answer line, or why none came within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            ready = select.select([fd], [], [], max(left, 0))[0] if left > 0 else []
            if not ready:
                kill_group(self.proc)
                self.proc.wait()
                return None, f"timed out after {timeout:.0f} s" + (f" ({started})" if started else "")
            chunk = os.read(fd, 1 << 16)
            if not chunk:  # the worker died
                kill_group(self.proc)
                self.proc.wait()
                return None, death_reason(self.proc.returncode, self._tail_text())
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        try:
            return json.loads(line), ""
        except ValueError:
            return None, f"the worker answered something that is not JSON: {line[:200]!r}"

    def ask(self, request: dict, timeout: float) -> Answer:
        """``request`` served within ``timeout`` seconds; on no answer the worker is dead."""
        with self._tail_lock:
            self._tail.clear()
        try:
            self.proc.stdin.write(json.dumps(request).encode() + b"\n")
            self.proc.stdin.flush()
        except OSError:  # it died between two requests
            kill_group(self.proc)
            self.proc.wait()
            self.alive = False
            return None, death_reason(self.proc.returncode, self._tail_text())
        answer, why = self._read(timeout)
        self.served += 1
        if answer is None:
            self.close()
        return answer, why

    def close(self) -> None:
        self.alive = False
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)  # it ends when its stdin closes
        kill_group(self.proc)  # the worker and anything it left running in its group
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        forget_worker(self.proc)


class WorkerPool:
    """Idle workers by family, started on demand and replaced after a death."""

    def __init__(self, timeout: float):
        self.timeout = timeout
        self._idle: dict[str, list[FamilyWorker]] = collections.defaultdict(list)
        self._lock = threading.Lock()
        self.started = 0

    @contextlib.contextmanager
    def worker(self, family: str) -> Iterator[FamilyWorker]:
        """A live worker of ``family`` for the block (an idle one, else a new one, whose
        start may have failed: then ``alive`` is False and ``start_problem`` says why)."""
        with self._lock:
            idle = self._idle[family]
            worker = idle.pop() if idle else None
        if worker is None:
            worker = FamilyWorker(family, self.timeout)
            with self._lock:
                self.started += 1
        try:
            yield worker
        finally:
            if worker.alive:
                with self._lock:
                    self._idle[family].append(worker)

    def ask(self, family: str, request: dict, timeout: float | None = None) -> Answer:
        """``request`` served by a worker of ``family``."""
        with self.worker(family) as worker:
            if not worker.alive:
                return None, worker.start_problem
            return worker.ask(request, self.timeout if timeout is None else timeout)

    def retire(self, family: str) -> None:
        """Close the idle workers of ``family`` (nothing more to run there)."""
        with self._lock:
            workers = self._idle.pop(family, [])
        for worker in workers:
            worker.close()

    def close(self) -> None:
        with self._lock:
            families = list(self._idle)
        for family in families:
            self.retire(family)

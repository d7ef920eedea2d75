"""Host memory: what a process tree holds, what this machine has available, and what a
(case, path) is expected to need, so that the runner starts a path only when it fits
(admission) instead of leaving the choice to the kernel's out-of-memory killer.

What a tree holds is the sum of its processes' proportional set size (``Pss`` in
``/proc/<pid>/smaps_rollup``): a page shared by several processes (a weights file that the
parent and a worker both memory-map, the page cache behind it) counts once in all, split
between them, so the figure is the memory the tree costs the machine. Where
``smaps_rollup`` cannot be read, ``VmRSS`` stands in (shared pages then count once per
process).

The estimate is the weights' bytes times a factor per path family (measured: see
docs/performance.md), plus the activations of one forward pass and the runtime's own
footprint. The factors hold for this toolkit's loading: weights written once by the
parent into a folder of ``.npy`` files and memory-mapped by every process that reads them.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from pathlib import Path

GB = 1e9


def _status_kb(pid: int, field: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def process_bytes(pid: int) -> int:
    """Bytes that process ``pid`` holds: its Pss (its share of every page it maps), or its
    VmRSS where smaps_rollup cannot be read; 0 for a process that has gone."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return (_status_kb(pid, "VmRSS") or 0) * 1024


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (every thread's children)."""
    found = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return found
    for task in tasks:
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    return found


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children(p)
    return out


def tree_bytes(pid: int | None = None) -> int:
    """Bytes that ``pid`` (default: this process) and its descendants hold together."""
    return sum(process_bytes(p) for p in tree(os.getpid() if pid is None else pid))


class TreePeak:
    """``with TreePeak(pid) as peak: ...``; ``peak.bytes`` is the largest :func:`tree_bytes`
    of ``pid``'s tree (default: this process's) sampled every ``interval`` seconds while
    the block ran (and once at each end)."""

    def __init__(self, pid: int | None = None, interval: float = 0.2):
        self.pid = os.getpid() if pid is None else pid
        self.interval = interval
        self.bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> int:
        now = tree_bytes(self.pid)
        self.bytes = max(self.bytes, now)
        return now

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> TreePeak:
        self.sample()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()


def _cgroup_room() -> int | None:
    """Bytes the cgroup of this process may still take (memory.max - memory.current),
    or None where there is no limit."""
    try:
        line = Path("/proc/self/cgroup").read_text().splitlines()[0]
        rel = line.split(":", 2)[2].strip()
        base = Path("/sys/fs/cgroup") / rel.lstrip("/")
        limit = (base / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int((base / "memory.current").read_text().strip())
    except (OSError, ValueError, IndexError):
        return None


def available_bytes() -> int | None:
    """The memory a new process can take here: /proc/meminfo's MemAvailable, lowered to the
    room left under this process's cgroup limit if there is one (None if neither is known)."""
    from conformance.cases import available_memory

    figures = [f for f in (available_memory(), _cgroup_room()) if f is not None]
    return min(figures) if figures else None


# --- admission ---------------------------------------------------------------------------
# What a path's whole process tree (the run and one worker) holds per byte of weights, on
# top of the runtime's own footprint, with the weights memory-mapped as the run shares
# them. Measured with --jobs 1 on the mega case (3.0 GiB of weights, docs/performance.md)
# and rounded up: torch wraps the mapped arrays (~1.0x), ONNX Runtime maps its export's
# external data (~1.1x, the export written by the worker first), the Keras port holds one
# TensorFlow variable per table, adopting the buffer it was read into (~1.2x with TensorFlow's
# own footprint: 3.53 GiB for tf-function-cpu on mega).
# The reference evaluator and unknown families get 3x.
WEIGHT_FACTORS = {"torch": 1.15, "ort": 1.3, "tf": 1.25}
# an ONNX path on an export that the stock TorchScript exporter makes with every parameter
# encoded (mega: 9.55 GiB for 3.0 GiB of weights): a bfloat16 value table, which the toolkit
# cannot hand it as a graph input (conformance.export.torch_exporters.export_torchscript;
# float tables: 3.35 GiB on mega, the ONNX Runtime factor)
STOCK_TORCHSCRIPT_FACTOR = 3.3
DEFAULT_FACTOR = 3.0
# a reduced-precision variant holds its converted table besides the float32 one it reads
PRECISION_FACTORS = {"fp16": 0.5, "bf16": 0.5, "int8": 0.3}
# the imports of the run and of one worker (torch, onnxruntime, TensorFlow)
RUNTIME_BYTES = {"torch": int(1.0 * GB), "dist": int(1.0 * GB), "ort": int(1.2 * GB), "tf": int(2.0 * GB)}
DEFAULT_RUNTIME_BYTES = int(2.0 * GB)
# a path that starts processes of its own (torch-dist-cpu[N]: ``path.processes``): each
# imports torch (measured 0.28 GB) and holds its columns of the tables, read from the file in
# blocks; the worker that drives them holds nothing (--jobs 1, N = 2: xlm 1.38 GiB for 0.75 GiB
# of weights, mega 3.82 GiB for 3.01 GiB)
PROCESS_RUNTIME_BYTES = int(0.3 * GB)
SHARDED_FACTOR = 1.3


def _stock_torchscript(case, exporter: str) -> bool:
    """The TorchScript export of ``case`` takes the stock exporter's route, every parameter
    encoded: its value table is bfloat16, which cannot be handed in as a graph input."""
    return exporter == "torch-script" and case.config.value_dtype == "bfloat16"


def estimate_bytes(case, path) -> int:
    """The peak memory the run's process tree is expected to reach while ``path`` runs
    ``case``: the weights times the family's factor, the activations of one pass, and the
    runtime's own footprint."""
    family = getattr(path, "family", "")
    factor = WEIGHT_FACTORS.get(family, DEFAULT_FACTOR)
    processes = getattr(path, "processes", 0)
    if processes:
        factor = SHARDED_FACTOR
    if _stock_torchscript(case, getattr(path, "exporter", "")):
        factor = max(factor, STOCK_TORCHSCRIPT_FACTOR)
    if "@" in path.name:
        factor += PRECISION_FACTORS.get(path.name.rsplit("@", 1)[1], 1.0)
    runtime = RUNTIME_BYTES.get(family, DEFAULT_RUNTIME_BYTES) + processes * PROCESS_RUNTIME_BYTES
    return int(case.spec.weight_bytes * factor) + case.activation_bytes() + runtime


# making an export (the build before the ONNX paths run): the mapped weights and what the
# exporter holds besides (mega, 3.0 GiB: torch-fast 3.66, torch-dynamo 3.58, torch-script 3.58,
# tf2onnx 3.61 GiB for the whole tree)
EXPORT_WEIGHT_FACTOR = 1.25


def estimate_export_bytes(case, exporter: str) -> int:
    """The peak memory a worker is expected to reach while it makes ``exporter``'s export of
    ``case``: the weights times :data:`EXPORT_WEIGHT_FACTOR` (the stock TorchScript route of a
    bfloat16 table: :data:`STOCK_TORCHSCRIPT_FACTOR`), one pass's activations (the trace),
    and the imports of the exporter's framework."""
    factor = STOCK_TORCHSCRIPT_FACTOR if _stock_torchscript(case, exporter) else EXPORT_WEIGHT_FACTOR
    runtime = RUNTIME_BYTES["torch" if exporter.startswith("torch-") else "tf"]
    return int(case.spec.weight_bytes * factor) + case.activation_bytes() + runtime


def _gb(n: float) -> str:
    return f"{n / GB:,.1f} GB"


class Admission:
    """Starts paths only while their estimates fit the memory available, instead of
    leaving the choice to the kernel's out-of-memory killer.

    ``with admission.admit(need) as refusal:`` waits while paths already running hold the
    room ``need`` would take, then runs the block with ``refusal`` None; a path that could
    not fit even alone gets the reason instead ("needs X GB, Y GB available") and must not
    start. The room is the memory available when no admitted path was running (re-read
    each time the machine is idle), less the estimates of those running.

    ``reclaim``, when set, is called before a path is refused: it frees what idle workers
    hold (a long-lived worker keeps its last case's models, which no estimate counts), and
    the room is read again."""

    def __init__(self, available=available_bytes):
        self._available = available
        self._cond = threading.Condition()
        self._running: list[int] = []
        self._room: int | None = None
        self.reclaim: Callable[[], None] | None = None

    @contextlib.contextmanager
    def admit(self, need: int):
        refusal = None
        reclaimed = False
        with self._cond:
            while True:
                if not self._running:
                    self._room = self._available()
                if self._room is None or sum(self._running) + need <= self._room:
                    break  # fits (or nothing is known about this machine's memory)
                if not self._running:
                    if self.reclaim is not None and not reclaimed:
                        reclaimed = True
                        self.reclaim()  # idle workers' memory back, then the room read again
                        continue
                    refusal = f"needs {_gb(need)} (estimated), {_gb(self._room)} available"
                    break
                self._cond.wait()
            if refusal is None:
                self._running.append(need)
        if refusal is not None:
            yield refusal
            return
        try:
            yield None
        finally:
            with self._cond:
                self._running.remove(need)
                self._cond.notify_all()

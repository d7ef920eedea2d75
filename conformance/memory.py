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

import os
import threading
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

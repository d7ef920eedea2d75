"""Peak GPU memory of this process, the same way for every CUDA path.

The runtimes each see only their own allocator (``torch.cuda.max_memory_allocated``;
ONNX Runtime has no peak at all), so the bench asks the driver instead: ``nvidia-smi``
lists the memory each process uses (its CUDA context included). Inside a container the
driver lists host process ids, so where this process is not listed the figure is the rise
of the GPUs' used memory since the sampler started (the bench runs one path at a time).

Sampling runs in a thread every ``interval`` seconds while the path is prepared and
warmed up, then stops, so that no ``nvidia-smi`` runs during the timed passes; one more
reading is taken after them. All runtimes keep the memory they have allocated, so the
peak of the timed passes is already held after the warm-up.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading

PER_PROCESS = ["--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"]
PER_GPU = ["--query-gpu=memory.used", "--format=csv,noheader,nounits"]


def _query(smi: str, args: list[str]) -> list[list[str]] | None:
    try:
        done = subprocess.run([smi, *args], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode:
        return None
    return [[f.strip() for f in line.split(",")] for line in done.stdout.splitlines() if line.strip()]


def process_memory_mb(pid: int, smi: str = "nvidia-smi") -> float | None:
    """MiB of GPU memory that ``pid`` uses now (summed over GPUs), or None if not listed."""
    used = None
    for fields in _query(smi, PER_PROCESS) or []:
        if len(fields) == 2 and fields[0] == str(pid) and fields[1].isdigit():
            used = (used or 0.0) + float(fields[1])
    return used


def gpus_used_mb(smi: str = "nvidia-smi") -> float | None:
    """MiB used on all GPUs together, or None if unknown."""
    rows = _query(smi, PER_GPU)
    if not rows or not all(len(r) == 1 and r[0].isdigit() for r in rows):
        return None
    return sum(float(r[0]) for r in rows)


class PeakSampler:
    """``with PeakSampler() as s: <prepare, warm up>``, then ``s.sample()`` after the timed
    passes, and ``s.peak_mb``: the largest GPU memory this process used (None without
    ``nvidia-smi``)."""

    def __init__(self, interval: float = 0.1, smi: str | None = None):
        self.interval = interval
        self.smi = smi or shutil.which("nvidia-smi")
        self.peak_mb: float | None = None
        self._baseline: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> None:
        if not self.smi:
            return
        used = process_memory_mb(os.getpid(), self.smi)
        if used is None:  # not listed (a container's process ids): the rise since the start
            total = gpus_used_mb(self.smi)
            if total is not None and self._baseline is not None:
                used = max(total - self._baseline, 0.0)
        if used is not None:
            self.peak_mb = max(self.peak_mb or 0.0, used)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> PeakSampler:
        if self.smi:
            self._baseline = gpus_used_mb(self.smi)
            self.sample()
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread:
            self._stop.set()
            self._thread.join()
            self.sample()
